"""Stage 1 of `prorank train`: GRPO prompt warmup, what one step does (the loop around it: driver/loop.py).

Per step t: the prompts of step t (qrels positives and BM25 hard negatives), G judgments each from the
actors, rewards from the reward service, one GRPO step, and the new weights to every actor over gRPC
(version t + 1).

Async mode is one step off-policy: as soon as step t's judgments are in, the actors start on step
t + 1 with the weights they have, while the learner trains on t. Every sample carries the version that
generated it; one older than `warmup.max_staleness` versions is generated again, and the learner corrects
the rest with truncated importance sampling (`warmup.tis_cap`).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prorank.reward.client import groups_from_results
from prorank.rollout import RolloutRequest, ScoredGroup

if TYPE_CHECKING:
    from prorank.driver.loop import Job

log = logging.getLogger(__name__)


class WarmupStage:
    """Stage 1 for driver.loop.run_stage: a GRPO learner, and per step the judgments, their rewards and
    one GRPO step. The weights go to the actors after every step (the next step samples from them)."""

    name = "warmup"
    offset = 0
    wait_for_actors = False

    def __init__(self, job: Job):
        from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, torch, which importing this module does not
        from prorank.learner.objectives import GrpoObjective  # noqa: PLC0415 pulls torch, which importing this module does not

        cfg, self.job = job.cfg, job
        if job.rewards is None:  # driver/job.py starts the reward service whenever the warmup runs
            raise ValueError("the warmup stage needs the job's reward service")
        self.rewards = job.rewards
        wc, learner_cfg = cfg.warmup, cfg.warmup_learner()
        self.steps, self.dev_every, self.checkpoint_every = wc.steps, wc.dev_every, wc.checkpoint_every
        objective = GrpoObjective(learner_cfg, cfg.sampling.temperature)
        self.learner = LearnerGroup(job.model_path, learner_cfg, objective, sender=job.sync.sender())
        job.stack.callback(self.learner.shutdown)
        self.batch_size = objective.batch_size
        self.pending: list[RolloutRequest] | None = None  # async: the next step's requests, already with the actors
        self.inbox: dict[str, Any] = {}  # results collected early, by request id

    def begin(self, step: int) -> None:
        if not step:
            self.job.dev.start()  # the starting weights' figures, on an actor, before its first chunk

    def train(self, step: int) -> tuple[dict[str, float], float]:
        job, wc, pool = self.job, self.job.cfg.warmup, self.job.pool
        clock = time.perf_counter()
        requests = self.pending or job.prompts.batch(step, self.batch_size)
        if not self.pending:
            pool.submit(requests)
        results = _collect(pool, requests, self.inbox)
        waited = time.perf_counter() - clock
        self.pending = None
        if wc.mode == "async" and step + 1 < wc.steps:
            self.pending = job.prompts.batch(step + 1, self.batch_size)
            pool.submit(self.pending)  # generated while the learner trains on this step
        results, regenerated = _fresh(pool, results, requests, self.inbox, step, wc.max_staleness)

        clock = time.perf_counter()
        scored, reward_metrics = _score(self.rewards, results)
        reward_seconds = time.perf_counter() - clock
        train_metrics = self.learner.step(scored)
        metrics = {**reward_metrics, **{f"train/{k}": v for k, v in train_metrics.items()}}
        metrics.update(_rollout_metrics(results, waited, step + 1, regenerated))
        metrics["time/wait_rewards_seconds"] = reward_seconds
        return metrics, train_metrics["step_seconds"]

    def sync_due(self, step: int, dev_due: bool) -> bool:
        return True  # the next step samples from the actors: they need this step's weights

    def synced(self, step: int, metrics: dict[str, float]) -> None:
        metrics["weights/min_actor_version"] = float(min(self.job.pool.versions().values(), default=0))

    def end(self, step: int) -> None:
        pass


def _collect(pool, requests: list, inbox: dict) -> list:
    """The results of `requests`, in order; others that arrive meanwhile (the next step's) stay in `inbox`."""
    for result in _poll_until(pool, inbox, {r.request_id for r in requests}):
        if result.request_id in inbox:  # the pool answers each request once: a second answer is a bug
            raise RuntimeError(f"request {result.request_id} was answered twice (by {result.actor})")
        inbox[result.request_id] = result
    return [inbox.pop(r.request_id) for r in requests]


def _poll_until(pool, inbox: dict, wanted: set[str]):
    while not wanted <= inbox.keys():
        yield from pool.poll(timeout=1.0)


def _fresh(pool, results: list, requests: list, inbox: dict, step: int, max_staleness: int) -> tuple[list, int]:
    """Replace groups generated by weights more than `max_staleness` versions behind the learner's."""
    stale = {r.request_id for r in results if step - r.version > max_staleness}
    if not stale:
        return results, 0
    log.info("step %d: %d group(s) older than %d version(s) are generated again", step, len(stale), max_staleness)
    again = [replace(r, request_id=f"{r.request_id}+") for r in requests if r.request_id in stale]
    pool.submit(again)
    redone = iter(_collect(pool, again, inbox))
    return [next(redone) if r.request_id in stale else r for r in results], len(stale)


def _score(rewards, results: list) -> tuple[list, dict[str, float]]:
    """Rewards for every group, as ScoredGroups for the learner, and the reward figures of the step."""

    answers = rewards.score(groups_from_results(results))
    failed = [a for a in answers if a.error]
    if failed:
        raise RuntimeError(
            f"reward service refused {len(failed)} group(s); first: {failed[0].request_id}: {failed[0].error}"
        )
    scored = [ScoredGroup.from_result(r, [c.total for c in a.rewards]) for r, a in zip(results, answers)]
    flat = [c for a in answers for c in a.rewards]
    metrics = {}
    for name in ("total", "format", "relevance"):
        values = [getattr(c, name) for c in flat]
        metrics[f"train/reward/{name}_mean"] = statistics.fmean(values)
        metrics[f"train/reward/{name}_std"] = statistics.pstdev(values)
    valid = [c for c in flat if c.judgment >= 0]
    metrics["train/judgment_accuracy"] = statistics.fmean(c.relevance for c in flat)  # invalid counts as wrong
    metrics["train/judgment_accuracy_valid"] = statistics.fmean(c.relevance for c in valid) if valid else 0.0
    metrics["train/positive_rate"] = statistics.fmean(a.label for a in answers)
    return scored, metrics


def _rollout_metrics(results: list, waited: float, step: int, regenerated: int) -> dict[str, float]:
    judgments = sum(len(r.completions) for r in results)
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    staleness = [step - 1 - r.version for r in results]
    # Throughput while generating: the pool's busy seconds per actor, from each chunk's wall time (in
    # async mode generation overlaps the learner step, so the driver's waiting time says nothing of it).
    chunks = {(r.actor, r.seconds) for r in results}
    busy = sum(seconds for _, seconds in chunks) / max(1, len({actor for actor, _ in chunks}))
    return {
        "rollout/groups": float(len(results)),
        "rollout/judgments_per_second": judgments / max(busy, 1e-9),
        "rollout/tokens_per_second": tokens / max(busy, 1e-9),
        "time/wait_rollouts_seconds": waited,
        "rollout/staleness_mean": statistics.fmean(staleness),
        "rollout/staleness_max": float(max(staleness)),
        "rollout/regenerated": float(regenerated),
    }
