"""The report figures of training runs, from their metrics.jsonl: dev nDCG@10 against the job's wall-clock
hours (several runs on one axis: an equal-clock A/B), and (`rewards=True`) beside it the warmup's reward
curves and dev nDCG@10 by step."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class PlotError(ValueError):
    """A run folder whose metrics cannot be plotted; the message names the file and line."""


def dev_curve(metrics_file: str | Path) -> dict[str, Any]:
    """{"hours", "ndcg", "steps"} of the lines with dev figures, the BM25 reference, and the hour the score
    stage began (None without one). Lines without `time/wall_hours` (runs before it was logged) are refused."""
    path = Path(metrics_file)
    if not path.is_file():
        raise PlotError(f"{path}: no such file (a run folder holds metrics.jsonl)")
    hours, ndcg, steps, bm25, score_start = [], [], [], None, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlotError(f"{path}:{number}: not JSON: {err.msg}") from err
        if "time/wall_hours" not in record:
            raise PlotError(f"{path}:{number}: no time/wall_hours (logged by prorank train since this version)")
        if score_start is None and any(k.startswith("score/") for k in record):
            score_start = record["time/wall_hours"]
        if "dev/ndcg@10" in record:
            hours.append(record["time/wall_hours"])
            ndcg.append(record["dev/ndcg@10"])
            steps.append(record["step"])
            bm25 = record.get("dev/bm25_ndcg@10", bm25)
    if not hours:
        raise PlotError(f"{path}: no dev/ndcg@10 figures (train.dev_queries was 0?)")
    return {"hours": hours, "ndcg": ndcg, "steps": steps, "bm25": bm25, "score_start": score_start}


def reward_curve(metrics_file: str | Path) -> dict[str, list[float]]:
    """{"steps", "total", "format"}: the warmup's mean rewards per step (empty lists without a warmup);
    {"judged_steps", "judgment_accuracy"}: the held-out judgment accuracy of every dev evaluation."""
    steps, total, fmt, judged, accuracy = [], [], [], [], []
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line)
        if "train/reward/total_mean" in record:
            steps.append(record["step"])
            total.append(record["train/reward/total_mean"])
            fmt.append(record.get("train/reward/format_mean", float("nan")))
        if "dev/judgment_accuracy" in record:
            judged.append(record["step"])
            accuracy.append(record["dev/judgment_accuracy"])
    return {"steps": steps, "total": total, "format": fmt, "judged_steps": judged, "judgment_accuracy": accuracy}


def plot_dev_curve(
    runs: Sequence[tuple[str, str | Path]], output: str | Path, title: str = "", rewards: bool = False
) -> Path:
    """Write the PNG: each run's dev nDCG@10 per evaluation (runs: (label, metrics.jsonl), one curve each,
    for A/Bs at equal clock), BM25's on the same queries as a line; with `rewards`, by step, and the
    warmup's reward curves (total and format, max 2 and 1) in a panel before it."""
    import matplotlib  # noqa: PLC0415 matplotlib: heavy, only `prorank plot` draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 matplotlib: heavy, only `prorank plot` draws

    curves = [(label, dev_curve(path)) for label, path in runs]  # every file checked before drawing
    if rewards:
        fig, (left, ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
        left.set_xlabel("warmup step (GRPO)")
        left.set_ylabel("mean reward of the step's judgments")
        left.set_title("stage 1: prompt warmup")
        left.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    several = len(curves) > 1
    for index, ((label, curve), (_, path)) in enumerate(zip(curves, runs)):
        color, name = f"C{index}", f"{label}: " if several else ""
        if rewards:
            warmup = reward_curve(path)
            left.plot(warmup["steps"], warmup["total"], color=color, marker="o", label=f"{name}reward (max 2)")
            left.plot(
                warmup["steps"], warmup["format"], color=color, marker="s", ls="--", label=f"{name}format (max 1)"
            )
            last_warmup = max(warmup["steps"], default=None)
            judged = [
                (s, a) for s, a in zip(warmup["judged_steps"], warmup["judgment_accuracy"]) if s <= (last_warmup or 0)
            ]
            if judged:  # held out: what the warmup taught, beside what its own samples were rewarded
                steps, accuracy = zip(*judged)
                left.plot(steps, accuracy, color=color, marker="^", ls=":", label=f"{name}dev judgment accuracy")
            staged = last_warmup is not None and max(curve["steps"]) > last_warmup
            curve = {**curve, "hours": curve["steps"], "score_start": last_warmup if staged else None}
        ax.plot(curve["hours"], curve["ndcg"], color=color, marker="o", label=label or "model (logit 1 - logit 0)")
        for h, n, s in zip(curve["hours"], curve["ndcg"], curve["steps"]):
            ax.annotate(f"step {s}", (h, n), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        if curve["score_start"] is not None:
            stage2 = f"{name}stage 2 starts"
            ax.axvline(curve["score_start"], color="tab:green" if not several else color, linestyle=":", label=stage2)
    bm25 = {round(c["bm25"], 6) for _, c in curves if c["bm25"] is not None}
    for value in sorted(bm25):  # one line when the runs share their dev queries
        ax.axhline(value, color="gray", linestyle="--", label=f"BM25 ({value:.3f})")
    if rewards:
        left.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("step (warmup, then score)" if rewards else "wall-clock hours (job clock)")
    ax.set_ylabel("dev nDCG@10 (held-out train queries)")
    ax.set_title(title or " vs ".join(str(Path(path).parent) for _, path in runs))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output
