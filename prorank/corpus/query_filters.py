"""The filters between written queries and training data, in the order they run; each can be switched off
(`synthesis.filters`) and each reports how many it let through:

1. well-formed (prorank/corpus/query_writing.py's `malformed`): an answer the writer finished, not empty, within
   the length bounds, not the same words over and over, not a long span copied from its document;
2. duplicates: the same words as a query kept before (anywhere in the corpus);
3. round trip: its source document in the first stage's (BM25's) top `round_trip_k` for it;
4. model score (off by default): the writer's relevance score of (query, source), the top share kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import BeirDataset, Document
from prorank.corpus.query_writing import fold, judge
from prorank.model.prompt import document_text
from prorank.settings.config import BM25Config
from prorank.settings.synth_config import SynthesisConfig

# (query text, document text) pairs -> the model's relevance scores
PairScorer = Callable[[list[tuple[str, str]]], list[float]]


@dataclass(slots=True)
class Candidate:
    query_id: str
    doc_id: str
    text: str  # cleaned
    raw: str  # as written
    rank: int | None = None  # of the source document in the round trip's ranking (1 = first)
    score: float | None = None  # the model-score filter's


@dataclass
class FilterReport:
    written: int = 0
    passed: dict[str, int] = field(default_factory=dict)  # filter -> candidates it let through
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    kept: list[Candidate] = field(default_factory=list)

    def as_dict(self) -> dict:
        stages, before = {}, self.written
        for name, n in self.passed.items():
            stages[name] = {"in": before, "kept": n, "pass_rate": round(n / before, 4) if before else 0.0}
            before = n
        return {
            "written": self.written,
            "kept": len(self.kept),
            "kept_share": round(len(self.kept) / self.written, 4) if self.written else 0.0,
            "filters": stages,
            "dropped": dict(sorted(self.dropped.items())),
        }


def query_id(prefix: str, doc_id: str, sample: int) -> str:
    return f"{prefix}-{doc_id}-{sample}"


def run_filters(
    generations: Iterable[dict],
    corpus: dict[str, Document],
    cfg: SynthesisConfig,
    bm25: BM25Config,
    score_pairs: PairScorer | None = None,
) -> FilterReport:
    """`generations`: the log's records ({"doc_id", "texts", "finish_reasons"}), in the order written."""
    f, report = cfg.filters, FilterReport()
    candidates: list[Candidate] = []
    for record in generations:
        doc = corpus[record["doc_id"]]
        for i, raw in enumerate(record["texts"]):
            report.written += 1
            finish = (record.get("finish_reasons") or [None] * len(record["texts"]))[i]
            text, why = judge(raw, finish, doc, cfg)
            if why:
                report.dropped[why] += 1
                continue
            candidates.append(Candidate(query_id(cfg.id_prefix, doc.doc_id, i), doc.doc_id, text, raw))
    report.passed["well_formed"] = len(candidates)

    if f.dedupe:
        seen: set[str] = set()
        unique = []
        for c in candidates:
            key = fold(c.text)
            if key in seen:
                report.dropped["duplicate"] += 1
                continue
            seen.add(key)
            unique.append(c)
        candidates = unique
        report.passed["dedupe"] = len(candidates)

    if f.round_trip_k and candidates:
        candidates = _round_trip(candidates, corpus, cfg, bm25, report)
        report.passed["round_trip"] = len(candidates)

    if f.model_score_keep is not None and candidates:
        if score_pairs is None:
            raise ValueError("synthesis.filters.model_score_keep needs a model to score the pairs")
        sources = [corpus[c.doc_id] for c in candidates]
        scores = score_pairs([(c.text, document_text(d.title, d.text)) for c, d in zip(candidates, sources)])
        for c, s in zip(candidates, scores):
            c.score = float(s)
        keep = max(1, round(len(candidates) * f.model_score_keep))
        best = sorted(candidates, key=lambda c: -(c.score or 0.0))[:keep]
        chosen = {c.query_id for c in best}
        report.dropped["model_score"] += len(candidates) - len(chosen)
        candidates = [c for c in candidates if c.query_id in chosen]
        report.passed["model_score"] = len(candidates)
    report.kept = candidates
    return report


def _round_trip(
    candidates: list[Candidate],
    corpus: dict[str, Document],
    cfg: SynthesisConfig,
    bm25: BM25Config,
    report: FilterReport,
) -> list[Candidate]:
    """Keep a query whose source document BM25 ranks in its top k over the whole corpus."""
    k = cfg.filters.round_trip_k
    probe = BeirDataset(
        "synthesis-round-trip",
        "synthetic",
        corpus,
        {c.query_id: c.text for c in candidates},
        {c.query_id: {c.doc_id: 1} for c in candidates},
    )
    ranking = bm25_search(probe, [c.query_id for c in candidates], bm25.model_copy(update={"top_k": k}))
    kept = []
    for c in candidates:
        ranked = [d for d, _ in ranking[c.query_id]]
        if c.doc_id in ranked:
            c.rank = ranked.index(c.doc_id) + 1
            kept.append(c)
        else:
            report.dropped["round_trip"] += 1
    return kept
