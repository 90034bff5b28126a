"""deploy/: the manifests and scripts pass maintained validators offline, and a real 2-node Ray cluster on
this machine runs a job with the actors on one node and the learner on the other, scaled 1 -> 2 -> 1 and
ended with `prorank stop`. Where network namespaces can be made, tests/integration/test_simcluster.py runs the same job
(and more) across namespaced nodes, and this one skips: they would repeat each other for 100 s of CI."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from bench.fanout import rate_bits
from deploy.sim.cluster import SimCluster
from deploy.sim.netns import SimError, can_create_namespaces
from prorank.settings.config_file import load_config
from tests.jobs import ROOT, job_config, step_lines

DEPLOY = ROOT / "deploy"
CLUSTER_CONFIG = ROOT / "configs" / "cluster-qwen2.5-0.5b.yaml"
ROLES = {"actors": "actor_node", "learner": "learner_node", "reward": "reward_node"}


def _role_resources() -> dict[str, str]:
    """The custom resource each role of the cluster config asks for."""

    cfg = load_config(CLUSTER_CONFIG)
    return {role: next(iter(getattr(cfg, role).resources)) for role in ROLES}


def test_cluster_config_places_each_role_on_its_node_type():
    assert _role_resources() == ROLES


def test_ray_cluster_launcher_yaml_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema for cluster launcher configs
    offered = {k for t in config["available_node_types"].values() for k in t["resources"]}
    assert set(ROLES.values()) <= offered


def test_kuberay_manifests_validate():
    import kubernetes_validate  # noqa: PLC0415 kubernetes-validate: heavy, only the manifest test

    cluster = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "configs/cluster-qwen2.5-0.5b.yaml" in job["spec"]["entrypoint"]
    groups = [("head", cluster["spec"]["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster["spec"]["workerGroupSpecs"]]
    groups.append(("submitter", {"template": job["spec"]["submitterPodTemplate"]}))
    offered = set()
    for name, group in groups:  # the pod templates are core Kubernetes objects: validate them as such
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": group["template"]}
        kubernetes_validate.validate(pod, "1.33", strict=True)
        raw = group.get("rayStartParams", {}).get("resources")
        if raw:
            offered |= set(json.loads(json.loads(raw)))  # KubeRay takes a quoted JSON string
    assert offered == set(ROLES.values())


def test_shell_scripts_pass_shellcheck():
    scripts = [
        DEPLOY / "slurm" / "prorank.sbatch",
        DEPLOY / "sim" / "simcluster.sh",
        *sorted((ROOT / "scripts").glob("*.sh")),
        ROOT / ".ci" / "run",
    ]
    out = subprocess.run(
        [str(Path(sys.executable).parent / "shellcheck"), *map(str, scripts)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfiles_pass_hadolint():
    files = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
    assert {f.name for f in files} == {"Dockerfile.cpu", "Dockerfile.cuda"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), *map(str, files)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- a real 2-node Ray cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path):
    """`ray start --head` (the learner node) and `ray start --address` (the actor node) on this machine,
    with token authentication; every process carries a tag so that teardown stops exactly these."""
    tag = uuid.uuid4().hex
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PRORANK_E2E_TAG": tag,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray = str(Path(sys.executable).parent / "ray")
    address = f"127.0.0.1:{_free_port()}"
    # Its own temp dir (short: it holds Unix sockets), so that its address file does not make later
    # `ray.init()` calls on this machine join it.
    temp = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    common = [
        "--num-cpus",
        "4",
        "--object-store-memory",
        str(300 * 2**20),
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
    ]
    try:
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                "--port",
                address.split(":")[1],
                "--include-dashboard=false",
                "--temp-dir",
                temp,
                "--resources",
                json.dumps({"learner_node": 4}),
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [ray, "start", "--address", address, "--resources", json.dumps({"actor_node": 4}), *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield address, env, tag
    finally:
        for sig in ("TERM", "KILL"):
            for pid in _tagged(tag):
                subprocess.run(["kill", f"-{sig}", pid], capture_output=True)
            time.sleep(3)
        shutil.rmtree(temp, ignore_errors=True)


def _tagged(tag: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"PRORANK_E2E_TAG={tag}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _nodes(address: str, env: dict) -> dict[str, set[str]]:
    """Node id -> the custom resources it offers, asked from a separate process."""
    code = (
        "import json, ray; ray.init(address=%r, log_to_driver=False); "
        "print(json.dumps({n['NodeID']: [k for k in n['Resources'] if k.endswith('_node')] "
        "for n in ray.nodes() if n['Alive']}))" % address
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {k: set(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def _cli(address: str, env: dict, job: str, *args: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "prorank.driver.cli", *args, "--address", address, "--job", job],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.skipif(
    not can_create_namespaces(),
    reason="tests/integration/test_simcluster.py runs this job (and more) across "
    "namespaced nodes here; this plain 2-node version is for machines without namespaces",
)
def test_two_nodes_actors_apart_from_learner_scaled_while_training(
    two_node_cluster, tmp_path, answering_model, scifact_dir
):
    address, env, tag = two_node_cluster
    job = f"e2e-{tag[:8]}"
    config = job_config(
        tmp_path,
        answering_model,
        scifact_dir,
        "sync",
        steps=5000,
        updates={
            "actors": {"num_actors": 1, "resources": {"actor_node": 1}},
            "learner": {"resources": {"learner_node": 1}},
            "reward": {"resources": {"learner_node": 1}},
            "train": {"job_name": job, "dev_queries": 0},
            "warmup": {"checkpoint_every": 0},
        },
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "prorank.driver.cli", "train", "--config", str(config), "--address", address],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "run-sync" / "metrics.jsonl"

    def wait(cond) -> None:
        while not cond() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)

    try:
        deadline = time.monotonic() + 600
        wait(lambda: len(step_lines(metrics)) >= 2)
        _cli(address, env, job, "scale", "actors", "2", "--wait", "300")
        wait(lambda: any(m["actors/ready"] == 2 for m in step_lines(metrics)))  # the new actor took work
        at = len(step_lines(metrics))
        wait(lambda: len(step_lines(metrics)) >= at + 2)
        _cli(address, env, job, "scale", "actors", "1", "--wait", "300")
        at = len(step_lines(metrics))
        wait(lambda: len(step_lines(metrics)) >= at + 2)
        _cli(address, env, job, "stop")  # ends after its current step, with its summary
        output, _ = proc.communicate(timeout=600)
    except (AssertionError, subprocess.TimeoutExpired) as err:
        proc.kill()
        raise AssertionError(f"{err}\njob output:\n{proc.communicate()[0][-6000:]}") from None
    assert proc.returncode == 0, output[-4000:]

    lines = step_lines(metrics)
    steps = lines[-1]["step"]
    assert [m["step"] for m in lines] == list(range(1, steps + 1)) and steps < 5000
    counts = [int(m["actors/count"]) for m in lines]
    assert counts[0] == 1 and counts[-1] == 1, counts
    twos = [i for i, c in enumerate(counts) if c == 2]
    assert twos and twos == list(range(twos[0], twos[-1] + 1)), counts  # 1 -> 2 -> 1, while it trained

    summary = json.loads((tmp_path / "run-sync" / "summary.json").read_text())
    assert set(summary["versions"].values()) == {steps}  # every actor ends on the latest weights
    nodes = _nodes(address, env)
    assert [nodes[n] for n in summary["placement"]["actors"]] == [{"actor_node"}]
    assert [nodes[n] for n in summary["placement"]["warmup_learner"]] == [{"learner_node"}]


def test_simulated_cluster_refuses_bad_settings(tmp_path):
    """deploy/sim's settings are checked before anything is made (no root needed for these)."""

    with pytest.raises(SimError, match=r"node roles must be among .*'gpu'"):
        SimCluster("prkx", ["learner", "gpu"])
    with pytest.raises(SimError, match=r"cluster name 'much-too-long': up to 8 letters or digits"):
        SimCluster("much-too-long", ["learner"])
    with pytest.raises(SimError, match=r"no simulated cluster at .*\(no cluster.json\)"):
        SimCluster.load(str(tmp_path))
    assert rate_bits("800mbit") == 800e6 and rate_bits("1gbit") == 1e9
    with pytest.raises(ValueError, match=r"rate '800MBps': use bit, kbit, mbit or gbit"):
        rate_bits("800MBps")
    out = subprocess.run(
        [sys.executable, "-m", "deploy.sim", "link", "1", "sideways", "--state", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "link setting must be up or down, not 'sideways'" in out.stderr
