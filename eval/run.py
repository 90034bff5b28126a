"""`prorank eval`: BM25 top-k, optionally reranked by a model's relevance score, with IR metrics.

Reads top to bottom: load the split, retrieve, rerank the top `rerank_depth` of each query (the rest
keeps its BM25 order below them), evaluate, then report to JSON and TensorBoard.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from prorank.bm25 import Ranking, bm25_search
from prorank.config import ProRankConfig
from prorank.config_file import ConfigError
from prorank.data import BeirDataset, load_dataset
from prorank.eval.metrics import evaluate, ranked_to_run
from prorank.models import model_context, resolve_model
from prorank.prompt import PromptBuilder, check_model_layout, document_text
from prorank.scoring import score_query


@dataclass
class EvalReport:
    metrics: dict[str, dict[str, float]]  # system ("bm25", "model") -> measure -> value
    settings: dict[str, object]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {**self.metrics, "settings": self.settings, "seconds": self.seconds}


def rerank(
    model, builder: PromptBuilder, dataset: BeirDataset, ranking: Ranking, depth: int,
    batch_size: int = 16, progress: bool = True,
) -> dict[str, list[str]]:
    """Each query's BM25 list with its top `depth` reordered by the model's score (ties keep BM25 order).

    A query's candidates are scored together, with the prompt tokens they share encoded once."""
    scores = {}
    bar = tqdm(total=sum(min(depth, len(h)) for h in ranking.values()), desc="scoring pairs", unit="pair",
               disable=not progress)
    for qid, pairs in candidate_pairs(dataset, ranking, depth).items():
        documents = [d for _, d in pairs]
        scores[qid] = score_query(model, builder, dataset.queries[qid], documents, batch_size) if pairs else []
        bar.update(len(pairs))
    bar.close()
    return rerank_by_scores(ranking, depth, scores)


def candidate_pairs(dataset: BeirDataset, ranking: Ranking, depth: int) -> dict[str, list[tuple[str, str]]]:
    """Each query's top `depth` BM25 candidates as (query, document text) pairs, in BM25 order."""
    return {qid: [(dataset.queries[qid], document_text(dataset.corpus[d].title, dataset.corpus[d].text))
                  for d, _ in hits[:depth]] for qid, hits in ranking.items()}


def rerank_by_scores(ranking: Ranking, depth: int, scores: dict[str, list[float]]) -> dict[str, list[str]]:
    """Each query's top `depth` reordered by `scores` (one per candidate, in BM25 order; ties keep it),
    the rest of its BM25 list below."""
    ranked = {}
    for qid, hits in ranking.items():
        top = hits[:depth]
        order = sorted(range(len(top)), key=lambda i: -scores[qid][i])
        ranked[qid] = [top[i][0] for i in order] + [doc for doc, _ in hits[depth:]]
    return ranked


def run_eval(cfg: ProRankConfig, model=None, tokenizer=None, progress: bool = True) -> EvalReport:
    """BM25 metrics, plus the model's when one is given (or configured in `cfg.model`)."""
    if cfg.eval.output:  # an output that cannot be written is refused before the evaluation, not after it
        check_output_file(cfg.eval.output, "eval.output")
    if model is None and (cfg.model.path or cfg.model.hub_id):  # a model trained on another layout: say so now
        check_model_layout(resolve_model(cfg.model), cfg.prompt.layout)
    clock = time.perf_counter()
    dataset = load_dataset(cfg.data)
    query_ids = dataset.query_ids[: cfg.eval.max_queries]
    ranking = bm25_search(dataset, query_ids, cfg.bm25)
    seconds = {"bm25": time.perf_counter() - clock}
    bm25_order = {qid: [doc for doc, _ in hits] for qid, hits in ranking.items()}
    metrics = {"bm25": evaluate(dataset.eval_qrels, ranked_to_run(bm25_order))}
    depth = min(cfg.eval.rerank_depth or cfg.bm25.top_k, cfg.bm25.top_k)
    settings: dict[str, object] = {
        "dataset": dataset.name, "source": dataset.source, "split": cfg.data.split,
        "queries": len(query_ids), "queries_in_split": len(dataset.query_ids),
        "bm25_top_k": cfg.bm25.top_k,
    }
    if model is None and (cfg.model.path or cfg.model.hub_id):
        from prorank.models import load_causal_lm

        model, tokenizer = load_causal_lm(cfg.model)
        settings["model"] = resolve_model(cfg.model)
    if model is not None:
        clock = time.perf_counter()
        builder = PromptBuilder.from_config(tokenizer, cfg.prompt, model_context(model))
        ranked = rerank(model, builder, dataset, ranking, depth, cfg.eval.batch_size, progress)
        seconds["model"] = time.perf_counter() - clock
        metrics["model"] = evaluate(dataset.eval_qrels, ranked_to_run(ranked))
        settings.update(dtype=str(next(model.parameters()).dtype).removeprefix("torch."), rerank_depth=depth,
                        prompt=builder.settings(), max_length=builder.max_length,
                        pairs=sum(min(depth, len(hits)) for hits in ranking.values()))
    report = EvalReport(metrics, settings, seconds)
    write_tensorboard(report, cfg.eval.tensorboard_dir or default_tensorboard_dir(dataset.name, cfg.data.split))
    if cfg.eval.output:
        Path(cfg.eval.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.eval.output).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


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


def default_tensorboard_dir(dataset: str, split: str) -> str:
    return str(Path("runs") / "eval" / f"{dataset}-{split}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_tensorboard(report: EvalReport, log_dir: str, step: int = 0) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir) as writer:
        for system, values in report.metrics.items():
            for name, value in values.items():
                writer.add_scalar(f"eval/{system}/{name}", value, step)
    report.settings["tensorboard_dir"] = log_dir
