"""`prorank train`: the stage-1 job (GRPO prompt warmup) on Ray, read top to bottom.

Start-up: Ray (embedded, or joined with `train.ray_address`), the reward replicas, the learner's weight
server, the rollout actors and the learner ranks. Then per step t: the prompts of step t (qrels
positives and BM25 hard negatives), G judgments each from the actors, rewards from the reward service,
one GRPO step, and the new weights to every actor over gRPC (version t + 1).

Async mode is one step off-policy: as soon as step t's judgments are in, the actors start on step
t + 1 with the weights they have, while the learner trains on t. Every sample carries the version that
generated it; one older than `train.max_staleness` versions is generated again, and the learner corrects
the rest with truncated importance sampling (`learner.tis_cap`).

Every `dev_every` steps: nDCG@10 on held-out training queries through the eval code; every
`checkpoint_every` steps a checkpoint that `resume` continues from, with the same data order.
Everything started is stopped in reverse order on success, on Ctrl-C and on error.
"""

from __future__ import annotations

import logging
import os
import secrets
import statistics
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def train(cfg, resume: bool = False, progress: bool = True) -> dict:
    """Run the job described by `cfg` (a validated ProRankConfig); returns the summary it writes."""
    from actors.pool import ActorPool
    from learner.group import LearnerGroup
    from protocol.weight_service import WeightServer
    from prorank.batches import PromptSampler
    from prorank.bm25 import bm25_search
    from prorank.data import load_dataset
    from prorank.models import resolve_model
    from prorank.tracking import RunLog
    from reward.client import SyncRewardClient, client_options
    from reward.replica import start_replicas

    tc = cfg.train
    out = Path(tc.output_dir)
    data_cfg = cfg.data.model_copy(update={"split": tc.split})
    dataset = load_dataset(data_cfg)
    depth = max(tc.hard_negative_depth, tc.dev_depth)
    ranking = bm25_search(dataset, dataset.query_ids, cfg.bm25.model_copy(update={"top_k": depth}))
    sampler = PromptSampler(dataset, ranking, tc, cfg.reward.relevance_threshold)
    model_path = resolve_model(cfg.model)
    token = _job_token(cfg)
    batch_size = cfg.learner.groups_per_step

    with ExitStack() as stack:  # stops everything started, in reverse order, however the run ends
        _start_ray(cfg, stack)
        replicas, addresses = start_replicas(data_cfg, cfg.reward, token)
        stack.callback(_stop_replicas, replicas)
        rewards = SyncRewardClient(cfg.reward.addresses or addresses, token, **client_options(cfg.reward))
        stack.callback(rewards.close)
        w = cfg.weights
        server = WeightServer(token, w.host, w.port, w.tls_cert, w.tls_key, chunk_bytes=int(w.chunk_mb * 2**20)).start()
        stack.callback(server.stop, 0)
        pool = ActorPool(model_path, cfg.actors, cfg.sampling, cfg.prompt, w).start(wait=False)
        stack.callback(pool.shutdown)
        learner = LearnerGroup(model_path, cfg.learner, cfg.sampling.temperature)
        stack.callback(learner.shutdown)
        pool.wait_ready()

        step = learner.load(out / "checkpoints")["steps"] if resume else 0
        run = RunLog(out, start_step=step)
        stack.callback(run.close)
        dev = DevEval(cfg, model_path, dataset, ranking, sampler.dev_query_ids)
        sync = WeightSync(server, pool, learner, token, w)
        if step:  # resumed: the actors start from the checkpoint's weights
            run.log(step, sync(step))
        if dev.enabled and not step:
            run.log(0, dev(None))

        bar = _progress(progress, step, tc.steps)
        stack.callback(bar.close)
        pending, inbox = None, {}  # async: the next step's requests, already with the actors
        while step < tc.steps:
            clock = time.perf_counter()
            requests = pending or sampler.batch(step, batch_size)
            if not pending:
                pool.submit(requests)
            results = _collect(pool, requests, inbox)
            waited = time.perf_counter() - clock
            pending = None
            if tc.mode == "async" and step + 1 < tc.steps:
                pending = sampler.batch(step + 1, batch_size)
                pool.submit(pending)  # generated while the learner trains on this step
            results, regenerated = _fresh(pool, results, requests, inbox, step, tc.max_staleness)

            clock = time.perf_counter()
            scored, reward_metrics = _score(rewards, results)
            reward_seconds = time.perf_counter() - clock
            train_metrics = learner.step(scored)
            step += 1
            metrics = {**reward_metrics, **{f"train/{k}": v for k, v in train_metrics.items()}}
            metrics.update(_rollout_metrics(results, waited, step, regenerated))
            metrics["time/wait_rewards_seconds"] = reward_seconds
            metrics.update(sync(step))
            metrics["weights/min_actor_version"] = float(min(pool.versions().values(), default=0))
            if dev.enabled and tc.dev_every and step % tc.dev_every == 0 and step < tc.steps:
                metrics.update(dev(sync.latest_state))
            run.log(step, metrics)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
                learner.save(out / "checkpoints")
            bar.update(1)
            bar.set_postfix_str(run.console_line(), refresh=True)

        learner.save(out / "checkpoints")
        final = dev(sync.latest_state) if dev.enabled else {}
        if final:
            run.log(step, final)
        summary = {"steps": step, "versions": pool.versions(), "final": run.latest, "dev_bm25": dev.bm25,
                   "output_dir": str(out), "addresses": [server.address, *addresses]}
        (out / "summary.json").write_text(_json(summary))
        return summary


class WeightSync:
    """After a learner step: gather the full weights, publish them as a version, have every actor pull."""

    def __init__(self, server, pool, learner, token: str, cfg):
        self.server, self.pool, self.learner, self.token, self.cfg = server, pool, learner, token, cfg
        self.latest_state = None

    def __call__(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        state, gather = self.learner.full_weights()
        manifest = self.server.publisher.publish(version, state)
        answers = self.pool.sync_weights(self.server.address, self.token, self.cfg.tls_ca, self.cfg.wait_seconds)
        refused = {name: a["error"] for name, a in answers.items() if not a["applied"]}
        if refused:
            raise RuntimeError(f"actors refused weights version {version}: {refused}")
        self.latest_state = state
        return {"weights/sync_seconds": time.perf_counter() - start, "weights/gather_seconds": gather,
                "weights/bytes": float(manifest.total_bytes), "weights/version": float(version)}


class DevEval:
    """nDCG@10 of the current weights on held-out training queries, reranking their BM25 top-k."""

    def __init__(self, cfg, model_path: str, dataset, ranking, query_ids: list[str]):
        from eval.metrics import evaluate, ranked_to_run

        self.cfg, self.model_path, self.dataset = cfg, model_path, dataset
        self.ranking = {q: ranking[q] for q in query_ids}
        self.enabled = bool(query_ids)
        self.model = None
        self.bm25 = (evaluate(dataset.qrels, ranked_to_run({q: [d for d, _ in h] for q, h in self.ranking.items()}))
                     ["nDCG@10"] if query_ids else None)

    def __call__(self, state) -> dict[str, float]:
        import torch

        from eval.metrics import evaluate, ranked_to_run
        from eval.run import rerank
        from prorank.models import load_tokenizer
        from prorank.prompt import PromptBuilder

        if self.model is None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
            self.builder = PromptBuilder(load_tokenizer(self.model_path), self.cfg.prompt.max_length,
                                         self.cfg.prompt.max_query_tokens)
        if state is not None:
            self.model.load_state_dict({k: v.float() for k, v in state.items()})
        start = time.perf_counter()
        ranked = rerank(self.model, self.builder, self.dataset, self.ranking, self.cfg.train.dev_depth,
                        self.cfg.eval.batch_size, progress=False)
        values = evaluate(self.dataset.qrels, ranked_to_run(ranked))
        return {"dev/ndcg@10": values["nDCG@10"], "dev/mrr@10": values["RR@10"], "dev/bm25_ndcg@10": self.bm25,
                "dev/seconds": time.perf_counter() - start}


def _collect(pool, requests: list, inbox: dict) -> list:
    """The results of `requests`, in order; others that arrive meanwhile (the next step's) stay in `inbox`."""
    for result in _poll_until(pool, inbox, {r.request_id for r in requests}):
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
    return {"rollout/judgments_per_second": judgments / max(busy, 1e-9),
            "rollout/tokens_per_second": tokens / max(busy, 1e-9),
            "time/wait_rollouts_seconds": waited,
            "rollout/staleness_mean": statistics.fmean(staleness), "rollout/staleness_max": float(max(staleness)),
            "rollout/regenerated": float(regenerated)}


def _job_token(cfg) -> str:
    """The configured token (file or $PRORANK_TOKEN), else a fresh one that only this job's services know."""
    from prorank.security import TOKEN_ENV, load_token

    if cfg.reward.token_file or cfg.weights.token_file or os.environ.get(TOKEN_ENV):
        return load_token(cfg.reward.token_file or cfg.weights.token_file)
    return secrets.token_urlsafe(32)


def _start_ray(cfg, stack: ExitStack) -> None:
    import ray

    if ray.is_initialized():  # a caller's Ray (a test, a notebook): use it, leave it running
        return
    if cfg.train.ray_address:
        ray.init(address=cfg.train.ray_address, log_to_driver=False)
    else:
        # Enough logical CPUs for every actor the job starts, even on a 2-core machine.
        need = (cfg.actors.num_actors * cfg.actors.num_cpus + cfg.learner.num_ranks * cfg.learner.num_cpus
                + cfg.reward.replicas * cfg.reward.num_cpus)
        cpus = cfg.train.ray_num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stack.callback(ray.shutdown)


def _stop_replicas(replicas: list) -> None:
    import ray

    for replica in replicas:
        try:
            ray.get(replica.stop.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 - it is killed next either way
            log.warning("reward replica did not stop cleanly: %s", err)
        ray.kill(replica)


def _progress(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2, default=float) + "\n"
