"""Which checkpoints a stage writes and keeps: `train.keep_checkpoints` of the newest plus the best by dev
nDCG@10, pruned only once the new one is committed; before writing, a check that it fits on the disk
(the last one's size against the free space), with `train.when_disk_full` deciding what a job that has no
room does: `stop` (a clean stop, as on SIGTERM, keeping the previous checkpoint) or `skip` (train on, the
previous checkpoint stays the newest). A write that fails anyway (the disk filled meanwhile) leaves no
half-written folder behind and ends the job with the cause."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from prorank.learner.group import LearnerError
from prorank.run import checkpoints

if TYPE_CHECKING:
    from prorank.driver.loop import Job, Stage

log = logging.getLogger(__name__)

NO_ROOM = "no room for the checkpoint"  # how a stop for want of room begins: the CLI exits 2 on it
HEADROOM = 1.05  # DeepSpeed's files vary a little between steps (its JSON, the scheduler state)


def save_checkpoint(job: Job, stage: Stage, root: Path) -> bool:
    """Write the checkpoint of the learner's current step under `root` and prune the old ones; False when
    it was not written for want of room (the job is then stopping, or skipped it, per `when_disk_full`)."""
    tc, learner = job.cfg.train, stage.learner
    previous = next(iter(checkpoints.steps_on_disk(root)), None)
    if previous is not None:
        need, free = int(checkpoints.size(previous) * HEADROOM), shutil.disk_usage(root).free
        if free < need:
            action = "stopping the job" if tc.when_disk_full == "stop" else "training on without it"
            message = (
                f"{NO_ROOM} of {stage.name} step {learner.steps} under {root}: the last one "
                f"({previous.name}) took {need / 1e6:,.1f} MB, {free / 1e6:,.1f} MB are free; "
                f"{previous.name} is kept; {action} (train.when_disk_full: {tc.when_disk_full})"
            )
            print(message, file=sys.stderr, flush=True)
            if tc.when_disk_full == "stop":
                job.stop(message)
            return False
    try:
        learner.save(root)
    except (LearnerError, OSError) as err:
        shutil.rmtree(Path(root) / f".tmp-step-{learner.steps}", ignore_errors=True)
        free = shutil.disk_usage(root).free
        raise checkpoints.CheckpointError(
            f"checkpoint of {stage.name} step {learner.steps} under {root} not "
            f"written ({free / 1e6:,.1f} MB free there): {err}"
        ) from err
    gone = checkpoints.prune(root, tc.keep_checkpoints, best_checkpoint(job, stage, root))
    if gone:
        log.info("pruned %s", ", ".join(p.name for p in gone))
    return True


def best_checkpoint(job: Job, stage: Stage, root: Path) -> Path | None:
    """The kept step folder whose step has the highest dev nDCG@10 so far on the set `train.best_dev` names
    (None before any)."""
    dev = {row["step"]: row["ndcg@10"] for row in job.run.dev_history(job.dev.best_key)}
    scored = [
        (dev[stage.offset + checkpoints.step_of(p)], p)
        for p in checkpoints.steps_on_disk(root)
        if stage.offset + checkpoints.step_of(p) in dev
    ]
    return max(scored, key=lambda pair: pair[0])[1] if scored else None
