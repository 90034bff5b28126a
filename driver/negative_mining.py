"""Hard negatives mined by the policy (`score.negatives_from: policy`): in stage 2 nothing samples from
the rollout actors, so every `score.mine_every` steps one of them scores the BM25 top
`hard_negative_depth` of the coming steps' queries with the weights it serves (the dev evaluation's
scoring path), and those queries then train on the non-positives the current model ranks highest
(ANCE-style dynamic negatives) instead of BM25's. Mined negatives live in the sampler, not in the
checkpoint: a resumed run mines again at once.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import RayActorError

from prorank.actors.pool import PoolError
from prorank.corpus.batches import RankingSampler, policy_negatives
from prorank.model.prompt import document_text

log = logging.getLogger(__name__)


class NegativeMiner:
    def __init__(self, sampler: RankingSampler, dataset, ranking, pool, cfg):
        """`cfg`: the ScoreConfig; `ranking`: BM25 hits of every training query, at least hard_negative_depth deep."""
        self.sampler, self.dataset, self.ranking, self.pool, self.cfg = sampler, dataset, ranking, pool, cfg
        self.enabled = cfg.negatives_from == "policy"
        # (ObjectRef, [(query id, [document ids])]) of the mining under way
        self.pending: tuple[Any, list[tuple[str, list[str]]]] | None = None
        self.fresh = True  # nothing mined yet in this process (a resumed run mines at its first step)

    def due(self, step: int) -> bool:
        return self.enabled and self.pending is None and (self.fresh or step % self.cfg.mine_every == 0)

    def start(self, step: int) -> None:
        """Send the queries of steps step ... step + mine_every - 1 to an actor; returns at once."""
        self.fresh = False
        sc, data = self.cfg, self.dataset
        qids = list(dict.fromkeys(self.sampler.queries(step, sc.mine_every * sc.queries_per_step)))
        layout, pairs = [], []
        for qid in qids:
            docs = [d for d, _ in self.ranking[qid][: sc.hard_negative_depth]]
            docs += [d for d in self.sampler.positives[qid] if d not in docs]  # the guard needs their scores
            layout.append((qid, docs))
            pairs += [(data.queries[qid], document_text(data.corpus[d].title, data.corpus[d].text)) for d in docs]
        try:
            ref, _ = self.pool.score(pairs)
        except PoolError as err:  # no actor ready: these queries keep BM25's negatives
            log.warning("negative mining at step %d skipped: %s", step, err)
            return
        self.pending = (ref, layout)

    def collect(self, wait: bool = False) -> dict[str, float]:
        """Take the finished mining in (the sampler's negatives for its queries); its figures, or {}."""
        if self.pending is None:
            return {}
        ref, layout = self.pending
        if not ray.wait([ref], timeout=None if wait else 0)[0]:
            return {}
        self.pending = None
        try:
            value = self.pool.scored(ray.get(ref))
        except RayActorError as err:  # the actor died: its queries keep the negatives they had
            log.warning("negative mining lost its actor (%s)", type(err).__name__)
            return {}
        at, skipped, changed = 0, 0, 0
        for qid, docs in layout:
            scores = dict(zip(docs, value["scores"][at : at + len(docs)]))
            at += len(docs)
            mined, guarded = policy_negatives(
                scores, self.sampler.positives[qid], self.cfg.negatives, self.cfg.mine_guard
            )
            skipped += guarded
            bm25 = [d for d in docs if d in self.sampler.negatives[qid]][: len(mined)]
            changed += len(set(mined) - set(bm25))
            if mined:
                self.sampler.mined[qid] = mined
        kept = sum(len(self.sampler.mined.get(q, [])) for q, _ in layout)
        return {
            "mine/queries": float(len(layout)),
            "mine/pairs": float(at),
            "mine/seconds": value["seconds"],
            "mine/version": float(value["version"]),
            "mine/guard_skipped": float(skipped),
            # how far the policy's hardest negatives are from BM25's top ones (0: the same documents)
            "mine/not_bm25_top_fraction": changed / kept if kept else 0.0,
        }
