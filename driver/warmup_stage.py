"""Stage 1 of `prorank train`: GRPO prompt warmup, one loop read top to bottom.

Per step t: the prompts of step t (qrels positives and BM25 hard negatives), G judgments each from the
actors, rewards from the reward service, one GRPO step, and the new weights to every actor over gRPC
(version t + 1).

Async mode is one step off-policy: as soon as step t's judgments are in, the actors start on step
t + 1 with the weights they have, while the learner trains on t. Every sample carries the version that
generated it; one older than `train.max_staleness` versions is generated again, and the learner corrects
the rest with truncated importance sampling (`learner.tis_cap`).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace

log = logging.getLogger(__name__)


def run_warmup(job, resume: bool) -> None:
    """Train stage 1 to `train.steps` on `job` (a driver.job.Job), from its checkpoint when resuming."""
    from learner.group import LearnerGroup

    cfg, tc, pool, run, dev = job.cfg, job.cfg.train, job.pool, job.run, job.dev
    root = job.out / "checkpoints"
    learner = LearnerGroup(job.model_path, cfg.learner, cfg.sampling.temperature)
    job.stack.callback(learner.shutdown)
    job.sync.attach(learner)
    job.placement["warmup_learner"] = sorted(set(learner.nodes()))
    step = learner.load(root)["steps"] if resume else 0
    if step:  # resumed: the actors start from the checkpoint's weights
        run.log(step, job.sync(step))
    if not step:
        dev.start()  # the starting weights' figures, on an actor, before its first chunk

    bar = job.progress_bar("warmup", step, tc.steps)
    batch_size = cfg.learner.groups_per_step
    pending, inbox = None, {}  # async: the next step's requests, already with the actors
    job.clock.restart()
    while step < tc.steps:
        scaled = job.between_steps("warmup", step)
        if job.stopping:
            break
        clock = time.perf_counter()
        requests = pending or job.prompts.batch(step, batch_size)
        if not pending:
            pool.submit(requests)
        results = _collect(pool, requests, inbox)
        waited = time.perf_counter() - clock
        pending = None
        if tc.mode == "async" and step + 1 < tc.steps:
            pending = job.prompts.batch(step + 1, batch_size)
            pool.submit(pending)  # generated while the learner trains on this step
        results, regenerated = _fresh(pool, results, requests, inbox, step, tc.max_staleness)

        clock = time.perf_counter()
        scored, reward_metrics = _score(job.rewards, results)
        reward_seconds = time.perf_counter() - clock
        train_metrics = learner.step(scored)
        step += 1
        metrics = {**scaled, **reward_metrics, **{f"train/{k}": v for k, v in train_metrics.items()}}
        metrics.update(_rollout_metrics(results, waited, step, regenerated))
        metrics["time/wait_rewards_seconds"] = reward_seconds
        # The actors pull the new version after the chunks they have in flight; the learner goes on.
        metrics.update(job.sync(step))
        learner_seconds = train_metrics["step_seconds"] + metrics["weights/sync_seconds"]
        metrics["weights/min_actor_version"] = float(min(pool.versions().values(), default=0))
        if tc.dev_every and step % tc.dev_every == 0 and step < tc.steps:
            dev.start()  # queued behind the pull of this version: it measures this step's weights
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
            clock = time.perf_counter()
            learner.save(root)
            learner_seconds += time.perf_counter() - clock
        metrics.update(job.clock(learner_seconds))
        run.log(step, metrics)
        job.log_dev()
        bar.update(1)
        bar.set_postfix_str(run.console_line(), refresh=True)
    bar.close()

    learner.save(root)
    job.log_dev(wait=True)  # one still under way
    dev.start()  # the final weights' figures (the last sync was queued before this)
    job.log_dev(wait=True)
    learner.shutdown()  # frees its memory for the score stage's learner


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
    from prorank.rollout import ScoredGroup
    from reward.client import groups_from_results

    answers = rewards.score(groups_from_results(results))
    failed = [a for a in answers if a.error]
    if failed:
        raise RuntimeError(f"reward service refused {len(failed)} group(s); first: {failed[0].request_id}: "
                           f"{failed[0].error}")
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
    return {"rollout/groups": float(len(results)), "rollout/judgments_per_second": judgments / max(busy, 1e-9),
            "rollout/tokens_per_second": tokens / max(busy, 1e-9),
            "time/wait_rollouts_seconds": waited,
            "rollout/staleness_mean": statistics.fmean(staleness), "rollout/staleness_max": float(max(staleness)),
            "rollout/regenerated": float(regenerated)}


