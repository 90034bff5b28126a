"""What one training step judges: prompts built from qrels positives and BM25 hard negatives.

Step t's batch is a pure function of (seed, t), so a resumed run sees exactly the data order it would
have seen without the interruption. Some training queries are held out as a dev set and never sampled.
"""

from __future__ import annotations

import random

from prorank.bm25 import Ranking
from prorank.config import TrainConfig
from prorank.data import BeirDataset
from prorank.prompt import document_text
from prorank.rollout import RolloutRequest


class PromptSampler:
    def __init__(self, dataset: BeirDataset, ranking: Ranking, cfg: TrainConfig, relevance_threshold: int = 1):
        self.dataset, self.cfg = dataset, cfg
        self.positives = {qid: sorted(d for d, s in dataset.qrels[qid].items() if s >= relevance_threshold)
                          for qid in dataset.query_ids}
        # Hard negatives: BM25's best-ranked documents that the qrels do not mark relevant.
        self.negatives = {qid: [d for d, _ in ranking.get(qid, [])[: cfg.hard_negative_depth]
                                if dataset.qrels[qid].get(d, 0) < relevance_threshold] for qid in dataset.query_ids}
        usable = [q for q in dataset.query_ids if self.positives[q]]
        if cfg.max_train_queries:
            usable = usable[: cfg.max_train_queries + cfg.dev_queries]
        shuffled = random.Random(cfg.seed).sample(usable, len(usable))
        self.dev_query_ids = sorted(shuffled[: cfg.dev_queries])
        self.train_query_ids = sorted(shuffled[cfg.dev_queries :])
        if not self.train_query_ids:
            raise ValueError(f"no training queries left: {len(usable)} with positives, {cfg.dev_queries} held out")

    def batch(self, step: int, size: int) -> list[RolloutRequest]:
        """`size` prompts for `step`: queries drawn in a step-seeded order, each giving its positives
        and negatives_per_positive hard negatives for each."""
        rng = random.Random(f"{self.cfg.seed}:{step}")
        out: list[RolloutRequest] = []
        while len(out) < size:
            for qid in rng.sample(self.train_query_ids, len(self.train_query_ids)):
                positives = rng.sample(self.positives[qid], min(self.cfg.positives_per_query, len(self.positives[qid])))
                want = round(len(positives) * self.cfg.negatives_per_positive)
                negatives = rng.sample(self.negatives[qid], min(want, len(self.negatives[qid])))
                for doc_id in positives + negatives:
                    doc = self.dataset.corpus[doc_id]
                    out.append(RolloutRequest(f"s{step}-{len(out)}", qid, doc_id, self.dataset.queries[qid],
                                              document_text(doc.title, doc.text)))
                if len(out) >= size:
                    break
        return out[:size]
