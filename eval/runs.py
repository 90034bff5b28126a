"""TREC run files in and out: `qid Q0 docid rank score tag`, one line per retrieved document, the format
trec_eval, Pyserini, ranx and ir-measures all read and write.

`read_run` takes any first stage's candidates (BM25 from Pyserini, a dense retriever, ...) for
`prorank eval --candidates`, checking every line before anything is scored; `write_run` writes a ranking
(`--run-out`) atomically, with scores that reproduce its order in every tool.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Container, Sequence
from pathlib import Path

from prorank.corpus.bm25 import Ranking
from prorank.corpus.data import DataError, text_lines

RUN_FORMAT = "qid Q0 docid rank score tag"


class RunFileError(DataError):
    """A run file that cannot be used; the message names the file and line."""


def read_run(path: str | Path, queries: Container[str], corpus: Container[str], top_k: int | None = None) -> Ranking:
    """Each query's candidates in `path`, best first (by score, then by the file's rank), the first `top_k`.

    Every line is checked first: six columns, an integer rank, a finite score, a query id in `queries`
    and a document id in `corpus`, no document twice for a query. The first bad line is a RunFileError
    naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{path}: no such run file")
    rows: dict[str, list[tuple[float, int, str]]] = {}
    seen: set[tuple[str, str]] = set()
    for lineno, line in text_lines(path):
        cols = line.split()
        if not cols:
            continue
        where = f"{path}:{lineno}"
        if len(cols) != 6:
            raise RunFileError(f"{where}: expected 6 columns `{RUN_FORMAT}`, got {len(cols)}")
        qid, _, doc, rank_text, score_text, _ = cols
        try:
            rank = int(rank_text)
        except ValueError:
            raise RunFileError(f"{where}: rank {rank_text!r} is not an integer") from None
        try:
            score = float(score_text)
        except ValueError:
            raise RunFileError(f"{where}: score {score_text!r} is not a number") from None
        if not math.isfinite(score):
            raise RunFileError(f"{where}: score {score_text!r} is not finite")
        if qid not in queries:
            raise RunFileError(f"{where}: unknown query id {qid!r} (not in the dataset's queries)")
        if doc not in corpus:
            raise RunFileError(f"{where}: unknown document id {doc!r} (not in the dataset's corpus)")
        if (qid, doc) in seen:
            raise RunFileError(f"{where}: document {doc!r} appears twice for query {qid!r}")
        seen.add((qid, doc))
        rows.setdefault(qid, []).append((-score, rank, doc))
    if not rows:
        raise RunFileError(f"{path}: no run lines (expected `{RUN_FORMAT}`)")
    return {qid: [(doc, -neg) for neg, _, doc in sorted(hits)[:top_k]] for qid, hits in rows.items()}


def monotone(ranked: list[tuple[str, float]], below: Sequence[str] = ()) -> list[tuple[str, float]]:
    """`ranked` (best first) with each score lowered, where needed, to just under the one above it, then
    the documents of `below` under them all: scores that any tool sorts back into exactly this order
    (trec_eval breaks ties by document id, not by position)."""
    out: list[tuple[str, float]] = []
    for doc, score in ranked:
        if out and score >= out[-1][1]:
            score = out[-1][1] - 1e-6 * max(1.0, abs(out[-1][1]))
        out.append((doc, score))
    floor = out[-1][1] if out else 0.0
    return out + [(doc, floor - 1.0 - j) for j, doc in enumerate(below)]


def write_run(path: str | Path, ranking: Ranking, tag: str) -> Path:
    """Write `ranking` (each query's documents best first, with non-increasing scores) as a TREC run;
    atomically, so that a failed write leaves any earlier file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = "".join(tag.split()) or "prorank"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for qid, hits in ranking.items():
                for rank, (doc, score) in enumerate(hits, 1):
                    f.write(f"{qid} Q0 {doc} {rank} {score:.10g} {tag}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
