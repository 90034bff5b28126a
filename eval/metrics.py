"""IR metrics through ir-measures (pytrec_eval underneath): nDCG@10, RR@10 (MRR@10), R@100."""

from __future__ import annotations

import ir_measures
from ir_measures import RR, R, nDCG

MEASURES = {"nDCG@10": nDCG @ 10, "RR@10": RR @ 10, "R@100": R @ 100}

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}, higher is better


def evaluate(qrels: dict[str, dict[str, int]], run: Run) -> dict[str, float]:
    """Mean of each measure over the queries of `run` (a query with no candidates scores 0)."""
    judged = {qid: qrels[qid] for qid in run if qid in qrels}
    if not judged:
        raise ValueError("no query of the run has qrels")
    # pytrec_eval skips queries missing from the run; keep them, empty, so they count as zero.
    full_run = {qid: run.get(qid) or {} for qid in judged}
    values = ir_measures.calc_aggregate(list(MEASURES.values()), judged, full_run)
    return {name: float(values.get(measure, 0.0)) for name, measure in MEASURES.items()}


def ranked_to_run(ranked: dict[str, list[str]]) -> Run:
    """Ordered doc ids per query -> scores that reproduce the order (ties cannot reorder it)."""
    return {qid: {doc: float(len(docs) - i) for i, doc in enumerate(docs)} for qid, docs in ranked.items()}


def scored_to_run(ranking: dict[str, list[tuple[str, float]]]) -> Run:
    """A ranking with scores (each query's documents best first) -> the run to evaluate: the same scores,
    as written to its run file, so that the figures are those of the file in any tool."""
    return {qid: dict(hits) for qid, hits in ranking.items()}


def per_query(qrels: dict[str, dict[str, int]], run: Run, measure: str = "nDCG@10") -> dict[str, float]:
    """`measure` for each query of `run` that has qrels (a query with no candidates scores 0), in run order."""
    judged = [qid for qid in run if qid in qrels]
    values = {
        m.query_id: float(m.value)
        for m in ir_measures.iter_calc(
            [MEASURES[measure]], {q: qrels[q] for q in judged}, {q: run[q] for q in judged if run[q]}
        )
    }
    return {qid: values.get(qid, 0.0) for qid in judged}
