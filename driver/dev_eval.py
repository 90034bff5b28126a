"""Dev evaluation off the critical path: nDCG@10 of the weights the actors serve, on held-out training
queries (their BM25 top-k reranked), scored on a rollout actor while the learner goes on.

More dev sets (`train.dev_sets`: a seeded sample of another dataset's queries) go in the same call; each
set's figures are logged under its name (dev/<name>/ndcg@10, the held-out set's under the training data's
name), the first set's also as dev/ndcg@10, which the progress line, the plots and the summary show.
`train.best_dev` names the set whose figure picks the best checkpoint kept.

Beside the rankings, `train.dev_judgments` held-out (query, document) pairs, half of them relevant (a
held-out query's positive, or a hard negative from its BM25 top 30, whatever the stages sample): the
actor answers each greedily, and dev/judgment_accuracy is the share answered with the qrels' label,
dev/judgment_format the share in the reward's format (an answer out of format counts as wrong). What the
warmup teaches.

The actor scores with vLLM: the logprobs of "0" and "1" at the answer position, whose difference is the
score `prorank eval` computes with transformers (the same prompts; equal within 1e-3 in float32, see
tests/integration/test_actors.py). The call is queued behind the weight pull just sent to that actor, so it
measures that version, and the figures are logged at the step whose weights they measured. The driver
loads no model.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError

from prorank.actors.pool import PoolError
from prorank.corpus.batches import JUDGMENT_NEGATIVE_DEPTH, hard_negatives
from prorank.corpus.bm25 import Ranking, bm25_search
from prorank.corpus.data import BeirDataset, load_dataset
from prorank.eval.metrics import evaluate, ranked_to_run
from prorank.eval.rerank import candidate_pairs, rerank_by_scores
from prorank.model.prompt import INVALID, document_text, parse_judgment
from prorank.settings.config_file import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DevSet:
    """One named dev set: its queries' BM25 top `dev_depth` as (query, document) pairs, and BM25's figure."""

    name: str
    dataset: BeirDataset
    ranking: Ranking  # its queries only
    pairs: dict[str, list[tuple[str, str]]]
    bm25: float


def dev_set(name: str, dataset: BeirDataset, ranking: Ranking, query_ids: list[str], depth: int) -> DevSet:
    ranking = {q: ranking[q] for q in query_ids}
    bm25_order = {q: [d for d, _ in h] for q, h in ranking.items()}
    bm25 = evaluate(dataset.eval_qrels, ranked_to_run(bm25_order))["nDCG@10"]
    return DevSet(name, dataset, ranking, candidate_pairs(dataset, ranking, depth), bm25)


def judgment_pairs(
    dataset: BeirDataset, ranking: Ranking, query_ids: list[str], count: int, depth: int, threshold: int, seed: int
) -> tuple[list[tuple[str, str]], list[int]]:
    """Up to `count` balanced (query, document text) pairs of `query_ids` and their labels: each query's
    positives in turn (the first of every query, then the second, ...), each with a seeded hard negative
    from its BM25 top `depth`, until count // 2 positives are taken."""
    rng = random.Random(f"{seed}:judgments")
    positives = {q: sorted(d for d, s in dataset.qrels[q].items() if s >= threshold) for q in query_ids}
    negatives = {q: hard_negatives(ranking, dataset.qrels, q, depth, threshold) for q in query_ids}
    chosen: list[tuple[str, str, int]] = []
    for turn in range(max((len(p) for p in positives.values()), default=0)):
        for q in query_ids:
            if len(chosen) < count - 1 and turn < len(positives[q]) and negatives[q]:
                chosen += [(q, positives[q][turn], 1), (q, rng.choice(negatives[q]), 0)]
    docs = dataset.corpus
    pairs = [(dataset.queries[q], document_text(docs[d].title, docs[d].text)) for q, d, _ in chosen]
    return pairs, [label for _, _, label in chosen]


def load_dev_sets(cfg, held_out: str) -> list[DevSet]:
    """The sets of `train.dev_sets`, each a seeded sample (train.seed) of its queries with their BM25 top
    `train.dev_depth`; an error naming the entry for a name used twice (`held_out` is the first set's) or a
    `train.best_dev` naming no set. Called before the job starts anything."""
    tc, sets = cfg.train, []
    names = [held_out] if tc.dev_queries else []
    for index, entry in enumerate(tc.dev_sets):
        dataset = load_dataset(entry)
        if dataset.name in names:
            raise ConfigError(f"train.dev_sets.{index}: a second dev set named {dataset.name!r}; give it a name")
        names.append(dataset.name)
        query_ids = dataset.sample(entry.queries, tc.seed)
        ranking = bm25_search(dataset, query_ids, cfg.bm25.model_copy(update={"top_k": tc.dev_depth}))
        sets.append(dev_set(dataset.name, dataset, ranking, query_ids, tc.dev_depth))
    if tc.best_dev is not None and tc.best_dev not in names:
        raise ConfigError(f"train.best_dev {tc.best_dev!r} names no dev set (they are: {names})")
    return sets


class DevEval:
    def __init__(self, cfg, dataset, ranking, query_ids: list[str], pool, more: Sequence[DevSet] = ()):
        """The held-out `query_ids` of the training `dataset` (its BM25 `ranking`), then the sets `more`."""
        self.depth, self.pool = cfg.train.dev_depth, pool
        held_out = [dev_set(dataset.name, dataset, ranking, query_ids, self.depth)] if query_ids else []
        self.sets = held_out + list(more)
        self.enabled = bool(self.sets)
        self.flat = [p for s in self.sets for pairs in s.pairs.values() for p in pairs]
        rc, count = cfg.reward, cfg.train.dev_judgments
        self.judge, self.labels = judgment_pairs(
            dataset, ranking, query_ids, count, JUDGMENT_NEGATIVE_DEPTH, rc.relevance_threshold, cfg.train.seed
        )
        self.strict = rc.strict_format  # the reward's format rule
        self.bm25 = self.sets[0].bm25 if self.sets else None  # the first set's, as dev/bm25_ndcg@10
        best = cfg.train.best_dev or (self.sets[0].name if self.sets else "")
        self.best_key = f"dev/{best}/ndcg@10"  # what picks the best checkpoint
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
            self.pending, self.actor = self.pool.score(self.flat, exclude=self.lost, judge=self.judge)
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
        """Each set's figures under its name (the first set's also unnamed), from the scores in `flat`'s order."""
        figures, at = {}, 0
        for index, dev in enumerate(self.sets):
            scores = {}
            for qid, pairs in dev.pairs.items():
                scores[qid], at = value["scores"][at : at + len(pairs)], at + len(pairs)
            ranked = rerank_by_scores(dev.ranking, self.depth, scores)
            values = evaluate(dev.dataset.eval_qrels, ranked_to_run(ranked))
            named = {"ndcg@10": values["nDCG@10"], "mrr@10": values["RR@10"], "bm25_ndcg@10": dev.bm25}
            figures.update({f"dev/{dev.name}/{key}": v for key, v in named.items()})
            if index == 0:
                figures.update({f"dev/{key}": v for key, v in named.items()})
        if self.labels:  # held-out pairs of balanced relevance, answered greedily
            answers = [parse_judgment(text, strict=self.strict) for text in value["judgments"]]
            figures["dev/judgment_accuracy"] = sum(a == y for a, y in zip(answers, self.labels)) / len(self.labels)
            figures["dev/judgment_format"] = sum(a != INVALID for a in answers) / len(self.labels)
        return {**figures, "dev/seconds": value["seconds"], "dev/skipped": float(self.skipped)}
