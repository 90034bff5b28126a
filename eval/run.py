"""`prorank eval`: first-stage candidates reranked by a model's relevance score, alone and fused with the
first stage's scores, with IR metrics, per-query figures and TREC run files.

Reads top to bottom: load the split, take the first stage (BM25, or `eval.candidates`, any TREC run),
rerank the top `rerank_depth` of each query (the rest keeps its first-stage order below them), fuse on
request (`eval.fusion`, tuned on held-out training queries: eval/fusion.py), evaluate, then report to
JSON, TensorBoard and run files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from prorank.corpus.bm25 import Ranking
from prorank.corpus.data import BeirDataset, load_dataset
from prorank.eval.fusion import choose_fusion
from prorank.eval.metrics import evaluate, per_query, scored_to_run
from prorank.eval.rerank import first_stage, model_scores, rerank_depth, scored_ranking, top_runs
from prorank.eval.runs import monotone, write_run
from prorank.model.models import load_causal_lm, model_context, resolve_model
from prorank.model.prompt import PromptBuilder, check_model_layout
from prorank.release.fusion import FusionSettings, fuse
from prorank.run.files import write_whole
from prorank.settings.config import ProRankConfig
from prorank.settings.config_file import ConfigError


@dataclass
class EvalReport:
    metrics: dict[str, dict[str, float]]  # system ("bm25" or "first_stage", "model", "fused") -> measure -> value
    settings: dict[str, Any]  # JSON: the run's settings, as written to the report
    seconds: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)  # system -> query id -> nDCG@10
    runs: dict[str, Ranking] = field(default_factory=dict)  # system -> its ranking, as written to run files

    def to_json(self) -> dict[str, object]:
        return {
            **self.metrics,
            "settings": self.settings,
            "seconds": self.seconds,
            "per_query": {"nDCG@10": self.per_query},
        }


@dataclass
class Scorer:
    """A model of an evaluation: its name (its systems are `name` alone and `name`+fused; the one model of
    a plain `prorank eval` is "model", fused "fused"), the loaded model, where it came from, its fusion."""

    name: str
    model: Any
    tokenizer: Any
    source: str | None = None
    fusion: FusionSettings | None = None

    @property
    def fused_name(self) -> str:
        return "fused" if self.name == "model" else f"{self.name}+fused"


def run_eval(cfg: ProRankConfig, model=None, tokenizer=None, progress: bool = True) -> EvalReport:
    """The first stage's metrics, plus the model's (and the fused ones) when a model is given or configured."""
    if cfg.eval.fusion in ("wsum", "rrf") and model is None and not (cfg.model.path or cfg.model.hub_id):
        raise ConfigError(f"eval.fusion={cfg.eval.fusion} fuses a model's scores with the first stage's: give a model")
    if cfg.eval.all_runs and not cfg.eval.run_out:
        raise ConfigError("eval.all_runs writes every system's run beside eval.run_out: give eval.run_out (--run-out)")
    for key in ("output", "run_out"):  # an output that cannot be written is refused before the evaluation
        if getattr(cfg.eval, key):
            check_output_file(getattr(cfg.eval, key), f"eval.{key}")
    source = None
    if model is None and (cfg.model.path or cfg.model.hub_id):  # a model trained on another layout: say so now
        source = resolve_model(cfg.model)
        check_model_layout(source, cfg.prompt.layout)
    dataset = load_dataset(cfg.data)
    query_ids = dataset.sample(cfg.eval.max_queries, cfg.eval.seed)
    scorers = []
    if source is not None:
        model, tokenizer = load_causal_lm(cfg.model)
    if model is not None:
        fusion = choose_fusion(cfg, model, tokenizer, source, query_ids, progress)  # before the test scoring
        scorers.append(Scorer("model", model, tokenizer, source, fusion))
    report = evaluate_dataset(cfg, dataset, query_ids, cfg.eval.candidates, scorers, progress)
    write_tensorboard(report, cfg.eval.tensorboard_dir or default_tensorboard_dir(dataset.name, cfg.data.split))
    write_outputs(cfg, report)
    return report


def evaluate_dataset(
    cfg: ProRankConfig,
    dataset: BeirDataset,
    query_ids: list[str],
    candidates: str | None,
    scorers: list[Scorer],
    progress: bool = True,
) -> EvalReport:
    """One dataset's report: the first stage (BM25, or the TREC run `candidates`) on `query_ids`, then each
    scorer's reranking of its top `rerank_depth`, alone and fused by the scorer's fusion (when it has one)."""
    clock = time.perf_counter()
    name, ranking, described = first_stage(cfg, dataset, query_ids, candidates)
    seconds = {name: time.perf_counter() - clock}
    systems: dict[str, Ranking] = {name: {q: monotone(hits) for q, hits in ranking.items()}}
    depth = rerank_depth(cfg)
    settings: dict[str, Any] = {
        "dataset": dataset.name,
        "source": dataset.source,
        "split": dataset.split,
        "queries": len(query_ids),
        "queries_in_split": len(dataset.query_ids),
        "sample_seed": cfg.eval.seed if len(query_ids) < len(dataset.query_ids) else None,
        "ignore_identical_ids": dataset.ignore_identical_ids,
        "first_stage": described,
        "bm25_top_k": cfg.bm25.top_k,
    }
    for scorer in scorers:
        clock = time.perf_counter()
        builder = PromptBuilder.from_config(scorer.tokenizer, cfg.prompt, model_context(scorer.model))
        scores = model_scores(scorer.model, builder, dataset, ranking, depth, cfg.eval.batch_size, progress)
        seconds[scorer.name] = time.perf_counter() - clock
        systems[scorer.name] = scored_ranking(ranking, depth, scores)
        about = {
            "dtype": str(next(scorer.model.parameters()).dtype).removeprefix("torch."),
            "rerank_depth": depth,
            "prompt": builder.settings(),
            "max_length": builder.max_length,
            "pairs": sum(min(depth, len(hits)) for hits in ranking.values()),
        }
        if scorer.source is not None:
            about["model"] = scorer.source
        if scorer.fusion is not None:
            fused = fuse(*top_runs(ranking, depth, scores), scorer.fusion)
            systems[scorer.fused_name] = scored_ranking(
                ranking, depth, {q: [fused[q][d] for d, _ in hits[:depth]] for q, hits in ranking.items()}
            )
            about["fusion"] = scorer.fusion.model_dump()
        if len(scorers) == 1:  # a plain `prorank eval`: the model's settings at the top, as before
            settings.update(about)
        else:
            settings.setdefault("models", {})[scorer.name] = about
    runs = {system: scored_to_run(r) for system, r in systems.items()}
    return EvalReport(
        {s: evaluate(dataset.eval_qrels, run) for s, run in runs.items()},
        settings,
        seconds,
        {s: per_query(dataset.eval_qrels, run) for s, run in runs.items()},
        systems,
    )


def run_paths(run_out: str, systems: list[str], all_runs: bool) -> dict[str, Path]:
    """Where each system's run goes: the last (final) system's at `run_out`; with `all_runs` every other
    one beside it as <stem>.<system><suffix> (runs/test.trec -> runs/test.bm25.trec, runs/test.model.trec)."""
    out = Path(run_out)
    paths = {systems[-1]: out}
    if all_runs:
        paths.update({s: out.with_name(f"{out.stem}.{s}{out.suffix}") for s in systems[:-1]})
    return paths


def write_outputs(cfg: ProRankConfig, report: EvalReport) -> None:
    """The run files (`eval.run_out`) and the JSON report (`eval.output`), each written atomically."""
    if cfg.eval.run_out:
        paths = run_paths(cfg.eval.run_out, list(report.runs), cfg.eval.all_runs)
        for system, path in paths.items():
            write_run(path, report.runs[system], f"prorank-{system}")
        report.settings["run_files"] = {s: str(p) for s, p in paths.items()}
    if cfg.eval.output:
        write_whole(Path(cfg.eval.output), json.dumps(report.to_json(), indent=2) + "\n")


MIN_FREE_BYTES = 4 << 20


def check_output_file(path: str, key: str) -> None:
    """A ConfigError naming `key` when `path` cannot become a file: a folder, under a file, or not writable."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{key} {path} is a directory; give the path of a file to write")
    parent = next((p for p in target.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{key} {path}: {parent} is a file, not a directory")
    if not os.access(target if target.exists() else parent, os.W_OK):
        raise ConfigError(f"{key} {path}: not writable")
    if (free := shutil.disk_usage(parent).free) < MIN_FREE_BYTES:  # a report or run of 300 queries: ~1 MB
        raise ConfigError(f"{key} {path}: no room on the device holding {parent} ({free:,} bytes free)")


def default_tensorboard_dir(dataset: str, split: str) -> str:
    return str(Path("runs") / "eval" / f"{dataset}-{split}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_tensorboard(report: EvalReport, log_dir: str, step: int = 0) -> None:

    with SummaryWriter(log_dir) as writer:
        for system, values in report.metrics.items():
            for name, value in values.items():
                writer.add_scalar(f"eval/{system}/{name}", value, step)
    report.settings["tensorboard_dir"] = log_dir
