"""`prorank compare`: TREC runs against one qrels file, by ranx: nDCG@10, RR@10 and R@100 per run, and a
paired significance test (Student's t-test or Fisher's randomisation test) between every two runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prorank.corpus.data import DataError, text_lines
from prorank.eval.runs import RunFileError, read_run

METRICS = {"ndcg@10": "nDCG@10", "mrr@10": "RR@10", "recall@100": "R@100"}  # ranx's name -> ours
Test = Literal["student", "fisher"]


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """A qrels file, TREC (`qid 0 docid grade`, blank-separated) or BEIR (`query-id corpus-id score`, tab-
    separated, with its header line); a bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such qrels file")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in text_lines(path):
        cols = line.split()
        if not cols or (lineno == 1 and cols[0].lower() in ("query-id", "query_id", "qid")):
            continue
        if len(cols) not in (3, 4):
            raise DataError(
                f"{path}:{lineno}: expected `qid 0 docid grade` or `query-id corpus-id score`, got {len(cols)} columns"
            )
        qid, doc, grade = (cols[0], cols[2], cols[3]) if len(cols) == 4 else cols
        try:
            qrels.setdefault(qid, {})[doc] = int(grade)
        except ValueError:
            raise DataError(f"{path}:{lineno}: grade {grade!r} is not an integer") from None
    if not qrels:
        raise DataError(f"{path}: no qrels")
    return qrels


def compare_runs(
    qrels_path: str | Path,
    run_paths: list[str | Path],
    test: Test = "student",
    max_p: float = 0.05,
    names: list[str] | None = None,
):
    """ranx's Report of the runs (named by `names`, else by file stem) on the queries of the qrels: a run's
    query with no line scores 0 there. Run files are checked line by line first (document ids against the
    qrels are not: a run retrieves documents nobody judged)."""
    if len(run_paths) < 2:
        raise RunFileError("compare needs at least two run files")
    qrels = read_qrels(qrels_path)
    names = names or [Path(p).name.removesuffix(".trec").removesuffix(".run") for p in run_paths]
    if len(set(names)) != len(names):
        raise RunFileError(f"two runs share a name: {names} (give --name for each)")
    runs = {}
    for path, name in zip(run_paths, names):
        ranking = read_run(path, _Everything(), _Everything())
        unknown = sorted(set(ranking) - set(qrels))
        if len(unknown) == len(ranking):
            raise RunFileError(f"{path}: none of its queries is in {qrels_path}")
        runs[name] = {q: dict(hits) for q, hits in ranking.items() if q in qrels}
    return compare_in_memory(qrels, runs, test, max_p)


def compare_in_memory(
    qrels: dict[str, dict[str, int]], runs: dict[str, dict[str, dict[str, float]]], test: Test = "student", max_p=0.05
):
    """ranx's Report of `runs` ({name: {query: {doc: score}}}) on every query of `qrels`: a query a run
    lacks scores 0 there, as in trec_eval. What `prorank compare` and the multi-dataset report share."""
    from ranx import Qrels, Run, compare  # noqa: PLC0415 ranx: heavy (numba), only fusion and significance need it

    return compare(
        Qrels.from_dict(qrels),
        [Run.from_dict({q: run.get(q, {}) for q in qrels}, name=name) for name, run in runs.items()],
        metrics=list(METRICS),
        stat_test=test,
        max_p=max_p,
        make_comparable=True,
        rounding_digits=4,
    )


def p_values(report) -> list[tuple[str, str, str, float, bool]]:
    """(run, other run, measure, p-value, significant at the report's max_p) for each pair of runs of a ranx
    Report, in the order the runs were given (the test is two-sided: the pair's order does not matter)."""
    names = report.model_names
    return [
        (a, b, METRICS.get(m, m), float(result["p_value"]), bool(result["significant"]))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        for m, result in report.comparisons[(a, b)].items()
    ]


def p_value_records(report) -> list[dict]:
    """`p_values` as JSON records ({run, against, measure, p_value, significant}; p_value None where ranx
    gives none): what `prorank compare --output` and the multi-dataset report write."""
    return [
        {"run": a, "against": b, "measure": m, "p_value": None if p != p else p, "significant": sig}
        for a, b, m, p, sig in p_values(report)
    ]


class _Everything:
    """Any id is known: compare reads runs of documents the qrels never judged."""

    def __contains__(self, _: object) -> bool:
        return True
