"""`prorank eval`'s reranking, float32 (exact: the scorer before `model.dtype: auto`) against bfloat16 weights,
on the same real SciFact test queries, BM25 candidates and model, in one process: pairs/s, the ratio, the
largest score difference, and nDCG@10 / RR@10 of both rerankings (an approximate scorer must keep nDCG@10
within 0.005 of the exact one on the same pairs).

    .venv/bin/python -m bench.eval_throughput --data ../shared/data/scifact \
        --model models/SmolLM2-135M-Instruct --queries 40 --depth 20
"""

from __future__ import annotations

import time

import torch

from bench import data_model_parser
from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import load_dataset
from prorank.eval.metrics import evaluate, ranked_to_run
from prorank.eval.rerank import rerank
from prorank.model.models import load_causal_lm, native_bf16
from prorank.model.prompt import PromptBuilder, document_text
from prorank.model.scoring import score_pairs
from prorank.settings.config import BM25Config, DataConfig, ModelConfig


def main() -> None:
    ap = data_model_parser(__doc__)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=192, help="query + document tokens (prompt.max_length)")
    args = ap.parse_args()

    dataset = load_dataset(DataConfig(path=args.data, split="test"))
    qids = dataset.query_ids[: args.queries]
    ranking = bm25_search(dataset, qids, BM25Config(top_k=100))
    pairs = sum(min(args.depth, len(h)) for h in ranking.values())
    print(
        f"{len(qids)} queries x top {args.depth} = {pairs} pairs, "
        f"query + document up to {args.max_length} tokens (+ the layout), "
        f"torch threads {torch.get_num_threads()}, native bf16: {native_bf16('cpu')}"
    )

    results = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_causal_lm(ModelConfig(path=args.model, dtype=dtype, device="cpu"))
        builder = PromptBuilder(tok, args.max_length)
        rerank(model, builder, dataset, {q: ranking[q] for q in qids[:1]}, args.depth, args.batch_size, False)
        start = time.perf_counter()
        ranked = rerank(model, builder, dataset, ranking, args.depth, args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        # The score difference itself on a sample (a second pass over every pair would double the bench).
        sample = [(dataset.queries[q], dataset.corpus[d]) for q in qids[:5] for d, _ in ranking[q][: args.depth]]
        scores = score_pairs(
            model,
            builder,
            [(q, document_text(d.title, d.text)) for q, d in sample],
            batch_size=args.batch_size,
            progress=False,
        )
        results[dtype] = (pairs / seconds, evaluate(dataset.qrels, ranked_to_run(ranked)), scores)
        del model

    base_rate, base_metrics, base_scores = results["float32"]
    for dtype, (rate, metrics, scores) in results.items():
        drift = max(abs(a - b) for a, b in zip(scores, base_scores))
        print(
            f"{dtype:9s} {rate:6.2f} pairs/s  ratio {rate / base_rate:.2f}x  nDCG@10 {metrics['nDCG@10']:.4f} "
            f"(diff {metrics['nDCG@10'] - base_metrics['nDCG@10']:+.4f})  RR@10 {metrics['RR@10']:.4f}  "
            f"max score diff {drift:.3f}"
        )


if __name__ == "__main__":
    main()
