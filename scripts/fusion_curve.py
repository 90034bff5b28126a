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

from prorank.corpus.data import load_dataset
from prorank.eval.metrics import evaluate, scored_to_run
from prorank.eval.rerank import scored_ranking, top_runs
from prorank.eval.runs import read_run
from prorank.release.fusion import FusionSettings, fuse
from prorank.settings.config import DataConfig


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
    model = {q: dict(hits) for q, hits in read_run(args.model, dataset.queries, dataset.corpus).items()}
    # The model's score of each query's top `depth`, in first-stage order: what `prorank eval` fuses.
    scores = {q: [model[q][d] for d, _ in hits[: args.depth]] for q, hits in first.items() if q in model}
    ranking = {q: first[q] for q in scores}
    curve = []
    for i in range(round(1 / args.step) + 1):
        w = round(i * args.step, 6)
        settings = FusionSettings(method="wsum", params={"weights": [round(1 - w, 6), w]}, norm="min-max")
        fused = fuse(*top_runs(ranking, args.depth, scores), settings)
        fused_scores = {q: [fused[q][d] for d, _ in hits[: args.depth]] for q, hits in ranking.items()}
        run = scored_to_run(scored_ranking(ranking, args.depth, fused_scores))
        ndcg = evaluate(dataset.eval_qrels, run)["nDCG@10"]
        curve.append({"model_weight": w, "ndcg@10": round(ndcg, 4)})
        print(f"model weight {w:.2f}: nDCG@10 {ndcg:.4f}")
    if args.output:
        report = {"diagnosis": "not a result: a weight read off this curve is tuned on the split", **vars(args)}
        report.update(output=str(args.output), curve=curve)
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
