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
import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from prorank.reward.client import groups_from_results
from prorank.reward.scoring import informative
from prorank.run.rollout import RolloutRequest, ScoredGroup

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
        results, regenerated = _fresh(pool, results, requests, self.inbox, step, wc.max_staleness)
        clock = time.perf_counter()
        answers = _score(self.rewards, results)
        reward_seconds = time.perf_counter() - clock
        drawn = Drawn(results, answers, regenerated)
        if wc.dynamic_sampling:
            drawn = self.refill(step, drawn)
        scored, sampling = drawn.batch(self.batch_size, wc.dynamic_sampling_tolerance)
        if sampling["rollout/short_groups"]:
            log.warning(
                "step %d: dynamic sampling found %d informative group(s) of %d after %d extra round(s); "
                "the step trains on them and %d dropped ones",
                step, self.batch_size - sampling["rollout/short_groups"], self.batch_size,
                wc.dynamic_sampling_rounds, sampling["rollout/short_groups"],
            )  # fmt: skip
        self.pending = None
        if wc.mode == "async" and step + 1 < wc.steps:
            self.pending = job.prompts.batch(step + 1, self.batch_size)
            pool.submit(self.pending)  # generated while the learner trains on this step
        train_metrics = self.learner.step(scored)
        metrics = {**_reward_metrics(drawn.answers), **{f"train/{k}": v for k, v in train_metrics.items()}}
        metrics.update(_rollout_metrics(drawn.results, waited, step + 1, drawn.regenerated))
        metrics.update(sampling)
        metrics["time/wait_rewards_seconds"] = reward_seconds
        return metrics, train_metrics["step_seconds"]

    def refill(self, step: int, drawn: Drawn) -> Drawn:
        """Dynamic sampling: fresh prompts for the step until it has `groups_per_step` informative groups
        or `dynamic_sampling_rounds` extra rounds were drawn. Each round draws the groups still missing over
        the share informative so far (at most 4x), and keeps the async staleness bound (`_fresh`)."""
        wc, pool, clock = self.job.cfg.warmup, self.job.pool, time.perf_counter()
        tolerance = wc.dynamic_sampling_tolerance
        while (have := drawn.informative(tolerance)) < self.batch_size and drawn.rounds < wc.dynamic_sampling_rounds:
            share = max(have / len(drawn.results), 0.25)
            requests = self.job.prompts.batch(step, math.ceil((self.batch_size - have) / share), drawn.rounds + 1)
            pool.submit(requests)
            results = _collect(pool, requests, self.inbox)
            results, regenerated = _fresh(pool, results, requests, self.inbox, step, wc.max_staleness)
            drawn.add(results, _score(self.rewards, results), regenerated)
        drawn.seconds = time.perf_counter() - clock
        return drawn

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


def _score(rewards, results: list) -> list:
    """The reward service's answer for every group, in order; an error naming the first group it refused."""
    answers = rewards.score(groups_from_results(results))
    failed = [a for a in answers if a.error]
    if failed:
        raise RuntimeError(
            f"reward service refused {len(failed)} group(s); first: {failed[0].request_id}: {failed[0].error}"
        )
    return answers


def _reward_metrics(answers: list) -> dict[str, float]:
    """The reward figures of every group the step drew (dropped ones included: what the policy answers)."""
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
    return metrics


@dataclass
class Drawn:
    """The groups a step drew (its batch, then dynamic sampling's rounds) and their rewards."""

    results: list
    answers: list
    regenerated: int = 0
    rounds: int = 0  # extra rounds drawn by dynamic sampling
    seconds: float = 0.0  # their seconds

    def add(self, results: list, answers: list, regenerated: int) -> None:
        self.results += results
        self.answers += answers
        self.regenerated += regenerated
        self.rounds += 1

    def totals(self, index: int) -> list[float]:
        return [c.total for c in self.answers[index].rewards]

    def informative(self, tolerance: float) -> int:
        return sum(informative(self.totals(i), tolerance) for i in range(len(self.results)))

    def batch(self, size: int, tolerance: float) -> tuple[list[ScoredGroup], dict[str, float]]:
        """The step's `size` groups: informative ones first, in the order drawn (without dynamic sampling
        the step's own batch, whole), topped up with uninformative ones; and the sampling figures."""
        useful = [i for i in range(len(self.results)) if informative(self.totals(i), tolerance)]
        rest = sorted(set(range(len(self.results))) - set(useful))
        chosen = (useful + rest)[:size] if self.rounds else list(range(size))
        short = max(0, size - len(useful)) if self.rounds else 0
        groups = [ScoredGroup.from_result(self.results[i], self.totals(i)) for i in chosen]
        return groups, {
            "rollout/useful_groups": float(min(len(useful), size)),  # without refills every group drawn is trained on
            "rollout/dropped_share": 1 - len(useful) / len(self.results) if self.rounds else 0.0,
            "rollout/refill_rounds": float(self.rounds),
            "rollout/refill_seconds": self.seconds,
            "rollout/short_groups": float(short),
        }


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
