"""Stage-1 levers: the same GRPO prompt warmup run once per variant, compared on what it teaches: held-out
judgment accuracy (dev/judgment_accuracy: greedy answers to balanced held-out pairs) and the answer format,
with the warmup's seconds per useful group (one that trained GRPO: its G rewards were not all equal).

    .venv/bin/python -m bench.warmup_levers --steps 40 \
        --variant "recipe:" --variant "lr 2e-4: warmup.lr=2e-4" \
        --variant "dynamic sampling: warmup.lr=2e-4 warmup.dynamic_sampling=true" \
        --json docs/results/warmup-levers.json

Each variant is `NAME: key=value ...`, dotted overrides of `--config` (default the quality recipe,
configs/scifact-cpu.yaml) for a warmup-only job of `--steps` steps. Every variant holds out the same
`--dev-queries` training queries and answers the same `--judgments` balanced pairs of them; their nDCG
is reranked at depth 1 only, which costs nothing and says nothing (the judgments are the figure here).
The variants run one after the other; run nothing else beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench.critical_path import ROOT, run, write_report
from bench.score_ab import job_file, parse_variant


def job_config(base: Path, out: Path, steps: int, dev_queries: int, judgments: int, overrides: list[str]) -> Path:
    """The base config as a warmup-only job of `steps` steps, writing only under `out`."""
    fixed = [
        "train.stages=[warmup]",
        f"warmup.steps={steps}",
        "warmup.dev_every=0",
        "warmup.checkpoint_every=0",
        f"train.dev_queries={dev_queries}",
        f"train.dev_judgments={judgments}",
        "train.dev_depth=1",
        "train.max_hours=null",
        f"train.output_dir={out}",
        f"train.job_name=levers{os.getpid()}{out.name}",
        "eval.output=null",
        "eval.tensorboard_dir=null",
    ]
    return job_file(base, out, fixed, overrides)


def summary(metrics: Path) -> dict:
    """Judgment figures before and after, the last 5 steps' rewards, and the seconds per useful group."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    dev = [m for m in lines if "dev/judgment_accuracy" in m]
    steps = [m for m in lines if "train/loss" in m]
    last = steps[-5:]
    useful = sum(m["rollout/useful_groups"] for m in steps)
    seconds = sum(m["time/step_seconds"] for m in steps[1:])  # the first waits on the zero-shot evaluation
    return {
        "steps": len(steps),
        "warmup_hours": steps[-1]["time/wall_hours"] if steps else 0.0,
        "judgment_accuracy": [round(m["dev/judgment_accuracy"], 4) for m in dev],
        "judgment_format": [round(m["dev/judgment_format"], 4) for m in dev],
        "format_reward_last5": statistics.fmean(m["train/reward/format_mean"] for m in last),
        "relevance_reward_last5": statistics.fmean(m["train/reward/relevance_mean"] for m in last),
        "zero_variance_share": statistics.fmean(m["train/zero_variance_groups"] for m in steps),
        "dropped_share": statistics.fmean(m["rollout/dropped_share"] for m in steps),
        "refill_seconds_per_step": statistics.fmean(m["rollout/refill_seconds"] for m in steps),
        "step_seconds_median": statistics.median(m["time/step_seconds"] for m in steps[1:]),
        "seconds_per_useful_group": seconds / max(1.0, useful - steps[0]["rollout/useful_groups"]),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, required=True, help="warmup.steps of each variant")
    ap.add_argument("--variant", type=parse_variant, action="append", required=True)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "scifact-cpu.yaml")
    ap.add_argument("--dev-queries", type=int, default=100, help="held-out training queries (train.dev_queries)")
    ap.add_argument("--judgments", type=int, default=200, help="balanced held-out pairs (train.dev_judgments)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    report = {"steps": args.steps, "config": str(args.config), "dev_queries": args.dev_queries, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="warmup-levers-") as tmp:
        configs = {
            name: (job_config(args.config, Path(tmp) / f"v{i}", args.steps, args.dev_queries, args.judgments, o), o)
            for i, (name, o) in enumerate(args.variant)
        }
        for name, (config, overrides) in configs.items():
            seconds = run(ROOT, config, args.timeout)
            result = {
                "overrides": overrides,
                "job_seconds": seconds,
                **summary(config.with_suffix("") / "metrics.jsonl"),
            }
            report["variants"][name] = result
            accuracy = " -> ".join(f"{a:.3f}" for a in result["judgment_accuracy"])
            fmt = " -> ".join(f"{a:.3f}" for a in result["judgment_format"])
            print(
                f"{name}: {result['steps']} steps in {result['warmup_hours']:.3f} h; judgment accuracy {accuracy}, "
                f"format {fmt}; {result['seconds_per_useful_group']:.2f} s a useful group",
                flush=True,
            )
            if args.json:  # after each variant: a long sweep stopped midway keeps what it measured
                write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
