"""`prorank train` stopped from outside, as a scheduler stops it: SIGTERM ends the step it is in with a
checkpoint of the last finished step (exit 143, the `--resume` command printed) and `--resume` goes on from
it; a checkpoint that would not fit on the disk stops the job and keeps the previous one. (The finished
runs' outputs: tests/integration/test_train_job.py.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from prorank.run import checkpoints
from tests.jobs import job_config, leftovers, start_job, step_lines


def _wait_for_step(proc, metrics: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(m["step"] >= step for m in step_lines(metrics)):
            return
        time.sleep(0.5)
    raise AssertionError(f"the job did not reach step {step}: {proc.poll()=}")


def test_sigterm_ends_the_step_with_a_checkpoint_and_resume_goes_on(tmp_path, answering_model, scifact_dir):
    # Steps of the tiny model take about 0.3 s: 400 of them, so that the signals land mid-run, never after the
    # end. A checkpoint every 5 steps, 2 kept (no dev: no best to keep beside them). One actor: a stop ends
    # every process the job started, however many (the e2e runs of test_train_job have two).
    config = job_config(
        tmp_path,
        answering_model,
        scifact_dir,
        "sync",
        steps=400,
        updates={
            "warmup": {"dev_every": 0},
            "train": {"keep_checkpoints": 2, "stop_grace_seconds": 60},
            "actors": {"num_actors": 1},
        },
    )
    run = tmp_path / "run-sync"
    metrics, root = run / "metrics.jsonl", run / "checkpoints"
    tag = uuid.uuid4().hex
    proc = start_job(config, tag)
    _wait_for_step(proc, metrics, 2)
    # A second job on the same output folder is refused, before it starts anything.
    second = start_job(config, uuid.uuid4().hex)
    refused, _ = second.communicate(timeout=300)
    assert second.returncode == 2 and f"{run} is in use by a running job (pid {proc.pid} on " in refused, refused
    _wait_for_step(proc, metrics, 12)  # past two periodic checkpoints (5, 10 or more): the older are pruned
    proc.send_signal(signal.SIGTERM)  # to the job's process alone, as SLURM's --signal=B:TERM or Kubernetes
    sent = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.monotonic() - sent < 60, output[-4000:]
    assert "SIGTERM received" not in output and "Traceback" not in output, output[-4000:]  # not Ray's stack dump
    assert not leftovers(tag), "processes left running when the job returned after SIGTERM"
    lines = step_lines(metrics)
    last = lines[-1]["step"]
    assert f"stopped by SIGTERM after step {last}:" in output and "--resume" in output, output[-2000:]
    # The checkpoint of the last finished step, written at the stop; 2 kept.
    assert (root / "LATEST").read_text() == f"step-{last}"
    previous = (last - 1) // 5 * 5  # the periodic checkpoint before it (every 5 steps)
    assert sorted(p.name for p in root.glob("step-*")) == sorted([f"step-{last}", f"step-{previous}"])

    # The newest checkpoint damaged (its optimizer state cut short, as by a node crash): --resume names the
    # file, sets the step aside and goes on from the one before, the newest intact one, with the same data order
    # (the batches are a function of the step, as the soak checks against an untouched run). Two signals in
    # a row then end it at once.
    damaged = max((root / f"step-{last}" / "state").rglob("*optim_states.pt"), key=lambda f: f.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    tag = uuid.uuid4().hex
    proc = start_job(config, tag, "--resume")
    deadline = time.monotonic() + 300  # the damaged step set aside: metrics.jsonl holds the new run's lines
    while not (root / f"damaged-step-{last}").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    _wait_for_step(proc, metrics, previous + 1)
    proc.send_signal(signal.SIGINT)  # two of one kind sent at once arrive as one: a SIGTERM follows it
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped at once" in output, output[-4000:]
    warning = f"resuming from {root / f'step-{previous}'}: the newer checkpoint is damaged: {damaged}: 1,000 bytes"
    assert warning in output, output[-3000:]
    assert not leftovers(tag), "processes left running when the job returned after two signals"
    steps = [m["step"] for m in step_lines(metrics)]
    assert steps[: previous + 1] == list(range(1, previous + 2)), steps  # none skipped or repeated
    assert (root / f"damaged-step-{last}").is_dir() and (root / "LATEST").read_text() != f"step-{last}"


def test_a_checkpoint_that_does_not_fit_stops_the_job_and_keeps_the_previous(tmp_path, answering_model, scifact_dir):
    """The output folder on a small tmpfs, shrunk once the first checkpoint is in, so that the next does not
    fit: the job says so, keeps the first intact and stops cleanly (train.when_disk_full: stop)."""

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        config = job_config(
            disk,
            answering_model,
            scifact_dir,
            "sync",
            steps=400,
            updates={"warmup": {"dev_every": 0, "checkpoint_every": 10}, "actors": {"num_actors": 1}},
        )
        root = disk / "run-sync" / "checkpoints"
        tag = uuid.uuid4().hex
        proc = start_job(config, tag)
        deadline = time.monotonic() + 600
        while not (root / "LATEST").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        first = checkpoints.latest(root)
        assert first is not None and first.name == "step-10", proc.poll()
        # The tmpfs shrunk to what is used plus room for half a checkpoint, in one remount: writing a filler
        # instead took seconds on a busy machine, and the job's next checkpoint took the room the filler
        # was counting on (a CI run's ENOSPC). A remount below what is used fails: measured again, bounded.
        for _ in range(5):
            size = shutil.disk_usage(disk).used + checkpoints.size(first) // 2
            if not subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], capture_output=True).returncode:
                break
        else:
            raise AssertionError(f"the tmpfs at {disk} could not be shrunk to {size} bytes")
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, output[-4000:]
        assert "no room for the checkpoint of warmup step 20" in output and "step-10 is kept" in output, output[-3000:]
        assert "--resume" in output and "Traceback" not in output, output[-3000:]
        assert not leftovers(tag), "processes left running when the job returned its error"
        assert checkpoints.latest(root) == first and checkpoints.problems(first) == []
        assert [p.name for p in checkpoints.steps_on_disk(root)] == ["step-10"]
        assert not list(root.glob(".tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
