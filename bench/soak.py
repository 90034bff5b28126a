"""Fault soak: one training job under a schedule of faults, checked against the same job run without them.

    .venv/bin/python -m bench.soak --data ../shared/data/scifact [--model DIR] [--steps 40]

A local Ray cluster (its own head, tagged), then `prorank train` twice with the same config (2 rollout
actors, 2 reward replicas, sync mode, a checkpoint every 5 steps): once untouched (the reference), once
with, on a schedule from outside the job: rollout actors SIGKILLed (at different steps, right as a step
starts, while they generate), reward replicas SIGKILLed (Ray restarts them, on new ports), relay hops
frozen (SIGSTOP) while weights flow through them, so that the next actor's stream is cut and it falls back
to the learner, and finally the driver itself SIGKILLed, then the job resumed with `--resume`.

Checked: the run ends with every step exactly once (1..N, none skipped or repeated), each with all of
its groups; every actor on the latest version; and every step's loss and rewards equal the reference's,
the resumed steps included. Requests sample from per-request seeds, so a step that lost an actor or was
redone after the crash generates the same judgments: equal losses mean no judgment was lost, added or
answered twice. Prints the table for BENCHMARKS.md; `--json` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from prorank.corpus.batches import positive_pairs
from prorank.corpus.data import load_local
from prorank.model.models import build_answering_model

ROOT = Path(__file__).resolve().parents[1]
# A frozen relay: longer than a receiver waits for it (keepalive 5 + 5 s on a flowing stream, gRPC's 20 s
# connect timeout on one that never got its handshake answered).
FREEZE_SECONDS = 25.0


def job_config(out: Path, model: str, data: str, steps: int) -> Path:
    cfg = {
        "data": {"path": data},
        "model": {"path": model},
        "prompt": {"max_length": 96},
        "sampling": {"group_size": 4, "max_tokens": 1, "temperature": 1.0, "per_request_seed": True},
        "actors": {"num_actors": 2, "max_model_len": 256, "chunk_size": 2, "kv_cache_gib": 1, "max_restarts": 20},
        "reward": {"port": 0, "replicas": 2, "max_restarts": 10, "timeout_seconds": 5},
        "learner": {"num_ranks": 2, "zero_stage": 2},
        "warmup": {
            "steps": steps,
            "mode": "sync",
            "groups_per_step": 16,
            "micro_batch_groups": 4,
            "lr": 3e-3,
            "beta": 0.01,
            "checkpoint_every": 5,
        },
        "train": {
            "max_train_queries": 80,
            "dev_queries": 0,
            "output_dir": str(out),
            "job_name": f"soak{os.getpid()}",
        },
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


class Cluster:
    """`ray start --head` in its own temp dir, with a tag in every process's environment for cleanup."""

    def __init__(self):
        self.tag = secrets.token_hex(8)
        self.temp = tempfile.mkdtemp(prefix="raysoak-", dir="/tmp")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        token = Path(self.temp) / "ray-token"
        token.write_text(secrets.token_hex(32))
        self.env = {
            **os.environ,
            "PRORANK_SOAK_TAG": self.tag,
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                "--port",
                str(port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "8",
                "--include-dashboard=false",
                "--disable-usage-stats",
                "--temp-dir",
                self.temp,
                "--object-store-memory",
                str(300 * 2**20),
            ],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.tagged():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        shutil.rmtree(self.temp, ignore_errors=True)

    def tagged(self) -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if f"PRORANK_SOAK_TAG={self.tag}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
            except OSError:
                continue
        return found

    def train(self, config: Path, log: Path, *extra: str) -> subprocess.Popen:
        with log.open("w") as out:  # a file, not a pipe: nobody reads while the job runs
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prorank.driver.cli",
                    "train",
                    "--config",
                    str(config),
                    "--address",
                    self.address,
                    *extra,
                ],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )


def _lines(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip() and "actors/count" in x]


def _actor_pids(cluster: Cluster, class_name: str) -> list[int]:
    """The live processes of a Ray actor class (Ray titles them `ray::<Class>`) on `cluster`, oldest first."""
    found = []
    for pid in map(str, cluster.tagged()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if title.startswith(f"ray::{class_name}") and state not in ("Z", "X"):
            found.append(int(pid))
    return sorted(found)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def faulted_run(
    cluster: Cluster,
    config: Path,
    metrics: Path,
    actor_kills: int,
    replica_kills: int,
    cuts: int,
    crash_at: int,
    freeze_delay: float,
) -> dict:
    """Run the job under the fault schedule (one fault a step at most), crash it, resume it; returns
    what was injected and the job's own counts just before the crash."""
    kill_steps = [2 + 2 * i for i in range(actor_kills)]  # different steps, spread over the run
    replica_steps = [3 + 4 * i for i in range(replica_kills)]
    injected = {"actor kills": 0, "reward replica kills": 0, "relay freezes": 0, "driver SIGKILL": 0}
    proc = cluster.train(config, config.with_suffix(".log"))
    seen, froze_at, thaw_at = 0, -10, 0.0
    frozen: list[int] = []
    deadline = time.monotonic() + 1800
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if frozen and time.monotonic() >= thaw_at:
                frozen = [p for p in frozen if not _signal(p, signal.SIGCONT)]
            lines = _lines(metrics)
            if len(lines) == seen:
                time.sleep(0.01)
                continue
            seen, step = len(lines), lines[-1]["step"]
            if step >= crash_at:
                proc.kill()  # SIGKILL: no cleanup, no final checkpoint
                injected["driver SIGKILL"] = 1
                break
            if step >= crash_at - 4:
                continue  # the steps just before the crash run undisturbed
            # Right as step + 1 starts: its requests are with the actors now.
            if kill_steps and step >= kill_steps[0]:
                kill_steps.pop(0)
                injected["actor kills"] += any(
                    _signal(p, signal.SIGKILL) for p in _actor_pids(cluster, "RolloutEngine")[:1]
                )
            elif replica_steps and step >= replica_steps[0]:
                replica_steps.pop(0)
                injected["reward replica kills"] += any(
                    _signal(p, signal.SIGKILL) for p in _actor_pids(cluster, "RewardReplica")[:1]
                )
            elif not frozen and lines[-1]["weights/relay_fallbacks"] < cuts and step - froze_at >= 3:
                # Freeze the oldest actor (the head of the relay pipeline) while the learner steps, so that
                # the weight sync finds it frozen: the next actor's pull from it breaks off and falls back to
                # the learner. A freeze that lands mid-generation only stalls the step (tried again later).
                froze_at = step
                time.sleep(freeze_delay)
                frozen = [p for p in _actor_pids(cluster, "RolloutEngine")[:1] if _signal(p, signal.SIGSTOP)]
                injected["relay freezes"] += bool(frozen)
                thaw_at = time.monotonic() + FREEZE_SECONDS
        for pid in frozen:
            _signal(pid, signal.SIGCONT)
        proc.wait(60)
        if not injected["driver SIGKILL"]:
            raise RuntimeError(
                f"the job ended before the crash step:\n{config.with_suffix('.log').read_text()[-4000:]}"
            )
        _wait_gone(cluster)
        before = _lines(metrics)[-1]
        resumed = cluster.train(config, config.with_suffix(".resumed.log"), "--resume")
        if resumed.wait(1800):
            raise RuntimeError(f"the resumed job failed:\n{config.with_suffix('.resumed.log').read_text()[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"injected": injected, "before_crash": before}


def _wait_gone(cluster: Cluster, timeout: float = 120) -> None:
    """Ray removes a dead driver's actors shortly after it died; the resumed job reuses the job's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_actor_pids(cluster, c) for c in ("JobControl", "RolloutEngine", "LearnerRank", "RewardReplica")):
            return
        time.sleep(1)
    raise TimeoutError(f"the crashed job's actors still run {timeout:.0f} s after its driver died")


def soak(
    data: str, model: str, work: Path, steps: int = 40, actor_kills: int = 10, replica_kills: int = 3, cuts: int = 2
) -> dict:
    crash_at = steps - 3  # after the checkpoint at a multiple of 5: the last steps are redone on resume
    cluster = Cluster()
    try:
        reference_config = job_config(work / "reference", model, data, steps)
        if cluster.train(reference_config, work / "reference.log").wait(1800):
            raise RuntimeError(f"the reference job failed:\n{(work / 'reference.log').read_text()[-4000:]}")
        config = job_config(work / "faulted", model, data, steps)
        ref = _lines(work / "reference" / "metrics.jsonl")
        median = lambda key: sorted(m[key] for m in ref)[len(ref) // 2]  # noqa: E731
        freeze_delay = median("time/wait_rollouts_seconds") + 0.5 * median("train/step_seconds")
        faults = faulted_run(
            cluster,
            config,
            work / "faulted" / "metrics.jsonl",
            actor_kills,
            replica_kills,
            cuts,
            crash_at,
            freeze_delay,
        )
    finally:
        cluster.stop()
    ref, got = _lines(work / "reference" / "metrics.jsonl"), _lines(work / "faulted" / "metrics.jsonl")
    summary = json.loads((work / "faulted" / "summary.json").read_text())
    last = faults["before_crash"]
    report = {
        "steps": [m["step"] for m in got],
        "groups_per_step": sorted({m["rollout/groups"] for m in got}),
        "versions": sorted(set(summary["versions"].values())),
        "loss_max_abs_diff": max(abs(a["train/loss"] - b["train/loss"]) for a, b in zip(got, ref)),
        "reward_equal_steps": sum(
            a["train/reward/total_mean"] == b["train/reward/total_mean"] for a, b in zip(got, ref)
        ),
        "faults": {
            **faults["injected"],
            "actors lost (seen by the job, before the crash)": last["actors/lost"],
            "requests re-dispatched (before the crash)": last["rollout/requeued"],
            "relay fallbacks (before the crash)": last["weights/relay_fallbacks"],
        },
        "resumed_from_step": max(m["step"] for m in got if m["step"] % 5 == 0 and m["step"] < crash_at + 1),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--model", help="model folder; default: a tiny model nudged to answer, built here")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--actor-kills", type=int, default=10)
    parser.add_argument("--replica-kills", type=int, default=3)
    parser.add_argument("--cuts", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        model = args.model
        if not model:
            pairs = positive_pairs(load_local(args.data, "train"))
            model = str(build_answering_model(work / "model", pairs))
        report = soak(args.data, model, work, args.steps, args.actor_kills, args.replica_kills, args.cuts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
