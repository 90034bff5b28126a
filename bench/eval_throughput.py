"""Scored pairs/s of the eval scorer: batched + length-bucketed vs batched in arrival order vs one pair at a
time, and a query's candidates in one batch with or without their shared prompt prefix encoded once
(what `prorank eval` does), on the same real SciFact BM25 pairs and the same model, in one process.

    .venv/bin/python -m bench.eval_throughput --data ../shared/data/scifact \
        --model models/SmolLM2-135M-Instruct --pairs 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import time

import torch

from prorank.bm25 import bm25_search
from prorank.config import BM25Config, DataConfig, ModelConfig
from prorank.data import load_dataset
from prorank.models import load_causal_lm
from prorank.prompt import PromptBuilder, document_text
from prorank.scoring import score_pairs, score_query


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    dataset = load_dataset(DataConfig(path=args.data, split="test"))
    qids = dataset.query_ids[: -(-args.pairs // 10)]
    ranking = bm25_search(dataset, qids, BM25Config(top_k=10))
    pairs = [
        (dataset.queries[q], document_text(dataset.corpus[d].title, dataset.corpus[d].text))
        for q in qids for d, _ in ranking[q]
    ][: args.pairs]
    model, tok = load_causal_lm(ModelConfig(path=args.model))
    builder = PromptBuilder(tok, max_length=args.max_length)
    lengths = [len(x) for x in builder.encode_batch(pairs)]
    print(f"{len(pairs)} pairs, prompt tokens min/mean/max {min(lengths)}/{sum(lengths) / len(lengths):.0f}/"
          f"{max(lengths)}, torch threads {torch.get_num_threads()}")

    queries: dict[str, list[str]] = {}
    for query, doc in pairs:  # pairs come grouped by query
        queries.setdefault(query, []).append(doc)

    def per_query(shared: bool) -> list[float]:
        return [s for q, docs in queries.items() for s in score_query(model, builder, q, docs, args.batch_size, shared)]

    def bucketed(batch_size: int, buckets: bool):
        return lambda: score_pairs(model, builder, pairs, batch_size=batch_size, bucketed=buckets, progress=False)

    variants = {
        "one pair at a time": bucketed(1, False),
        f"batch {args.batch_size}, arrival order": bucketed(args.batch_size, False),
        f"batch {args.batch_size}, length-bucketed": bucketed(args.batch_size, True),
        "per query, padded": lambda: per_query(False),
        "per query, shared prefix": lambda: per_query(True),
    }
    score_pairs(model, builder, pairs[:4], batch_size=4, progress=False)  # warm-up
    rates: dict[str, float] = {}
    reference = None
    for name, run in variants.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            scores = run()
            best = min(best, time.perf_counter() - start)
        reference = reference or scores
        drift = max(abs(a - b) for a, b in zip(scores, reference))
        rates[name] = len(pairs) / best
        print(f"{name:32s} {rates[name]:7.2f} pairs/s  (max score drift vs first: {drift:.1e})")
    base = rates["one pair at a time"]
    for name, rate in rates.items():
        print(f"ratio {name} / one pair at a time: {rate / base:.2f}x")


if __name__ == "__main__":
    main()
