"""Dev evaluation off the critical path: nDCG@10 of the weights the actors serve, on held-out training
queries (their BM25 top-k reranked), scored on a rollout actor while the learner goes on.

The actor scores with vLLM: the logprobs of "0" and "1" at the answer position, whose difference is the
score `prorank eval` computes with transformers (the same prompts; equal within 1e-3 in float32, see
tests/integration/test_actors.py). The call is queued behind the weight pull just sent to that actor, so it
measures that version, and the figures are logged at the step whose weights they measured. The driver
loads no model.
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import RayActorError

from prorank.actors.pool import PoolError
from prorank.eval.metrics import evaluate, ranked_to_run
from prorank.eval.rerank import candidate_pairs, rerank_by_scores

log = logging.getLogger(__name__)


class DevEval:
    def __init__(self, cfg, dataset, ranking, query_ids: list[str], pool):

        self.depth, self.dataset, self.pool = cfg.train.dev_depth, dataset, pool
        self.ranking = {q: ranking[q] for q in query_ids}
        self.enabled = bool(query_ids)
        self.pairs = candidate_pairs(dataset, self.ranking, self.depth)
        self.flat = [p for pairs in self.pairs.values() for p in pairs]
        bm25_order = {q: [d for d, _ in h] for q, h in self.ranking.items()}
        self.bm25 = evaluate(dataset.eval_qrels, ranked_to_run(bm25_order))["nDCG@10"] if query_ids else None
        self.pending, self.actor = None, ""  # the ObjectRef of the evaluation under way, and its actor
        self.lost: set[str] = set()  # actors this evaluation was sent to that died
        self.skipped = 0  # evaluations not started because the previous one was still running

    def start(self) -> None:
        """Score the dev pairs on an actor after the calls already queued to it; returns at once."""
        if not self.enabled:
            return
        if self.pending is not None:
            self.skipped += 1
            log.info("dev evaluation still running; this one is skipped")
            return
        self.lost = set()
        self._send()

    def _send(self) -> None:
        try:
            self.pending, self.actor = self.pool.score(self.flat, exclude=self.lost)
        except PoolError as err:  # every actor is starting (or waiting for a node): the next one is due soon
            self.pending = None
            self.skipped += 1
            log.warning("dev evaluation skipped: %s", err)

    def finished(self, wait: bool = False) -> tuple[int, dict[str, float]] | None:
        """(the weights version measured, its dev figures) once the evaluation under way has finished;
        None while it runs (or when none was started). An actor lost meanwhile: scored again on another."""
        while self.pending is not None:
            done, _ = ray.wait([self.pending], timeout=None if wait else 0)
            if not done:
                return None
            try:
                value = self.pool.scored(ray.get(self.pending))
            except RayActorError as err:
                log.warning(
                    "dev evaluation lost actor %s (%s); scoring again on another", self.actor, type(err).__name__
                )
                self.lost.add(self.actor)
                self._send()
                continue
            self.pending = None
            return value["version"], self._figures(value)
        return None

    def _figures(self, value: dict) -> dict[str, float]:

        scores, at = {}, 0
        for qid, pairs in self.pairs.items():
            scores[qid], at = value["scores"][at : at + len(pairs)], at + len(pairs)
        values = evaluate(self.dataset.eval_qrels, ranked_to_run(rerank_by_scores(self.ranking, self.depth, scores)))
        return {
            "dev/ndcg@10": values["nDCG@10"],
            "dev/mrr@10": values["RR@10"],
            "dev/bm25_ndcg@10": self.bm25,
            "dev/seconds": value["seconds"],
            "dev/skipped": float(self.skipped),
        }
