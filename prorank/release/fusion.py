"""Fusing the model's scores with the first stage's, by ranx (its normalisation, fusion methods and
parameter search): what `prorank eval` ranks by with `eval.fusion`, what `prorank export` records in
`prorank.json`, and what `Reranker.rank(..., first_stage_scores=...)` applies.

Methods: `wsum`, a weighted sum of min-max normalised scores (weights: first stage, model), and `rrf`,
reciprocal rank fusion (its `k`). Fusion is per query, over the candidates the model scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}, higher is better
Method = Literal["wsum", "rrf"]
NORM = {"wsum": "min-max", "rrf": None}  # rrf reads ranks only
METRIC = "ndcg@10"  # what the parameter search maximises (ranx's name)


class FusionSettings(BaseModel):
    """One fusion, as chosen on held-out training queries (`tuned_on`) and stored with the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    params: dict[str, Any]  # ranx's: {"weights": [first stage, model]} or {"k": 60}
    norm: str | None = None
    tuned_on: dict[str, Any] = Field(default_factory=dict)  # split, query count, first stage, nDCG@10 figures

    def describe(self) -> str:
        if self.method == "wsum":
            first, model = self.params["weights"]
            return f"wsum (min-max normalised): {first:g} x first stage + {model:g} x model"
        return f"rrf: k = {self.params['k']}"


def _ranx_runs(*runs: Run) -> list:
    from ranx import Run as RanxRun  # noqa: PLC0415 ranx: heavy (numba), only fusion and significance need it

    return [
        RanxRun.from_dict({q: dict(docs) for q, docs in run.items()}, name=f"run_{i}") for i, run in enumerate(runs)
    ]


def fuse(first_stage: Run, model: Run, settings: FusionSettings) -> Run:
    """The fused scores of every query (the two runs hold the same queries and documents)."""
    from ranx import fuse as ranx_fuse  # noqa: PLC0415 ranx: heavy (numba), only fusion and significance need it

    if first_stage.keys() != model.keys():
        raise ValueError("fusion needs the same queries in the first-stage and model runs")
    fused = ranx_fuse(
        _ranx_runs(first_stage, model), norm=settings.norm, method=settings.method, params=dict(settings.params)
    )
    return {q: {d: float(s) for d, s in docs.items()} for q, docs in fused.to_dict().items()}


def fuse_lists(first_stage: Sequence[float], model: Sequence[float], settings: FusionSettings) -> list[float]:
    """One query's fused scores, in the order of the given (aligned) score lists."""
    if len(first_stage) != len(model):
        raise ValueError(f"{len(first_stage)} first-stage scores for {len(model)} documents")
    if not model:
        return []
    docs = [str(i) for i in range(len(model))]
    fused = fuse({"q": dict(zip(docs, map(float, first_stage)))}, {"q": dict(zip(docs, map(float, model)))}, settings)[
        "q"
    ]
    return [fused[d] for d in docs]


def tune(
    qrels: dict[str, dict[str, int]], first_stage: Run, model: Run, method: Method, weight_step: float = 0.05
) -> FusionSettings:
    """The parameters of `method` that maximise nDCG@10 over `qrels`' queries (ranx's grid search: weights
    in steps of `weight_step` summing to 1, or k from 10 to 100), with the figures it saw."""
    from ranx import Qrels, evaluate, optimize_fusion  # noqa: PLC0415 ranx: heavy (numba), only fusion and significance need it

    queries = sorted(q for q in model if q in qrels)
    if not queries:
        raise ValueError("no query to tune the fusion on has qrels")
    qrels_x = Qrels.from_dict({q: dict(qrels[q]) for q in queries})
    runs = _ranx_runs({q: first_stage[q] for q in queries}, {q: model[q] for q in queries})
    kwargs = {"step": weight_step} if method == "wsum" else {}
    params = optimize_fusion(
        qrels_x, runs, norm=NORM[method], method=method, metric=METRIC, show_progress=False, **kwargs
    )
    if method == "wsum":
        params = {"weights": [round(float(w), 6) for w in params["weights"]]}
    settings = FusionSettings(method=method, params=params, norm=NORM[method])
    fused = fuse({q: first_stage[q] for q in queries}, {q: model[q] for q in queries}, settings)
    figures = {
        name: float(evaluate(qrels_x, run, METRIC, save_results_in_run=False))
        for name, run in zip(("first_stage", "model", "fused"), [*runs, *_ranx_runs(fused)])
    }
    return settings.model_copy(update={"tuned_on": {"queries": len(queries), "ndcg@10": figures}})
