"""A synthesis's files: the append-only log of what the actors wrote, and the BEIR folder made from it.

The log (`<output>/generations.jsonl`) gets one line per document, flushed and fsynced as it comes, so a
killed synthesis loses at most the lines in flight: a restart reads the log (a line cut by the kill is
dropped), skips the documents it holds and writes only the rest. `generation.json` holds the settings the
log was written with; a restart with other ones is refused, since the log would mix two writers.

The folder is a BEIR dataset any tool reads: `queries.jsonl` (ids `<prefix>-<doc id>-<sample>`, checked
against the corpus folder's own query ids), `qrels/train.tsv`, `corpus.jsonl` a relative link to the corpus
(referenced, not copied) and `synthesis.json`, the report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prorank.corpus.data import DataError, jsonl_records, load_local, parse_queries
from prorank.run.files import write_whole

LOG = "generations.jsonl"
SETTINGS = "generation.json"
REPORT = "synthesis.json"


class GenerationLog:
    """`fill` completes the settings an older log was written with (keys added since, at their defaults), so
    that a new setting left at its default does not refuse a log written before it existed."""

    def __init__(self, output: str | Path, settings: dict, fill: Callable[[dict], dict] = dict):
        self.root = Path(output)
        self.path = self.root / LOG
        self.root.mkdir(parents=True, exist_ok=True)
        settings_path = self.root / SETTINGS
        if settings_path.is_file():
            before = fill(json.loads(settings_path.read_text()))
            changed = sorted(k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k))
            if changed and self.path.is_file() and self.path.stat().st_size:
                raise DataError(
                    f"{self.path} was written with other synthesis settings ({', '.join(changed)}): "
                    "give another synthesis.output, or delete the folder to start over"
                )
        write_whole(settings_path, json.dumps(settings, indent=2) + "\n")
        self._drop_cut_line()

    def _drop_cut_line(self) -> None:
        """A kill in the middle of a write leaves a last line without its newline: cut it off."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())

    def records(self) -> Iterator[dict]:
        if self.path.is_file():
            yield from (row for _, row in jsonl_records(self.path))

    def done(self) -> set[str]:
        return {r["doc_id"] for r in self.records()}

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def read_report(output: str | Path) -> dict:
    """The folder's report, {} when there is none or it cannot be read: it is made from the log, and the next
    synthesis writes it again."""
    path = Path(output) / REPORT
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def reserved_query_ids(corpus_folder: str | Path) -> set[str]:
    """The query ids the corpus folder already uses (none without a queries.jsonl)."""
    path = Path(corpus_folder) / "queries.jsonl"
    return set(parse_queries(jsonl_records(path), str(path))) if path.is_file() else set()


def write_beir_folder(
    output: str | Path,
    corpus_folder: str | Path,
    queries: dict[str, str],
    qrels: dict[str, str],
    report: dict,
    include_split: str | None = None,
) -> Path:
    """`queries` (id -> text) and `qrels` (query id -> its source document) as a BEIR folder beside the
    log, with the real queries and qrels of `include_split` of the corpus folder added when given."""
    root, corpus_folder = Path(output), Path(corpus_folder)
    clash = sorted(set(queries) & reserved_query_ids(corpus_folder))
    if clash:
        raise DataError(
            f"synthetic query ids {clash[:3]} are ids of {corpus_folder / 'queries.jsonl'}: change synthesis.id_prefix"
        )
    rows = [{"_id": q, "text": t} for q, t in queries.items()]
    pairs = [(q, d, 1) for q, d in qrels.items()]
    if include_split:
        real = load_local(corpus_folder, include_split)
        rows += [{"_id": q, "text": real.queries[q]} for q in real.query_ids]
        pairs += [(q, d, s) for q, docs in real.qrels.items() for d, s in docs.items()]
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    write_whole(root / "queries.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_whole(
        root / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in pairs)
    )
    link = root / "corpus.jsonl"
    target = os.path.relpath((corpus_folder / "corpus.jsonl").resolve(), root.resolve())
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
    write_whole(root / REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return root
