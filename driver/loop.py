"""The one stage loop of `prorank train`, read top to bottom, and the Job the stages share.

A stage (driver/warmup_stage.py, driver/score_stage.py) brings its learner and its step: which batch,
which learner call, which figures. Everything around the step is here, written once: control between
steps (`prorank scale`, `prorank stop`, the `train.max_hours` budget), the weights to the actors when
the stage says so, the dev evaluation and checkpoints on their cadence, the busy clock, the run's log and
the progress line; then the final checkpoint and dev figures. Weight versions and the TensorBoard step
run on across stages: a stage's step s is global step `offset + s`.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import ray
from tqdm import tqdm

from prorank.driver.checkpointing import save_checkpoint
from prorank.driver.control import wanted_actors
from prorank.run import checkpoints

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from prorank.actors.pool import ActorPool
    from prorank.corpus.batches import PromptSampler
    from prorank.corpus.data import BeirDataset
    from prorank.driver.dev_eval import DevEval
    from prorank.driver.stop import StopSignals
    from prorank.driver.weight_sync import WeightSync
    from prorank.learner.group import LearnerGroup
    from prorank.reward.client import SyncRewardClient
    from prorank.reward.replica import ReplicaSet
    from prorank.run.tracking import RunLog
    from prorank.settings.config import ProRankConfig

log = logging.getLogger(__name__)


class Stage(Protocol):
    name: str  # "warmup" or "score": the progress bar, the control's report, the checkpoint folder
    steps: int  # the stage's last step
    offset: int  # the global step of the stage's step 0
    dev_every: int  # steps between dev evaluations (0: before and after only)
    checkpoint_every: int  # steps between checkpoints (0: at the end only)
    wait_for_actors: bool  # wait for the dev evaluation's figures before the next step
    learner: LearnerGroup

    def begin(self, step: int) -> None:
        """Once the learner is at `step` (0, or the resumed checkpoint's) and the actors have its weights."""

    def train(self, step: int) -> tuple[dict[str, float], float]:
        """One step: its figures, and the seconds the driver waited on the learner."""

    def sync_due(self, step: int, dev_due: bool) -> bool:
        """Whether the weights after `step` go to the actors now."""

    def synced(self, step: int, metrics: dict[str, float]) -> None:
        """After the weights of `step` were (or were not) sent; may add figures."""

    def end(self, step: int) -> None:
        """After the last step the stage ran (the job may have been stopped early)."""


def run_stage(job: Job, stage: Stage, resume: bool) -> None:
    """Train `stage` to its last step, from its latest checkpoint when resuming."""
    learner, root = stage.learner, checkpoints.stage_root(job.out, stage.name)
    job.sync.attach(learner, job.pool)
    job.placement[f"{stage.name}_learner"] = sorted(set(learner.nodes()))
    step = learner.load(root)["steps"] if resume else 0
    tried = step  # the last step a checkpoint was written (or found no room) at; the resumed one, or 0
    # Resumed, or a stage whose start weights no version of this process has sent yet (the score stage of a
    # job resumed after its warmup; with LoRA the actors then serve the bare base): the actors get them first.
    if step or job.sync.version < stage.offset:
        job.run.log(stage.offset + step, job.sync(stage.offset + step))
    stage.begin(step)

    bar = job.progress_bar(stage.name, step, stage.steps)
    job.clock.restart()
    while step < stage.steps:
        scaled = job.between_steps(stage.name, stage.offset + step)
        if job.stopping:
            break
        figures, learner_seconds = stage.train(step)
        metrics = {**scaled, **figures}
        step += 1
        more = step < stage.steps
        dev_due = bool(stage.dev_every) and step % stage.dev_every == 0 and more
        save_due = bool(stage.checkpoint_every) and step % stage.checkpoint_every == 0 and more
        if stage.sync_due(step, dev_due):  # the actors pull it after the chunks they have in flight
            metrics.update(job.sync(stage.offset + step))
            learner_seconds += metrics["weights/sync_seconds"]
        stage.synced(step, metrics)
        if dev_due:
            job.dev.start()  # queued behind the pull of this version: it measures this step's weights
            if stage.wait_for_actors:
                job.log_dev(wait=True)
        if save_due:
            clock = time.perf_counter()
            save_checkpoint(job, stage, root)
            tried = step
            learner_seconds += time.perf_counter() - clock
        metrics.update(job.clock(learner_seconds))
        job.run.log(stage.offset + step, metrics)
        job.log_dev()
        bar.update(1)
        bar.set_postfix_str(job.run.console_line(), refresh=True)
    bar.close()
    stage.end(step)

    if step != tried:  # a stop right after a checkpoint (or before any step) has its checkpoint already
        save_checkpoint(job, stage, root)
    if job.signals and job.signals.received:  # a scheduler's stop: the step and its checkpoint are done
        job.signals.disarm()
        learner.shutdown()
        return
    job.log_dev(wait=True)  # one still under way
    tc = job.cfg.train
    if stage.name == "score" or "score" not in tc.stages or tc.dev_between_stages:
        job.dev.start()  # the final weights' figures (the last sync was queued before this)
        job.log_dev(wait=True)
    learner.shutdown()  # frees its memory for the next stage's learner


@dataclass
class StopFlag:
    """`prorank stop`, train.max_hours, a signal or a full disk: the stages end after the step under way.
    Made before the job's services, so that a signal while they start is not lost."""

    reason: str = ""  # why, when it is not the end of the last stage; in the summary
    preempted: bool = False  # `prorank stop --preempt`: the CLI exits 143, as on SIGTERM

    def request(self, reason: str) -> None:
        if not self.reason:
            log.info("stopping: %s", reason)
            self.reason = reason


@dataclass
class Job:
    """What the stages share: the config, the data, the running services and the run's log. Built once the
    services are up (driver/job.py); only the warmup's reward service may be absent."""

    cfg: ProRankConfig
    out: Path
    stack: ExitStack  # stops everything started, in reverse order
    dataset: BeirDataset
    ranking: dict[str, list[tuple[str, float]]]  # BM25 hits of every query
    prompts: PromptSampler  # the train/dev query split and warmup batches
    model_path: str  # the weights the actors and the dev evaluation started from
    pool: ActorPool
    sync: WeightSync
    dev: DevEval
    clock: BusyClock
    run: RunLog
    control: ActorHandle  # driver.control.JobControl: `prorank scale actors N` and `prorank stop` write to it
    halt: StopFlag
    rewards: SyncRewardClient | None = None  # while the warmup runs
    replicas: ReplicaSet | None = None  # the reward replicas this job started, while the warmup runs
    signals: StopSignals | None = None  # SIGTERM/SIGINT handling, when the job runs under the CLI
    progress: bool = True
    placement: dict[str, list[str]] = field(default_factory=dict)  # role -> Ray node ids, for the summary

    @property
    def stopping(self) -> bool:
        return bool(self.halt.reason)

    def stop(self, reason: str) -> None:
        """End the job after the step under way, with a checkpoint, as if it had reached its last step."""
        self.halt.request(reason)

    def between_steps(self, stage: str, step: int) -> dict[str, float]:
        """Apply `prorank scale` (or per-node following) to the actor pool and report the job's state."""
        actors = self.cfg.actors
        wanted = wanted_actors(self.control, actors.per_node, actors.resources, self.pool.size)
        if wanted != self.pool.size:
            log.info("step %d: %d -> %d rollout actors", step, self.pool.size, wanted)
            self.pool.scale(wanted)
        if self.replicas and self.rewards and not self.cfg.reward.addresses and (moved := self.replicas.refresh()):
            log.info("step %d: reward replicas now at %s", step, moved)  # one was restarted
            self.rewards.set_addresses(moved)
        self.control.report.remote(
            {"stage": stage, "step": step, "actors": self.pool.size, "versions": self.pool.versions()}
        )
        if asked := ray.get(self.control.stop_requested.remote(), timeout=10):
            self.halt.preempted = asked == "preempt"
            self.stop(f"`prorank stop{' --preempt' if self.halt.preempted else ''}` at step {step}")
        budget = self.cfg.train.max_hours
        if budget and self.run.wall_hours() >= budget:
            self.stop(f"the job clock reached train.max_hours ({budget:.2f} h) at step {step}")
        return {
            "actors/count": float(self.pool.size),
            "actors/ready": float(self.pool.ready),
            "actors/lost": float(self.pool.replaced),
            "rollout/requeued": float(self.pool.requeued),
            "weights/relay_fallbacks": float(self.pool.relay_fallbacks),
        }

    def log_dev(self, wait: bool = False) -> None:
        """Log the dev figures at the step whose weights they measured, once they are in."""
        if (done := self.dev.finished(wait)) is not None:
            self.run.log(*done)

    def progress_bar(self, stage: str, start: int, total: int) -> tqdm:
        bar = tqdm(total=total, initial=start, disable=not self.progress, unit="step", dynamic_ncols=True, desc=stage)
        self.stack.callback(bar.close)
        return bar


class BusyClock:
    """Per step: the wall seconds since the last step ended, and which share of them the learner and the
    actors were busy. Learner seconds are what the driver waited on the ranks: the step, the publish
    (with the actors' pulls queued) and a checkpoint. Actor seconds are the actors' own (generating,
    scoring, pulling weights), summed over actors and divided by their number."""

    def __init__(self, pool: ActorPool):
        self.pool = pool
        self.restart()

    def restart(self) -> None:
        self.mark, self.actor_seconds = time.perf_counter(), self.pool.busy_seconds

    def __call__(self, learner_seconds: float) -> dict[str, float]:
        now, busy = time.perf_counter(), self.pool.busy_seconds
        wall, actor_seconds = now - self.mark, busy - self.actor_seconds
        self.mark, self.actor_seconds = now, busy
        # A chunk counts when it is collected, which may be in the step after the one it ran in: capped at 1.
        return {
            "time/step_seconds": wall,
            "time/learner_seconds": learner_seconds,
            "time/learner_busy_fraction": min(1.0, learner_seconds / wall),
            "time/actor_busy_fraction": min(1.0, actor_seconds / (wall * max(1, self.pool.size))),
        }
