"""Helpers of the tests that run `prorank train` as users do: a config, the CLI in its own process
tagged through its environment, and a check that nothing it started is left running."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
SCORE_STEPS = 4


def job_config(
    tmp: Path,
    model: Path,
    scifact: Path,
    mode: str,
    steps: int = STEPS,
    stages: str = "warmup",
    updates: dict[str, dict] | None = None,
) -> Path:
    """The e2e job's config file; `updates` are merged into its sections."""
    cfg: dict[str, Any] = {
        "data": {"path": str(scifact)},
        "model": {"path": str(model)},
        "prompt": {"max_length": 96},
        "sampling": {"group_size": 4, "max_tokens": 1, "temperature": 1.0},
        "actors": {"num_actors": 2, "max_model_len": 256, "chunk_size": 2, "kv_cache_gib": 1},
        "reward": {"port": 0},
        "learner": {"num_ranks": 2, "zero_stage": 2},
        "eval": {"batch_size": 8},
        "warmup": {
            "steps": steps,
            "mode": mode,
            "groups_per_step": 8,
            "micro_batch_groups": 2,
            "lr": 3e-3,
            "beta": 0.01,
            "dev_every": 5,
            "checkpoint_every": 5,
        },
        "train": {
            "max_train_queries": 40,
            "dev_queries": 6,
            "dev_depth": 5,
            "output_dir": str(tmp / f"run-{mode}"),
            "ray_num_cpus": 6,
            "stages": stages,
        },
        "score": {
            "steps": SCORE_STEPS,
            "queries_per_step": 4,
            "micro_batch_queries": 1,
            "negatives": 3,
            "lr": 1e-3,
            "contrastive_weight": 1.0,
            "pairwise_weight": 0.5,
            "pointwise_weight": 0.5,
            "dev_every": 2,
            "checkpoint_every": 2,
            "sync_every": 3,
            "negatives_from": "policy",
            "wait_for_actors": True,
            "mine_every": 2,
        },
    }
    for section, values in (updates or {}).items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_job(config: Path, tag: str, *extra: str) -> subprocess.Popen:
    """The CLI in its own process group, as a scheduler (SLURM, Kubernetes, a launcher) starts it."""
    env = {**os.environ, "PRORANK_E2E_TAG": tag, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "prorank.driver.cli", "train", "--config", str(config), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def leftovers(tag: str) -> list[str]:
    """Processes still carrying the job's tag in their environment (every child inherits it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"PRORANK_E2E_TAG={tag}".encode() in environ:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def gone(tag: str, timeout: float = 60) -> list[str]:
    """The processes of a run killed from outside (SIGKILL to all, a crashed node) still running once they
    had `timeout` s to end. A command that returns ends its own first (driver/processes.py): check those
    with `leftovers` at once."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(tag)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def port_free(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


def step_lines(metrics: Path) -> list[dict]:
    """The per-step lines a running job has written whole to metrics.jsonl so far. The job may be mid-write:
    a last line without its newline is not read yet."""
    if not metrics.is_file():
        return []
    written = metrics.read_text().split("\n")[:-1]
    return [json.loads(x) for x in written if x.strip() and "actors/count" in x]


def env_without_token() -> dict[str, str]:
    """This environment less PRORANK_TOKEN: a service started with it has only the token it is given."""
    return {k: v for k, v in os.environ.items() if k != "PRORANK_TOKEN"}


def serve_reward(
    command: list[str], scifact: Path, token_file: Path, wait: float = 60, **popen: Any
) -> tuple[subprocess.Popen, str]:
    """`<command> reward serve` on SciFact's train qrels, on a free port, its token read from `token_file`
    (PRORANK_TOKEN left out of its environment): the process and the address it says it serves on, within
    `wait` seconds."""
    env = env_without_token()
    args = [
        "reward",
        "serve",
        "--data",
        str(scifact),
        "--split",
        "train",
        "--port",
        "0",
        "--token-file",
        str(token_file),
    ]
    proc = subprocess.Popen([*command, *args], stderr=subprocess.PIPE, text=True, env=env, **popen)
    # Its stderr read by a thread to the end: a readline here could block past the deadline on a server that
    # says nothing, and a pipe nobody reads would stop a server that logs once its 64 KiB are full.
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines_into, args=(proc.stderr, lines), daemon=True).start()
    said, deadline = "", time.monotonic() + wait
    while " on 127.0.0.1:" not in said:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:  # the deadline, or the end of its stderr
            proc.kill()
            proc.wait(timeout=30)
            exit_code = proc.returncode
            raise AssertionError(f"`reward serve` named no address within {wait:g} s (exit {exit_code}): {said!r}")
        said = line
    return proc, said.rsplit(" on ", 1)[1].strip()


def _lines_into(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    """Each line of `stream` into `lines`, then None at its end."""
    for line in stream or ():
        lines.put(line)
    lines.put(None)
