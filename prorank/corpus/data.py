"""BEIR-format datasets (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) from a local folder or the hub.

Both sources go through the same record parsers, so a bad row gets the same clear error either way:
the message names the file (or hub repository) and the line (or row).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from prorank.settings.config import DataConfig

log = logging.getLogger(__name__)

Record = tuple[str, dict[str, Any]]  # (where it came from, e.g. "corpus.jsonl:12", the row)


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says which file and line."""


# Collections whose queries are documents of their own corpus, under the same id: BEIR's evaluation drops
# a retrieved document whose id is the query's (`ignore_identical_ids`), and so does everything here that
# retrieves from them. `data.ignore_identical_ids` overrides it for any collection.
IDENTICAL_IDS_IGNORED = frozenset({"arguana", "quora"})


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    title: str
    text: str


@dataclass
class BeirDataset:
    """One split of a BEIR dataset. `qrels[query_id][doc_id]` is the graded label."""

    name: str
    split: str
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # what training and the reward use: documents in the corpus only
    source: str = ""
    # A document whose id is the query's own id is never a candidate (data.ignore_identical_ids).
    ignore_identical_ids: bool = False
    # Qrels naming documents that are not in the corpus: never retrievable, yet relevant. Evaluation
    # counts them (`eval_qrels`), as BEIR's evaluation, pytrec_eval and ir_datasets do.
    missing_docs: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def eval_qrels(self) -> dict[str, dict[str, int]]:
        """The split's qrels as published (for metrics): `qrels` plus those naming missing documents."""
        if not self.missing_docs:
            return self.qrels
        return {q: {**self.qrels.get(q, {}), **self.missing_docs.get(q, {})} for q in self.qrels}

    @property
    def query_ids(self) -> list[str]:
        """The split's queries, in qrels file order."""
        return list(self.qrels)

    def may_retrieve(self, query_id: str, doc_id: str) -> bool:
        """Whether `doc_id` may be a candidate for `query_id`: not the query's own id where the rule holds."""
        return not (self.ignore_identical_ids and query_id == doc_id)

    def sample(self, n: int | None, seed: int) -> list[str]:
        """`n` of the split's queries drawn by `seed` (all of them when `n` is None or larger), in qrels order:
        the same seed and split give the same sample."""
        ids = self.query_ids
        if n is None or n >= len(ids):
            return ids
        chosen = set(random.Random(seed).sample(ids, n))
        return [q for q in ids if q in chosen]

    @cached_property
    def fingerprint(self) -> str:
        """A content hash of corpus and queries: the cache key of anything derived from them."""
        h = hashlib.sha256()
        for doc in self.corpus.values():
            h.update(f"{doc.doc_id}\x00{doc.title}\x00{doc.text}\x01".encode())
        for qid, text in self.queries.items():
            h.update(f"{qid}\x00{text}\x01".encode())
        return h.hexdigest()[:20]


# ---------------------------------------------------------------- record parsers (shared by sources)


def _text_field(where: str, row: dict[str, Any], key: str) -> str:
    value = row.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _row_id(where: str, row: dict[str, Any]) -> str:
    if "_id" not in row:
        raise DataError(f"{where}: missing '_id'")
    value = row["_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '_id' must be a non-empty string, got {value!r}")
    return value


def parse_corpus(records: Iterable[Record], label: str, strict: bool = False) -> dict[str, Document]:
    """Documents by id. One with an empty title and text is kept (it is indexed, never retrieved) and
    counted in one warning; with `strict` it is an error naming file and line."""
    corpus: dict[str, Document] = {}
    first_seen: dict[str, str] = {}
    empty: list[str] = []
    for where, row in records:
        doc_id = _row_id(where, row)
        if doc_id in corpus:
            raise DataError(f"{where}: duplicate document id {doc_id!r} (first at {first_seen[doc_id]})")
        title, text = _text_field(where, row, "title"), _text_field(where, row, "text")
        if not title.strip() and not text.strip():
            if strict:
                raise DataError(f"{where}: document {doc_id!r} has an empty title and text (data.strict)")
            empty.append(where)
        corpus[doc_id] = Document(doc_id, title.strip(), text.strip())
        first_seen[doc_id] = where
    if not corpus:
        raise DataError(f"{label}: corpus is empty")
    if empty:
        log.warning(
            "%s: %d document(s) with an empty title and text kept (first at %s); data.strict=true refuses them",
            label,
            len(empty),
            empty[0],
        )
    return corpus


def parse_queries(records: Iterable[Record], label: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    for where, row in records:
        qid = _row_id(where, row)
        if qid in queries:
            raise DataError(f"{where}: duplicate query id {qid!r}")
        text = _text_field(where, row, "text").strip()
        if not text:
            raise DataError(f"{where}: query {qid!r} has an empty text")
        queries[qid] = text
    if not queries:
        raise DataError(f"{label}: no queries")
    return queries


def parse_qrels(
    records: Iterable[Record], corpus: dict[str, Document], queries: dict[str, str], label: str, strict: bool = False
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(qrels of documents in the corpus, qrels of documents missing from it). A qrel naming an unknown
    query is dropped (nothing can be ranked for it); both cases are counted in one warning, or, with
    `strict`, the first is an error naming file and line."""
    qrels: dict[str, dict[str, int]] = {}
    missing: dict[str, dict[str, int]] = {}
    unknown_queries, first = 0, ""
    for where, row in records:
        qid, did, raw_score = str(row["query-id"]).strip(), str(row["corpus-id"]).strip(), row["score"]
        try:
            score = int(raw_score)
        except (TypeError, ValueError):
            raise DataError(f"{where}: score {raw_score!r} is not an integer") from None
        if qid not in queries or did not in corpus:
            what = f"unknown query {qid!r}" if qid not in queries else f"unknown document {did!r}"
            if strict:
                raise DataError(f"{where}: qrel names {what} (data.strict)")
            first = first or f"{where}: {what}"
        if qid not in queries:
            unknown_queries += 1
            continue
        if did in qrels.setdefault(qid, {}) or did in missing.get(qid, {}):
            raise DataError(f"{where}: duplicate qrel for query {qid!r}, document {did!r}")
        if did in corpus:
            qrels[qid][did] = score
        else:
            missing.setdefault(qid, {})[did] = score
    if not qrels:
        raise DataError(f"{label}: no qrels")
    if first:
        n_missing = sum(map(len, missing.values()))
        log.warning(
            "%s: %d qrel(s) name documents not in the corpus (kept for evaluation as relevant documents "
            "never retrieved, not used for training), %d name unknown queries (dropped); first: %s; "
            "data.strict=true refuses them",
            label,
            n_missing,
            unknown_queries,
            first,
        )
    return qrels, missing


# ---------------------------------------------------------------- local folder


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is a DataError naming file, line and column."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None


def jsonl_records(path: Path) -> Iterator[Record]:
    """(where, row) of each JSON object line of `path`; a malformed line is a DataError naming file and line."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _tsv_qrels_records(path: Path) -> Iterator[Record]:
    for lineno, line in text_lines(path):
        cols = next(csv.reader([line.rstrip("\r\n")], delimiter="\t"), [])
        if not cols or not "".join(cols).strip():
            continue
        where = f"{path}:{lineno}"
        if lineno == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # BEIR's header line
        if len(cols) == 4:  # TREC layout: qid, iteration, docid, score
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise DataError(f"{where}: expected 3 tab-separated columns, got {len(cols)}")
        yield where, {"query-id": cols[0], "corpus-id": cols[1], "score": cols[2]}


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    return path


def load_corpus(folder: str | Path, strict: bool = False) -> dict[str, Document]:
    """The documents of a folder's corpus.jsonl alone (a corpus without queries or qrels)."""
    path = _require(Path(folder) / "corpus.jsonl")
    return parse_corpus(jsonl_records(path), str(path), strict)


def load_local(folder: str | Path, split: str, strict: bool = False) -> BeirDataset:
    root = Path(folder)
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise DataError(f"split {split!r} not found: no {qrels_path} (available: {available or 'none'})")
    corpus_path, queries_path = _require(root / "corpus.jsonl"), _require(root / "queries.jsonl")
    corpus = parse_corpus(jsonl_records(corpus_path), str(corpus_path), strict)
    queries = parse_queries(jsonl_records(queries_path), str(queries_path))
    qrels, missing = parse_qrels(_tsv_qrels_records(qrels_path), corpus, queries, str(qrels_path), strict)
    return BeirDataset(root.resolve().name, split, corpus, queries, qrels, source=str(root), missing_docs=missing)


# ---------------------------------------------------------------- Hugging Face hub


def _hub_records(rows: Iterable[dict[str, Any]], label: str) -> Iterator[Record]:
    for i, row in enumerate(rows):
        yield f"{label} row {i}", dict(row)


def load_hub(hub_id: str, split: str, strict: bool = False) -> BeirDataset:
    """`BeIR/<name>` (configs corpus and queries) plus `BeIR/<name>-qrels` (one split per qrels file)."""
    import datasets  # noqa: PLC0415 datasets: heavy, only for hub datasets; heavy import, only for the hub path

    try:
        corpus_rows = datasets.load_dataset(hub_id, "corpus", split="corpus")
        query_rows = datasets.load_dataset(hub_id, "queries", split="queries")
    except Exception as err:  # the hub raises many types; the cause is kept
        raise DataError(f"cannot load {hub_id} (corpus/queries) from the hub: {err}") from err
    qrels_id = f"{hub_id}-qrels"
    try:
        qrels_rows = datasets.load_dataset(qrels_id, split=split)
    except ValueError as err:
        raise DataError(f"split {split!r} not found in {qrels_id}: {err}") from err
    except Exception as err:
        raise DataError(f"cannot load {qrels_id} from the hub: {err}") from err
    labels = (f"hub:{hub_id}/corpus", f"hub:{hub_id}/queries", f"hub:{qrels_id}/{split}")
    corpus = parse_corpus(_hub_records(corpus_rows, labels[0]), labels[0], strict)
    queries = parse_queries(_hub_records(query_rows, labels[1]), labels[1])
    qrels, missing = parse_qrels(_hub_records(qrels_rows, labels[2]), corpus, queries, labels[2], strict)
    return BeirDataset(
        hub_id.rsplit("/", 1)[-1], split, corpus, queries, qrels, source=f"hub:{hub_id}", missing_docs=missing
    )


def load_dataset(cfg: DataConfig) -> BeirDataset:
    """A local folder when `cfg.path` exists, else the hub id; an error if neither can be used. It carries
    the collection's rules and the name `cfg.name` gives it."""
    if cfg.path and Path(cfg.path).is_dir():
        dataset = load_local(cfg.path, cfg.split, cfg.strict)
    elif cfg.hub_id:
        if cfg.path:
            log.info("data.path %s is not a folder: loading %s from the hub", cfg.path, cfg.hub_id)
        dataset = load_hub(cfg.hub_id, cfg.split, cfg.strict)
    else:
        raise DataError(f"data.path {cfg.path!r} is not a folder and no data.hub_id is set")
    rule = cfg.ignore_identical_ids
    dataset.ignore_identical_ids = dataset.name.lower() in IDENTICAL_IDS_IGNORED if rule is None else rule
    dataset.name = cfg.name or dataset.name
    return dataset
