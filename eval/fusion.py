"""Which fusion `prorank eval` and `prorank export` use, and its tuning on held-out training queries.

The parameters (wsum's weights, rrf's k) are chosen by ranx's grid search on the training split's dev
queries (prorank.corpus.batches.held_out_split: the queries neither stage trained on), reranked exactly as the
evaluation reranks: the same first stage, depth, prompt and model. Test queries never take part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from prorank.corpus.batches import held_out_split
from prorank.corpus.data import load_dataset
from prorank.eval.rerank import first_stage, model_scores, rerank_depth, top_runs
from prorank.model.models import model_context
from prorank.model.prompt import PromptBuilder, model_prompt_settings
from prorank.release.fusion import FusionSettings, Method, tune
from prorank.settings.config import ProRankConfig
from prorank.settings.config_file import ConfigError

log = logging.getLogger(__name__)


def stored_fusion(model_dir: str | None) -> FusionSettings | None:
    """The fusion a model folder was exported with (its prorank.json), if any."""
    stored = model_prompt_settings(model_dir).get("fusion") if model_dir else None
    return FusionSettings(**stored) if stored else None


def choose_fusion(
    cfg: ProRankConfig, model, tokenizer, model_dir: str | None, eval_queries: list[str], progress: bool = True
) -> FusionSettings | None:
    """`eval.fusion`: auto = the model's stored fusion (none without one); none; or wsum / rrf: the stored
    one when it is that method, else tuned now on held-out training queries."""
    method = cfg.eval.fusion
    if method == "none":
        return None
    stored = stored_fusion(model_dir)
    if stored is not None and method in ("auto", stored.method):
        if cfg.eval.candidates and stored.tuned_on.get("first_stage", "").startswith("bm25s"):
            log.warning("the model's fusion was tuned with BM25 candidates; eval.candidates is another first stage")
        return stored
    if method == "auto":
        return None
    return tune_on_held_out(cfg, model, tokenizer, method, eval_queries, progress)


def tune_on_held_out(
    cfg: ProRankConfig, model, tokenizer, method: Method, eval_queries: Sequence[str] = (), progress: bool = True
) -> FusionSettings:
    """`method`'s parameters chosen by ranx on the held-out training queries (`train.dev_queries` of
    `train.split`, as the training job held them out), reranked as `prorank eval` reranks."""
    if cfg.train.dev_queries == 0:
        raise ConfigError(f"eval.fusion={method} is tuned on held-out training queries, but train.dev_queries is 0")
    if cfg.eval.candidates and not cfg.eval.fusion_candidates:
        raise ConfigError(
            "eval.fusion with eval.candidates: give eval.fusion_candidates, the same first stage's "
            f"run on the {cfg.train.split!r} split, to tune the fusion on held-out training queries"
        )
    clock = time.perf_counter()
    dataset = load_dataset(cfg.data.model_copy(update={"split": cfg.train.split}))
    dev, _ = held_out_split(dataset, cfg.train, cfg.reward.relevance_threshold)
    overlap = set(dev) & set(eval_queries) if cfg.data.split == cfg.train.split else set()
    if overlap:
        raise ConfigError(
            f"eval.fusion would be tuned on {len(overlap)} of the queries it is evaluated on "
            f"(data.split and train.split are both {cfg.train.split!r})"
        )
    _, ranking, first = first_stage(cfg, dataset, dev, cfg.eval.fusion_candidates)
    depth = rerank_depth(cfg)
    builder = PromptBuilder.from_config(tokenizer, cfg.prompt, model_context(model))
    scores = model_scores(model, builder, dataset, ranking, depth, cfg.eval.batch_size, progress)
    first_run, model_run = top_runs(ranking, depth, scores)
    settings = tune(dataset.eval_qrels, first_run, model_run, method, cfg.eval.fusion_step)
    # The other method on the same scores costs no scoring: its figure says what choosing it would have given.
    others = {
        other: tune(dataset.eval_qrels, first_run, model_run, other, cfg.eval.fusion_step)
        for other in ("wsum", "rrf")
        if other != method
    }
    tuned_on = {
        **settings.tuned_on,
        "dataset": dataset.name,
        "split": cfg.train.split,
        "first_stage": first,
        "other_methods": {
            m: {"params": o.params, "fused_ndcg@10": o.tuned_on["ndcg@10"]["fused"]} for m, o in others.items()
        },
        "rerank_depth": depth,
        "max_length": builder.max_length,
        "seed": cfg.train.seed,
        "seconds": round(time.perf_counter() - clock, 1),
    }
    log.info("fusion tuned on %d held-out %s queries: %s", len(dev), cfg.train.split, settings.describe())
    return settings.model_copy(update={"tuned_on": tuned_on})
