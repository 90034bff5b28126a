"""The quickstart before and after the prompt moved to the released layout: an A/B of `prorank train`.

    .venv/bin/python -m bench.prompt_layout --before 121b103 --json docs/results/quickstart-prompt-layout.json

A: the code at git ref `--before` (checked out into a temporary worktree) with its own
configs/quickstart.yaml: the task text in a system message through the model's chat template, the
prompt cut at 256 tokens. B: this tree with its configs/quickstart.yaml: the mxbai-v2 layout of the
released ProRank models (query + document cut at 192 tokens, about 84 more for the fixed pieces). Both
start from the same SmolLM2-135M-Instruct on the same SciFact train queries, one after the other on this
machine (run nothing else beside it), checkpoints only at the end.

Prints and writes, per side, each step's mean reward (total, format, relevance) and seconds, and dev
nDCG@10 before and after (with BM25's on the same held-out queries), all from the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml

from bench.critical_path import ROOT, run, worktree, write_report

STEP_KEYS = ("train/reward/total_mean", "train/reward/format_mean", "train/reward/relevance_mean", "train/step_seconds")


def job_config(code: Path, out: Path, model: str, data: str) -> Path:
    """`code`'s own quickstart config, with this machine's paths and nothing written outside `out`."""
    cfg = yaml.safe_load((code / "configs" / "quickstart.yaml").read_text())
    cfg["data"]["path"], cfg["model"]["path"] = data, model
    cfg["warmup" if "warmup" in cfg else "train"]["checkpoint_every"] = 0  # the tree's own sections
    cfg["train"].update(output_dir=str(out), job_name=f"layout{os.getpid()}{out.name[-1]}")
    cfg["eval"].pop("output", None)
    cfg["eval"].pop("tensorboard_dir", None)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def curves(metrics: Path, config: Path) -> dict:
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [
        {"step": m["step"], **{k.split("/")[-1]: m[k] for k in STEP_KEYS if k in m}}
        for m in lines
        if "train/reward/total_mean" in m
    ]
    dev = [
        {"step": m["step"], "ndcg@10": m["dev/ndcg@10"], "bm25_ndcg@10": m["dev/bm25_ndcg@10"]}
        for m in lines
        if "dev/ndcg@10" in m
    ]
    return {"prompt": yaml.safe_load(config.read_text()).get("prompt", {}), "steps": steps, "dev": dev}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git ref of the A side (the chat-template layout)")
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--data", default=str((ROOT / ".." / "shared" / "data" / "scifact").resolve()))
    parser.add_argument("--timeout", type=float, default=2400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model}: no model folder there (make it with `prorank convert-gguf`)")
    report = {"before": args.before}
    with (
        tempfile.TemporaryDirectory(prefix="layout-") as tmp,
        worktree(args.before, Path(tmp) / "before-code") as before,
    ):
        for side, code in (("A", before), ("B", ROOT)):
            out = Path(tmp) / f"run-{side}"
            config = job_config(code, out, args.model, args.data)
            seconds = run(code, config, args.timeout)
            report[side] = {**curves(out / "metrics.jsonl", config), "job_seconds": seconds}
    for side in ("A", "B"):
        r = report[side]
        rewards = " ".join(f"{s['total_mean']:.3f}" for s in r["steps"])
        formats = " ".join(f"{s['format_mean']:.3f}" for s in r["steps"])
        dev = " -> ".join(f"{d['ndcg@10']:.3f}" for d in r["dev"])
        print(
            f"{side} {r['prompt']}: reward by step {rewards}; format {formats}; dev nDCG@10 {dev} "
            f"(BM25 {r['dev'][0]['bm25_ndcg@10']:.3f}); job {r['job_seconds']:.0f} s"
        )
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
