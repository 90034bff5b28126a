"""Reranking first-stage candidates by a model's relevance score: the scores of each query's top `depth`
candidates (a query's candidates in one batch, the prompt tokens they share encoded once), and the
ranking they make, with the rest of the first-stage list below."""

from __future__ import annotations

import logging

from prorank.corpus.bm25 import Ranking, bm25_name, bm25_search
from prorank.corpus.data import BeirDataset
from prorank.eval.runs import monotone, read_run
from prorank.model.prompt import PromptBuilder, document_text
from prorank.model.scoring import score_query
from prorank.run.progress import progress as progress_bar
from prorank.settings.config import ProRankConfig

log = logging.getLogger(__name__)


def rerank_depth(cfg: ProRankConfig) -> int:
    """How many of each query's first-stage candidates the model reranks."""
    return min(cfg.eval.rerank_depth or cfg.bm25.top_k, cfg.bm25.top_k)


def first_stage(
    cfg: ProRankConfig, dataset: BeirDataset, query_ids: list[str], run_file: str | None
) -> tuple[str, Ranking, str]:
    """(system name, each query's candidates best first, description): BM25 (bm25s), or the TREC run in
    `run_file` (its queries outside `query_ids` left out; a query it lacks has no candidates). Either way
    only what the dataset's rules let a query retrieve (BeirDataset.may_retrieve)."""
    if not run_file:
        return "bm25", bm25_search(dataset, query_ids, cfg.bm25), bm25_name(cfg.bm25)
    run = read_run(run_file, dataset.queries, dataset.corpus)
    run = {q: [(d, s) for d, s in hits if dataset.may_retrieve(q, d)][: cfg.bm25.top_k] for q, hits in run.items()}
    missing = [q for q in query_ids if q not in run]
    if missing:  # as trec_eval counts them: no candidates, every measure 0
        log.warning(
            "%s: no candidates for %d of the %d queries (first: %s); they score 0",
            run_file,
            len(missing),
            len(query_ids),
            missing[0],
        )
    return "first_stage", {q: run.get(q, []) for q in query_ids}, f"run file {run_file}"


def top_runs(ranking: Ranking, depth: int, scores: dict[str, list[float]]) -> tuple[dict, dict]:
    """(first-stage run, model run) of each query's top `depth` candidates, {query: {doc: score}}: what a
    fusion fuses."""
    first = {q: dict(hits[:depth]) for q, hits in ranking.items()}
    model = {q: {d: s for (d, _), s in zip(hits[:depth], scores[q])} for q, hits in ranking.items()}
    return first, model


def model_scores(
    model,
    builder: PromptBuilder,
    dataset: BeirDataset,
    ranking: Ranking,
    depth: int,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, list[float]]:
    """The model's score of each query's top `depth` candidates, in first-stage order. A query's candidates
    are scored together, with the prompt tokens they share encoded once."""
    scores = {}
    bar = progress_bar(sum(min(depth, len(h)) for h in ranking.values()), "scoring pairs", "pair", progress)
    for qid, pairs in candidate_pairs(dataset, ranking, depth).items():
        documents = [d for _, d in pairs]
        scores[qid] = score_query(model, builder, dataset.queries[qid], documents, batch_size) if pairs else []
        bar.update(len(pairs))
    bar.close()
    return scores


def rerank(
    model,
    builder: PromptBuilder,
    dataset: BeirDataset,
    ranking: Ranking,
    depth: int,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Each query's first-stage list with its top `depth` reordered by the model's score (ties keep the
    first-stage order)."""
    return rerank_by_scores(ranking, depth, model_scores(model, builder, dataset, ranking, depth, batch_size, progress))


def candidate_pairs(dataset: BeirDataset, ranking: Ranking, depth: int) -> dict[str, list[tuple[str, str]]]:
    """Each query's top `depth` candidates as (query, document text) pairs, in first-stage order."""
    return {
        qid: [
            (dataset.queries[qid], document_text(dataset.corpus[d].title, dataset.corpus[d].text))
            for d, _ in hits[:depth]
        ]
        for qid, hits in ranking.items()
    }


def scored_ranking(ranking: Ranking, depth: int, scores: dict[str, list[float]]) -> Ranking:
    """Each query's top `depth` reordered by `scores` (one per candidate, in first-stage order; ties keep
    it), the rest of its first-stage list below, with scores that reproduce this order (runs.monotone)."""
    ranked = {}
    for qid, hits in ranking.items():
        top = hits[:depth]
        order = sorted(range(len(top)), key=lambda i: -scores[qid][i])
        ranked[qid] = monotone([(top[i][0], float(scores[qid][i])) for i in order], [d for d, _ in hits[depth:]])
    return ranked


def rerank_by_scores(ranking: Ranking, depth: int, scores: dict[str, list[float]]) -> dict[str, list[str]]:
    """The order of `scored_ranking`, document ids only."""
    return {qid: [d for d, _ in hits] for qid, hits in scored_ranking(ranking, depth, scores).items()}
