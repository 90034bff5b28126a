"""Stage-2 forward+backward on one query's candidates (real SciFact, BM25 hard negatives): the shared-
prefix forward (system message and query encoded once) against one padded batch of whole prompts, and
with `--trainable-layers N` the shared-prefix step with only the top N layers trained (learner.trainable_layers).

    .venv/bin/python -m bench.score_step --data ../shared/data/scifact --model models/SmolLM2-135M-Instruct \
        --trainable-layers 10
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--negatives", type=int, default=7)
    ap.add_argument("--max-length", type=int, default=192, help="query + document tokens (prompt.max_length)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trainable-layers", type=int, default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from learner.rank import freeze_below
    from prorank.scoring import answer_logits, common_prefix_length
    from prorank.batches import PromptSampler, RankingSampler
    from prorank.bm25 import bm25_search
    from prorank.config import BM25Config, DataConfig, ScoreConfig, TrainConfig
    from prorank.data import load_dataset
    from prorank.models import load_tokenizer
    from prorank.prompt import PromptBuilder, relevance_score

    data = load_dataset(DataConfig(path=args.data, split="train"))
    qids = data.query_ids[: args.queries * 4]
    ranking = bm25_search(data, qids, BM25Config(top_k=30))
    prompts = PromptSampler(data, ranking, TrainConfig(max_train_queries=len(qids), dev_queries=0))
    tok = load_tokenizer(args.model)
    builder = PromptBuilder(tok, args.max_length)
    groups = RankingSampler(prompts, ranking, ScoreConfig(negatives=args.negatives), builder).batch(0, args.queries)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()

    def run(shared: bool) -> float:
        best = float("inf")
        for _ in range(args.repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            for g in groups:
                scores = relevance_score(answer_logits(model, g.prompt_ids, builder.answer_ids,
                                                                 tok.pad_token_id, shared))
                scores.sum().backward()
            best = min(best, time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        return best

    tokens = sum(len(p) for g in groups for p in g.prompt_ids)
    shared_tokens = sum(common_prefix_length(g.prompt_ids) for g in groups)
    print(f"{len(groups)} queries x {len(groups[0].prompt_ids)} candidates, {tokens} prompt tokens, "
          f"{shared_tokens / len(groups):.0f} shared per query")
    naive, shared = run(False), run(True)
    print(f"padded batch:  {naive:.2f} s")
    print(f"shared prefix: {shared:.2f} s  ({naive / shared:.2f}x)")
    if args.trainable_layers:
        freeze_below(model, args.trainable_layers)
        top = run(True)
        print(f"shared prefix, top {args.trainable_layers} of {model.config.num_hidden_layers} layers trained: "
              f"{top:.2f} s  ({shared / top:.2f}x faster than all layers)")


if __name__ == "__main__":
    main()
