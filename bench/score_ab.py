"""Stage-2 levers at equal job clock: the same score stage run once per variant, each stopped by
`train.max_hours`, compared on the dev curve (nDCG@10 of held-out train queries against hours).

    .venv/bin/python -m bench.score_ab --init runs/scifact-cpu/checkpoints/step-6/model --hours 0.5 \
        --variant "bm25:" --variant "policy: score.negatives_from=policy score.mine_every=100" \
        --json docs/results/score-ab-negatives.json

Each variant is `NAME: key=value ...`, dotted overrides of `--config` (default the quality recipe,
configs/scifact-cpu.yaml) for a score-only job from `--init` (typically the warmup's final model, so
that every variant starts from the same weights). The variants run one after the other on this machine;
run nothing else beside them. Prints, per variant: steps done, dev nDCG@10 at each evaluation with its
hour, and the last one; the JSON holds the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml

from bench.critical_path import ROOT, run, write_report
from prorank.settings.config_file import apply_overrides, load_config


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected 'NAME: key=value ...'")
    return name.strip(), rest.split()


def job_file(base: Path, out: Path, fixed: list[str], overrides: list[str]) -> Path:
    """The base config with `fixed` and then `overrides` applied, written beside `out` and validated: a
    wrong key fails here, before any variant runs (bench/warmup_levers.py writes its jobs here too)."""
    raw = apply_overrides(yaml.safe_load(base.read_text()), fixed + overrides)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    load_config(path)
    return path


def job_config(base: Path, out: Path, init: str, hours: float, overrides: list[str]) -> Path:
    """The base config as a score-only job from `init`, stopped at `hours`, writing only under `out`."""
    fixed = [
        "train.stages=[score]",
        f"score.init_from={init}",
        f"train.max_hours={hours}",
        f"train.output_dir={out}",
        f"train.job_name=scoreab{os.getpid()}{out.name}",
        "eval.output=null",
        "eval.tensorboard_dir=null",
    ]
    return job_file(base, out, fixed, overrides)


def curve(metrics: Path) -> dict:
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    dev = [
        {"step": m["step"], "hours": m["time/wall_hours"], "ndcg@10": m["dev/ndcg@10"]}
        for m in lines
        if "dev/ndcg@10" in m
    ]
    steps = [m["step"] for m in lines if "score/loss" in m]
    return {
        "dev": dev,
        "score_steps": len(steps),
        "hours": lines[-1]["time/wall_hours"] if lines else 0.0,
        "dev_bm25": next((m["dev/bm25_ndcg@10"] for m in lines if "dev/bm25_ndcg@10" in m), None),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="model folder or checkpoint every variant starts from")
    ap.add_argument("--hours", type=float, required=True, help="train.max_hours of each variant")
    ap.add_argument("--variant", type=parse_variant, action="append", required=True)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "scifact-cpu.yaml")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per variant (default: 2x --hours + 30 min)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    timeout = args.timeout or args.hours * 7200 + 1800
    report = {"init": args.init, "hours": args.hours, "config": str(args.config), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="score-ab-") as tmp:
        configs = {
            name: (job_config(args.config, Path(tmp) / f"v{i}", args.init, args.hours, overrides), overrides)
            for i, (name, overrides) in enumerate(args.variant)
        }
        for name, (config, overrides) in configs.items():
            seconds = run(ROOT, config, timeout)
            result = {"overrides": overrides, "job_seconds": seconds, **curve(config.with_suffix("") / "metrics.jsonl")}
            report["variants"][name] = result
            dev = ", ".join(f"{d['ndcg@10']:.3f}@{d['hours']:.2f}h" for d in result["dev"])
            print(
                f"{name}: {result['score_steps']} steps in {result['hours']:.2f} h; dev nDCG@10 {dev} "
                f"(BM25 {result['dev_bm25']:.3f})",
                flush=True,
            )
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
