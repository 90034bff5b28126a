"""A diagnosis, not a result: nDCG@10 of a first stage's run fused with a model's run, over the whole grid
of wsum weights, on a split's qrels. It says how much a fusion weight chosen elsewhere (on held-out
training or synthetic queries) left on the table; reading a weight off this curve would tune on the split.

  python scripts/fusion_curve.py --data ../shared/data/scifact --split test \
      --first-stage docs/results/runs/scifact-nolabels/scifact/bm25.trec \
      --model docs/results/runs/scifact-nolabels/scifact/nolabels.trec --depth 20 \
      --output docs/results/scifact-nolabels-fusion-curve.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prorank.config import DataConfig
from prorank.data import load_dataset
from prorank.eval.metrics import evaluate
from prorank.eval.runs import read_run
from prorank.fusion import FusionSettings, fuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--first-stage", required=True, help="the first stage's TREC run")
    parser.add_argument("--model", required=True, help="the model's TREC run (its scores over the reranked top)")
    parser.add_argument("--depth", type=int, default=20, help="the reranked top: fused there, first stage below")
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    dataset = load_dataset(DataConfig(path=args.data, split=args.split))
    first = read_run(args.first_stage, dataset.queries, dataset.corpus)
    model = read_run(args.model, dataset.queries, dataset.corpus, args.depth)
    top = {q: dict(hits[: args.depth]) for q, hits in first.items()}
    scored = {q: {d: s for d, s in model[q] if d in top[q]} for q in top if q in model}
    curve = []
    for i in range(round(1 / args.step) + 1):
        w = round(i * args.step, 6)
        settings = FusionSettings(method="wsum", params={"weights": [round(1 - w, 6), w]}, norm="min-max")
        fused = fuse({q: top[q] for q in scored}, scored, settings)
        run = {}
        for q, scores in fused.items():
            ranked = sorted(scores.items(), key=lambda x: -x[1])
            tail = [d for d, _ in first[q][args.depth :]]
            run[q] = {d: float(len(ranked) + len(tail) - r) for r, d in enumerate([d for d, _ in ranked] + tail)}
        figures = evaluate(dataset.eval_qrels, run)
        curve.append({"model_weight": w, "ndcg@10": round(figures["nDCG@10"], 4)})
        print(f"model weight {w:.2f}: nDCG@10 {figures['nDCG@10']:.4f}")
    if args.output:
        report = {"diagnosis": "not a result: a weight read off this curve is tuned on the split", **vars(args)}
        report.update(output=str(args.output), curve=curve)
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
