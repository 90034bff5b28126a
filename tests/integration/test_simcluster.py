"""deploy/sim: a real 5-node Ray cluster on this machine, one network namespace per node on links shaped
with tc, the job's services on the node addresses with token and TLS. A `prorank train` job runs on it
with its learner, reward replicas and actors on their own nodes, and survives what networks do: actors
scaled 1 -> 2 -> 1, an actor node and a reward node cut off mid-job and back, a relay hop cut off
mid-transfer. Skips (saying why) where network namespaces cannot be made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from deploy.sim.cluster import SimCluster
from deploy.sim.netns import can_create_namespaces
from deploy.sim.weight_peer import answer, order
from tests.jobs import ROOT, job_config, step_lines

WHY_NOT = can_create_namespaces()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=f"simulated cluster unavailable: {WHY_NOT}")
ROLES = ["learner", "reward", "reward", "actor", "actor"]
REWARD2, ACTOR2 = 2, 4  # the nodes the test cuts off


@pytest.fixture(scope="module")
def cluster():
    name = f"prkt{os.getpid() % 10000}"
    sim = SimCluster(name, ROLES, subnet=78, rate="400mbit", delay="0.2ms", cpus=4)
    sim.up(wait=240)
    try:
        yield sim
    finally:
        left = sim.down()
        assert not left, left
        assert not [
            ns
            for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if ns.startswith(name)
        ], "namespaces left behind"


def _wait(cond, what: str, proc, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the job ended while waiting for {what}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_job_across_namespaced_nodes_survives_scaling_and_partitions(cluster, tmp_path, answering_model, scifact_dir):
    cluster.wait_nodes(len(ROLES))
    job = f"sim{os.getpid()}"
    config = job_config(
        tmp_path,
        answering_model,
        scifact_dir,
        "sync",
        steps=5000,
        updates={
            "train": {"job_name": job, "dev_queries": 0},
            "warmup": {"checkpoint_every": 0},
        },
    )
    argv = [
        sys.executable,
        "-m",
        "prorank.driver.cli",
        "train",
        "--config",
        str(config),
        "--address",
        cluster.address,
        *cluster.train_overrides(),
        "actors.num_actors=1",
        "reward.timeout_seconds=3",
        "weights.wait_seconds=60",
    ]
    proc = cluster.popen(0, argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run-sync" / "metrics.jsonl"

    def cli(*args: str) -> None:
        out = cluster.run(
            0,
            [sys.executable, "-m", "prorank.driver.cli", *args, "--address", cluster.address, "--job", job],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def steps_after(at: int, n: int, what: str, timeout: float = 300) -> list[dict]:
        _wait(lambda: len(step_lines(metrics)) >= at + n, what, proc, timeout)
        return step_lines(metrics)[at:]

    try:
        steps_after(0, 2, "2 steps", 600)
        cli("scale", "actors", "2", "--wait", "300")
        _wait(lambda: any(m["actors/ready"] == 2 for m in step_lines(metrics)), "2 ready actors", proc)

        # A reward node cut off: calls to it time out (3 s) and go to the other replica; no step fails.
        cluster.link(REWARD2, up=False)
        at = len(step_lines(metrics))
        _wait(
            lambda: any(m["time/wait_rewards_seconds"] > 2.5 for m in step_lines(metrics)[at:]),
            "a reward call that failed over",
            proc,
        )
        rewarded = steps_after(at, 3, "3 steps with a reward node cut off")
        cluster.link(REWARD2, up=True)

        # An actor node cut off: Ray declares it dead, the pool drops its actor and goes on with the other.
        lost = step_lines(metrics)[-1]["actors/lost"]
        cut = time.monotonic()
        cluster.link(ACTOR2, up=False)
        _wait(lambda: step_lines(metrics)[-1]["actors/lost"] > lost, "the job to notice the lost actor", proc, 120)
        noticed = time.monotonic() - cut
        steps_after(len(step_lines(metrics)), 3, "3 steps on the remaining actor")
        cluster.link(ACTOR2, up=True)
        # Its replacement waits for the node to rejoin Ray, pulls the newest weights, then takes work.
        at = len(step_lines(metrics))
        _wait(lambda: any(m["actors/ready"] == 2 for m in step_lines(metrics)[at:]), "the node's actor back", proc, 300)
        cli("scale", "actors", "1", "--wait", "300")
        steps_after(len(step_lines(metrics)), 2, "2 steps on 1 actor")
        cli("stop", "--preempt", "--wait", "300")  # as the KubeRay preStop hook: returns once the job has ended
        output, _ = proc.communicate(timeout=60)  # its control actor is gone: only Ray's shutdown is left
    except (AssertionError, subprocess.TimeoutExpired) as err:
        proc.kill()
        raise AssertionError(f"{err}\njob output:\n{proc.communicate()[0][-6000:]}") from None
    finally:
        for node in (REWARD2, ACTOR2):
            cluster.link(node, up=True)
    lines = step_lines(metrics)
    last = lines[-1]["step"]
    assert proc.returncode == 143, output[-4000:]  # preempted: a scheduler retries it with --resume
    assert f"stopped by `prorank stop --preempt` after step {last}" in output, output[-2000:]
    assert [m["step"] for m in lines] == list(range(1, last + 1))  # no step failed or was skipped
    # Every step trained on exactly its groups, each with its rewards (through the remaining replica
    # while the other was cut off); the job stops at any request answered twice.
    assert {m["rollout/groups"] for m in lines} == {8.0}
    assert all("train/reward/total_mean" in m for m in rewarded)
    assert noticed < 90, f"the lost actor was noticed after {noticed:.0f} s"
    counts = [int(m["actors/count"]) for m in lines]
    assert counts[0] == 1 and counts[-1] == 1 and 2 in counts, counts

    summary = json.loads((tmp_path / "run-sync" / "summary.json").read_text())
    assert summary["steps"] == last
    assert set(summary["versions"].values()) == {last}  # every actor ends on the latest weights
    node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in cluster.ray_nodes()}
    by_role = {node.ip: node.role for node in cluster.nodes}
    assert {by_role[node_ips[n]] for n in summary["placement"]["warmup_learner"]} == {"learner"}
    assert {by_role[node_ips[n]] for n in summary["placement"]["actors"]} == {"actor"}
    assert summary["addresses"][0].startswith(f"{cluster.head.ip}:")  # the weight server announced its node's IP
    assert {a.split(":")[0] for a in summary["addresses"][1:]} == {cluster.nodes[1].ip, cluster.nodes[2].ip}


def test_actor_node_cut_off_mid_stream_its_work_is_redone_once(cluster, tmp_path, answering_model, scifact_dir):
    """A real ActorPool (2 vLLM actors, one per actor node) streams 1200 requests; one actor node is cut
    off after the first answers: its chunks go back in the queue and the other actor answers them, every
    request exactly once."""
    cluster.wait_nodes(len(ROLES))
    n = 1200
    driver = cluster.popen(
        0,
        [
            sys.executable,
            str(ROOT / "tests" / "sim_pool_driver.py"),
            cluster.address,
            str(answering_model),
            str(scifact_dir),
            str(n),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "driver.log").open("w"),
        text=True,
    )
    try:
        started = answer(driver, timeout=300)
        assert started["ready"] == 2 and len(started["nodes"]) == 2, started
        answer(driver)  # the first answer is in: both actors hold chunks
        cluster.link(ACTOR2, up=False)
        done = answer(driver, timeout=300)
        driver.wait(60)
    except (AssertionError, RuntimeError, TimeoutError) as err:
        driver.kill()
        driver.wait(30)
        raise AssertionError(f"{err}\n{(tmp_path / 'driver.log').read_text()[-4000:]}") from None
    finally:
        cluster.link(ACTOR2, up=True)
    assert sorted(done["answered"]) == sorted(f"r{i}" for i in range(n))  # none lost, none twice
    assert done["lost"] == 1 and done["requeued"] > 0  # the cut actor's chunks were redone elsewhere


def test_relay_hop_cut_off_mid_transfer_falls_back_to_the_learner(cluster):
    """Learner on node 0, a relaying actor on node 3, the next actor on node 4 pulling from the relay:
    node 3's link goes down mid-transfer; node 4 notices (gRPC keepalive), pulls from the learner and
    verifies the version. The peers run the job's code: WeightServer and pull_newest, over TLS."""
    relay_node, next_node = 3, 4
    secrets = ["--token-file", str(cluster.token_file), "--tls-cert", str(cluster.cert), "--tls-key", str(cluster.key)]
    peer = [sys.executable, "-m", "deploy.sim.weight_peer"]
    popen = dict(cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs = []
    try:
        server = cluster.popen(0, [*peer, "serve", "--host", cluster.head.ip, "--size-mb", "160", *secrets], **popen)
        procs.append(server)
        learner = answer(server)["address"]
        relay = cluster.popen(
            relay_node,
            [
                *peer,
                "pull",
                "--name",
                "relay",
                "--relay-host",
                cluster.nodes[relay_node].ip,
                "--tls-ca",
                str(cluster.cert),
                *secrets,
            ],
            **popen,
        )
        procs.append(relay)
        downstream = cluster.popen(
            next_node, [*peer, "pull", "--name", "next", "--tls-ca", str(cluster.cert), *secrets], **popen
        )
        procs.append(downstream)
        relay_address = answer(relay)["relay"]
        answer(downstream)
        order(relay, [[learner, 120]])
        order(downstream, [[relay_address, 120], [learner, 120]])
        time.sleep(1.0)  # 160 MB at 400 Mbit/s take over 3 s: the cut comes mid-transfer
        cluster.link(relay_node, up=False)
        got = answer(downstream, timeout=120)
    finally:
        cluster.link(relay_node, up=True)
        for proc in procs:
            proc.stdin.close()
            proc.kill()
            proc.wait(30)
    assert got["version"] == 1 and got["source"] == learner  # fell back, then received and verified it all
    assert got["bytes"] > 160e6
