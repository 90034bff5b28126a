"""What one training step sees: prompts built from qrels positives and BM25 hard negatives.

Warmup (stage 1) steps judge single (query, document) prompts; score (stage 2) steps rank one query's
positives against its hard negatives. Step t's batch is a pure function of (seed, t), so a resumed run
sees exactly the data order it would have seen without the interruption. Some training queries are
held out as a dev set and never sampled by either stage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prorank.corpus.bm25 import Ranking, bm25_search
from prorank.corpus.data import BeirDataset, load_dataset
from prorank.model.prompt import PromptBuilder, document_text
from prorank.run.rollout import RolloutRequest
from prorank.settings.config import ProRankConfig, TrainConfig
from prorank.settings.stage_config import ScoreConfig, WarmupConfig

# The dev judgments' negatives come from BM25's top this many, whatever a stage samples: one yardstick for
# every config (driver/dev_eval.py).
JUDGMENT_NEGATIVE_DEPTH = 30


def training_candidates(cfg: ProRankConfig) -> tuple[BeirDataset, Ranking]:
    """The split `prorank train` trains on and its BM25 candidates, deep enough for the warmup's and the
    score stage's negatives and for the dev evaluation (bench/score_step.py draws the job's steps from it)."""
    tc, sc = cfg.train, cfg.score
    dataset = load_dataset(cfg.data.model_copy(update={"split": tc.split}))
    stage_depth = max(cfg.warmup.hard_negative_depth, sc.hard_negative_depth if "score" in tc.stages else 0)
    depth = max(stage_depth, tc.dev_depth, JUDGMENT_NEGATIVE_DEPTH if tc.dev_judgments else 0)
    return dataset, bm25_search(dataset, dataset.query_ids, cfg.bm25.model_copy(update={"top_k": depth}))


@dataclass(slots=True)
class RankingGroup:
    """What a stage-2 (score learning) step trains on: one query's positives and hard negatives."""

    query_id: str
    doc_ids: list[str]
    labels: list[int]  # graded qrels; 0 for a hard negative
    prompt_ids: list[list[int]]  # one prompt per candidate, in the mxbai-rerank-v2 layout


def hard_negatives(ranking: Ranking, qrels: dict, qid: str, depth: int, threshold: int) -> list[str]:
    """BM25's best-ranked documents for `qid` within its top `depth` that the qrels do not mark relevant
    (a grade below `threshold`), best first."""
    return [d for d, _ in ranking.get(qid, [])[:depth] if qrels[qid].get(d, 0) < threshold]


def held_out_split(dataset: BeirDataset, cfg: TrainConfig, relevance_threshold: int = 1) -> tuple[list[str], list[str]]:
    """(dev query ids, training query ids) of the training split: `cfg.dev_queries` of the queries with a
    relevant document, drawn by `cfg.seed`, are held out from both stages. The one definition of that set:
    dev nDCG@10 is measured on it, and fusion weights are tuned on it (prorank/release/fusion.py)."""
    usable = [q for q in dataset.query_ids if any(s >= relevance_threshold for s in dataset.qrels[q].values())]
    if cfg.max_train_queries:
        usable = usable[: cfg.max_train_queries + cfg.dev_queries]
    shuffled = random.Random(cfg.seed).sample(usable, len(usable))
    dev, train = sorted(shuffled[: cfg.dev_queries]), sorted(shuffled[cfg.dev_queries :])
    if not train:
        raise ValueError(f"no training queries left: {len(usable)} with positives, {cfg.dev_queries} held out")
    return dev, train


class PromptSampler:
    def __init__(
        self,
        dataset: BeirDataset,
        ranking: Ranking,
        train: TrainConfig,
        cfg: WarmupConfig,
        relevance_threshold: int = 1,
    ):
        """`train`: the held-out dev split and the seed; `cfg`: what a warmup step samples."""
        self.dataset, self.cfg, self.seed = dataset, cfg, train.seed
        self.positives = {
            qid: sorted(d for d, s in dataset.qrels[qid].items() if s >= relevance_threshold)
            for qid in dataset.query_ids
        }
        self.negatives = {
            qid: hard_negatives(ranking, dataset.qrels, qid, cfg.hard_negative_depth, relevance_threshold)
            for qid in dataset.query_ids
        }
        self.dev_query_ids, self.train_query_ids = held_out_split(dataset, train, relevance_threshold)

    def batch(self, step: int, size: int, refill: int = 0) -> list[RolloutRequest]:
        """`size` prompts for `step`: queries drawn in a step-seeded order, each giving its positives
        and negatives_per_positive hard negatives for each. `refill` r > 0: the r-th draw of fresh prompts
        for the step (dynamic sampling), seeded apart from the step's own, its request ids too."""
        rng = random.Random(f"{self.seed}:{step}" + (f":refill{refill}" if refill else ""))
        tag = f"s{step}" + (f"r{refill}" if refill else "")
        out: list[RolloutRequest] = []
        while len(out) < size:
            for qid in rng.sample(self.train_query_ids, len(self.train_query_ids)):
                positives = rng.sample(self.positives[qid], min(self.cfg.positives_per_query, len(self.positives[qid])))
                want = round(len(positives) * self.cfg.negatives_per_positive)
                negatives = rng.sample(self.negatives[qid], min(want, len(self.negatives[qid])))
                for doc_id in positives + negatives:
                    doc = self.dataset.corpus[doc_id]
                    out.append(
                        RolloutRequest(
                            f"{tag}-{len(out)}",
                            qid,
                            doc_id,
                            self.dataset.queries[qid],
                            document_text(doc.title, doc.text),
                        )
                    )
                if len(out) >= size:
                    break
        return out[:size]


def positive_pairs(dataset: BeirDataset, n: int = 8) -> list[tuple[str, str]]:
    """(query, document text) of the first positive of each of the dataset's first `n` queries."""
    return [
        (dataset.queries[q], dataset.corpus[d].text) for q in dataset.query_ids[:n] for d in list(dataset.qrels[q])[:1]
    ]


def policy_negatives(scores: dict[str, float], positives: list[str], count: int, guard: float) -> tuple[list[str], int]:
    """The `count` non-positive documents the policy scores highest, and how many were skipped because
    they scored more than `guard` above the lowest-scored positive (likely relevant but unjudged).
    `scores`: document id -> score, the positives among them."""
    scored = [scores[d] for d in positives if d in scores]
    floor = min(scored) if scored else None
    ranked = sorted((d for d in scores if d not in positives), key=lambda d: -scores[d])
    kept = [d for d in ranked if floor is None or scores[d] <= floor + guard]
    return kept[:count], len(ranked) - len(kept)


class RankingSampler:
    """Stage-2 batches: per query, its positives (highest grade first) and `negatives` hard negatives
    drawn from BM25's top `hard_negative_depth` minus every judged-relevant document, as token ids; or,
    for a query in `mined`, the negatives the policy ranked highest when it was last mined."""

    def __init__(
        self,
        prompts: PromptSampler,
        ranking: Ranking,
        cfg: ScoreConfig,
        builder: PromptBuilder,
        seed: int = 0,
        relevance_threshold: int = 1,
    ):
        self.dataset, self.cfg, self.builder, self.seed = prompts.dataset, cfg, builder, seed
        qrels = self.dataset.qrels
        negatives = {
            q: hard_negatives(ranking, qrels, q, cfg.hard_negative_depth, relevance_threshold)
            for q in prompts.train_query_ids
        }
        self.query_ids = [q for q in prompts.train_query_ids if negatives[q]]
        if not self.query_ids:
            raise ValueError(f"no training query has a hard negative in its BM25 top {cfg.hard_negative_depth}")
        self.positives = {q: sorted(prompts.positives[q], key=lambda d: -qrels[q][d]) for q in self.query_ids}
        self.negatives = {q: negatives[q] for q in self.query_ids}
        self.threshold = relevance_threshold
        self.mined: dict[str, list[str]] = {}  # query id -> the policy's hardest negatives, hardest first

    def epoch_order(self, epoch: int) -> list[str]:
        """The training queries in epoch `epoch`'s shuffled order."""
        return random.Random(f"{self.seed}:score-epoch:{epoch}").sample(self.query_ids, len(self.query_ids))

    def queries(self, step: int, size: int) -> list[str]:
        """Step `step`'s `size` query ids (global positions step*size ... step*size + size - 1)."""
        n, orders = len(self.query_ids), {}
        for i in range(step * size, step * size + size):  # each epoch's order shuffled once, not per query
            if i // n not in orders:
                orders[i // n] = self.epoch_order(i // n)
        return [orders[i // n][i % n] for i in range(step * size, step * size + size)]

    def batch(self, step: int, size: int) -> list[RankingGroup]:
        """Step `step`'s `size` queries: epochs of every training query once, each in its own shuffled
        order, `size` a step (step t holds the global positions t*size ... t*size + size - 1)."""
        rng = random.Random(f"{self.seed}:score:{step}")
        groups = []
        for qid in self.queries(step, size):
            qrels = self.dataset.qrels[qid]
            positives = self.positives[qid][: self.cfg.positives_per_query]
            negatives = rng.sample(self.negatives[qid], min(self.cfg.negatives, len(self.negatives[qid])))
            if qid in self.mined:  # drawn all the same, so the random stream does not depend on mining
                negatives = self.mined[qid][: self.cfg.negatives]
            doc_ids = positives + negatives
            # Labels: the qrels grade of a positive, 0 for a negative (below the relevance threshold).
            labels = [qrels[d] if qrels.get(d, 0) >= self.threshold else 0 for d in doc_ids]
            query = self.dataset.queries[qid]
            docs = [self.dataset.corpus[d] for d in doc_ids]
            ids = self.builder.encode_batch([(query, document_text(d.title, d.text)) for d in docs])
            groups.append(RankingGroup(qid, doc_ids, labels, ids))
        return groups
