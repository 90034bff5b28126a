"""`prorank eval` over several datasets and models: one report, as the field reports rerankers (a BEIR table).

Reads top to bottom: every dataset, first stage, model and output is checked before any scoring; each
model is loaded and its fusion chosen once (stored with it, or tuned on the held-out training queries of
`data`: never on a dataset it is evaluated on); then per dataset a seeded sample of its queries
(`eval.max_queries`, the same for every system), the first stage, each model alone and fused
(eval/run.py's `evaluate_dataset`), a paired test of every two systems (ranx, as `prorank compare`) and the
run files; last the average of each system over the datasets. Written as JSON, a Markdown table beside it
(`<output>.md`) and TREC runs (`<runs_dir>/<dataset>/<system>.trec`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prorank.corpus.data import BeirDataset, load_dataset
from prorank.eval.compare import compare_in_memory, p_value_records
from prorank.eval.fusion import choose_fusion
from prorank.eval.metrics import evaluate, scored_to_run
from prorank.eval.rerank import first_stage, rerank_depth
from prorank.eval.run import EvalReport, Scorer, check_output_file, evaluate_dataset, write_tensorboard
from prorank.eval.runs import write_run
from prorank.model.models import load_causal_lm, resolve_model
from prorank.model.prompt import check_model_layout
from prorank.run.files import write_whole
from prorank.settings.config import EvalDataset, EvalModel, ProRankConfig
from prorank.settings.config_file import ConfigError

log = logging.getLogger(__name__)
MEASURES = ("nDCG@10", "RR@10", "R@100")


@dataclass
class Benchmark:
    reports: dict[str, EvalReport]  # dataset name -> its report (systems, per-query figures, run rankings)
    p_values: dict[str, list[dict[str, Any]]]  # dataset name -> every two systems' paired test, per measure
    average: dict[str, dict[str, float]]  # system -> measure -> mean over the datasets
    settings: dict[str, Any]

    def first_stage(self, dataset: str) -> str:
        return next(iter(self.reports[dataset].metrics))

    def p_against_first_stage(self, dataset: str, system: str, measure: str = "nDCG@10") -> float | None:
        first = self.first_stage(dataset)
        return next(
            (
                r["p_value"]
                for r in self.p_values[dataset]
                if r["measure"] == measure and {r["run"], r["against"]} == {first, system}
            ),
            None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "datasets": {
                name: {**report.to_json(), "p_values": self.p_values[name]} for name, report in self.reports.items()
            },
            "average": self.average,
            "settings": self.settings,
            "table": markdown_table(self),  # what a model card shows (prorank/release/model_card.py)
        }


def datasets_of(cfg: ProRankConfig) -> list[EvalDataset]:
    """`eval.datasets`, or `data` (with `eval.candidates`) alone."""
    if cfg.eval.datasets:
        return cfg.eval.datasets
    return [EvalDataset(**cfg.data.model_dump(), candidates=cfg.eval.candidates)]


def models_of(cfg: ProRankConfig) -> list[EvalModel]:
    """`eval.models` (with `model.dtype` where they set none), or `model` named "model" when it names one,
    or none (the first stage alone)."""
    if cfg.eval.models:
        return [
            m if "dtype" in m.model_fields_set else m.model_copy(update={"dtype": cfg.model.dtype})
            for m in cfg.eval.models
        ]
    if cfg.model.path or cfg.model.hub_id:
        return [EvalModel(**cfg.model.model_dump(), name="model")]
    return []


def run_benchmark(cfg: ProRankConfig, progress: bool = True) -> Benchmark:
    """Every dataset of `eval.datasets` with every model of `eval.models`, into one report."""
    if cfg.eval.run_out or cfg.eval.all_runs:
        raise ConfigError("with several datasets or models, runs go to eval.runs_dir (--runs-dir), not eval.run_out")
    if cfg.eval.fusion in ("wsum", "rrf") and not models_of(cfg):
        raise ConfigError(f"eval.fusion={cfg.eval.fusion} fuses a model's scores with the first stage's: give a model")
    if cfg.eval.output:
        check_output_file(cfg.eval.output, "eval.output")
        check_output_file(str(markdown_path(cfg.eval.output)), "eval.output (its Markdown table)")
    if cfg.eval.runs_dir:
        check_output_file(str(Path(cfg.eval.runs_dir) / "check.trec"), "eval.runs_dir")
    # Every dataset loaded, sampled and given its candidates before any model is loaded: a bad dataset,
    # rule or run file is an error naming it before the work starts.
    loaded: dict[str, tuple[BeirDataset, list[str], EvalDataset]] = {}
    for index, entry in enumerate(datasets_of(cfg)):
        dataset = load_dataset(entry)
        if dataset.name in loaded:
            raise ConfigError(f"eval.datasets.{index}: a second dataset named {dataset.name!r}; give each a name")
        query_ids = dataset.sample(entry.max_queries or cfg.eval.max_queries, cfg.eval.seed)
        first_stage(cfg, dataset, query_ids, entry.candidates)  # cached: the run file is checked, BM25 built
        loaded[dataset.name] = (dataset, query_ids, entry)
    tuned = cfg.eval.fusion in ("wsum", "rrf")
    for name, (dataset, _, entry) in loaded.items():
        if tuned and is_data(entry, cfg) and dataset.split == cfg.train.split:
            raise ConfigError(
                f"eval.fusion={cfg.eval.fusion} is tuned on held-out {cfg.train.split!r} queries of data, "
                f"and {name} evaluates that split: evaluate another split"
            )
    specs = models_of(cfg)
    if len({m.name for m in specs}) != len(specs):
        raise ConfigError(f"eval.models: two models share a name ({[m.name for m in specs]})")
    for spec in specs:
        check_model_layout(resolve_model(spec), cfg.prompt.layout)

    scorers = []
    for spec in specs:
        source = resolve_model(spec)
        model, tokenizer = load_causal_lm(spec)
        fusion = choose_fusion(cfg.model_copy(update={"model": spec}), model, tokenizer, source, [], progress)
        scorers.append(Scorer(spec.name, model, tokenizer, source, fusion))

    reports, tests = {}, {}
    for name, (dataset, query_ids, entry) in loaded.items():
        log.info("%s: %d of %d queries", name, len(query_ids), len(dataset.query_ids))
        clock = time.perf_counter()
        report = evaluate_dataset(cfg, dataset, query_ids, entry.candidates, scorers, progress)
        report.seconds["total"] = time.perf_counter() - clock
        if len(query_ids) < len(dataset.query_ids):  # how far the sample is from the split: the first stage is cheap
            report.settings["first_stage_all_queries"] = whole_split(cfg, dataset, entry.candidates)
        qrels = {q: dataset.eval_qrels[q] for q in query_ids if q in dataset.eval_qrels}
        tests[name] = p_value_records(compare_in_memory(qrels, {s: scored_to_run(r) for s, r in report.runs.items()}))
        if cfg.eval.runs_dir:
            folder = Path(cfg.eval.runs_dir) / name
            report.settings["run_files"] = {
                s: str(write_run(folder / f"{s}.trec", ranking, f"prorank-{s}")) for s, ranking in report.runs.items()
            }
        if cfg.eval.tensorboard_dir:
            write_tensorboard(report, str(Path(cfg.eval.tensorboard_dir) / name))
        reports[name] = report
    settings = {
        "datasets": list(loaded),
        "models": {
            s.name: {"source": s.source, "fusion": s.fusion.model_dump() if s.fusion else None} for s in scorers
        },
        "max_queries": cfg.eval.max_queries,
        "seed": cfg.eval.seed,
        "bm25_top_k": cfg.bm25.top_k,
        "rerank_depth": rerank_depth(cfg),
        "max_length": cfg.prompt.max_length,
        "test": "student (paired t-test, ranx)",
    }
    bench = Benchmark(reports, tests, average(reports), settings)
    if cfg.eval.output:
        write_report(bench, Path(cfg.eval.output))
    return bench


def whole_split(cfg: ProRankConfig, dataset: BeirDataset, candidates: str | None) -> dict[str, float]:
    """The first stage's measures on every query of the split, beside the sample's."""
    _, ranking, _ = first_stage(cfg, dataset, dataset.query_ids, candidates)
    return evaluate(dataset.eval_qrels, scored_to_run(ranking))


def is_data(entry: EvalDataset, cfg: ProRankConfig) -> bool:
    """Whether a dataset of the report is `data`, the one fusions are tuned on (whatever its split)."""
    if entry.path and cfg.data.path:
        return Path(entry.path).resolve() == Path(cfg.data.path).resolve()
    return bool(entry.hub_id) and entry.hub_id == cfg.data.hub_id


def average(reports: dict[str, EvalReport]) -> dict[str, dict[str, float]]:
    """Each system's mean of each measure over the datasets that have it; the first stage (BM25 or a run
    file, which may differ by dataset) as "first_stage" when the datasets' first stages differ in name."""
    firsts = {next(iter(r.metrics)) for r in reports.values()}
    label = firsts.pop() if len(firsts) == 1 else "first_stage"
    rows: dict[str, list[dict[str, float]]] = {}
    for report in reports.values():
        for i, (system, values) in enumerate(report.metrics.items()):
            rows.setdefault(label if i == 0 else system, []).append(values)
    return {
        system: {m: sum(v[m] for v in values) / len(values) for m in MEASURES}
        for system, values in rows.items()
        if len(values) == len(reports)
    }


def measure_cells(values: dict[str, float]) -> str:
    return " | ".join(f"{values[m]:.4f}" for m in MEASURES)


def markdown_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".md")


def markdown_table(bench: Benchmark) -> str:
    """The report as a Markdown table: per dataset each system's measures, its p-value against the first
    stage on nDCG@10, the queries and seconds (and, for a sample, the first stage on every query of the
    split); then the average over the datasets (of the samples)."""
    lines = [
        "| dataset | system | " + " | ".join(MEASURES) + " | p vs first stage (nDCG@10) | queries | seconds |",
        "|---|---|" + "---:|" * (len(MEASURES) + 3),
    ]
    for name, report in bench.reports.items():
        s = report.settings
        queries = f"{s['queries']} of {s['queries_in_split']}"
        for system, values in report.metrics.items():
            p = bench.p_against_first_stage(name, system)
            shown = "-" if p is None else f"{p:.3g}"
            cells = measure_cells(values)
            took = f"{report.seconds[system]:.0f}" if system in report.seconds else "-"  # fusion: no scoring
            lines.append(f"| {name} {s['split']} | {system} | {cells} | {shown} | {queries} | {took} |")
        if "first_stage_all_queries" in s:
            values, system = s["first_stage_all_queries"], next(iter(report.metrics))
            cells = measure_cells(values)
            every = f"{s['queries_in_split']} of {s['queries_in_split']}"
            lines.append(f"| {name} {s['split']} | {system}, every query | {cells} | | {every} | |")
    n = len(bench.reports)
    for system, values in bench.average.items():
        cells = measure_cells(values)
        lines.append(f"| **average of {n}** | {system} | {cells} | | | |")
    return "\n".join(lines) + "\n"


def write_report(bench: Benchmark, output: Path) -> None:
    """The JSON report and its Markdown table beside it, each written whole or not at all."""
    write_whole(output, json.dumps(bench.to_json(), indent=2) + "\n")
    write_whole(markdown_path(output), markdown_table(bench))
