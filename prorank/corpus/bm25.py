"""First-stage BM25 candidates (bm25s), cached on disk by dataset content and parameters.

Two cache levels: the index (by corpus fingerprint and index parameters) and the ranked lists (by
index key, top-k and the query set). Writes are atomic, so an interrupted run never leaves a cache
entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import Stemmer

from prorank.corpus.data import BeirDataset
from prorank.run.files import write_whole
from prorank.settings.config import BM25Config

log = logging.getLogger(__name__)


def _bm25s():
    """bm25s, imported on first use (scipy: heavy). Its import sets its logger to DEBUG, which would print a
    line at every index built: quieted after it."""
    import bm25s  # noqa: PLC0415 bm25s: heavy (scipy), only first-stage retrieval needs it

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


Ranking = dict[str, list[tuple[str, float]]]  # query id -> [(doc id, score)], best first


def cache_root(cfg: BM25Config) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("PRORANK_CACHE", Path.home() / ".cache" / "prorank")) / "bm25"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _index_key(dataset: BeirDataset, cfg: BM25Config) -> str:
    params = cfg.model_dump(include={"k1", "b", "method", "stemmer", "stopwords"})
    return f"{dataset.name}-{_digest([dataset.fingerprint, params])}"


def _tokenize(texts: list[str], cfg: BM25Config):
    bm25s = _bm25s()
    stemmer = Stemmer.Stemmer(cfg.stemmer) if cfg.stemmer else None
    return bm25s.tokenize(texts, stopwords=cfg.stopwords, stemmer=stemmer, show_progress=False)


def _load_or_build_index(dataset: BeirDataset, cfg: BM25Config, folder: Path):
    bm25s = _bm25s()
    if (folder / "params.index.json").is_file():
        return bm25s.BM25.load(str(folder))
    docs = list(dataset.corpus.values())
    log.info("building BM25 index of %d documents", len(docs))
    retriever = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    retriever.index(_tokenize([f"{d.title} {d.text}".strip() for d in docs], cfg), show_progress=False)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    retriever.save(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return retriever


def bm25_name(cfg: BM25Config) -> str:
    """What a report calls this first stage."""
    return f"bm25s {cfg.method} k1={cfg.k1} b={cfg.b}"


def bm25_search(dataset: BeirDataset, query_ids: list[str], cfg: BM25Config) -> Ranking:
    """Top `cfg.top_k` documents for each query id that the dataset's rules let it retrieve (not the query's
    own id where `ignore_identical_ids` holds), from the cache when it has them."""
    unknown = [q for q in query_ids if q not in dataset.queries]
    if unknown:
        raise KeyError(f"unknown query ids: {unknown[:5]}")
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    index_key = _index_key(dataset, cfg)
    k = min(cfg.top_k, len(dataset.corpus))
    rule = dataset.ignore_identical_ids
    run_path = root / f"{index_key}-run-{_digest([k, query_ids] + ([rule] if rule else []))}.json"
    if run_path.is_file():
        cached = json.loads(run_path.read_text())
        return {qid: [(d, s) for d, s in cached[qid]] for qid in query_ids}

    retriever = _load_or_build_index(dataset, cfg, root / index_key)
    doc_ids = list(dataset.corpus)
    # One more where a query's own document may be among the hits, which the rule then drops.
    indices, scores = retriever.retrieve(
        _tokenize([dataset.queries[q] for q in query_ids], cfg),
        k=min(k + (1 if rule else 0), len(doc_ids)),
        show_progress=False,
    )
    ranking: Ranking = {}
    for qid, idx_row, score_row in zip(query_ids, indices, scores):
        hits = [(doc_ids[int(i)], float(s)) for i, s in zip(idx_row, score_row)]
        ranking[qid] = [(d, s) for d, s in hits if dataset.may_retrieve(qid, d)][:k]
    write_whole(run_path, json.dumps(ranking))
    return ranking
