"""Score (query, document) pairs with a causal LM: one forward pass per pair, no generation.

Pairs are tokenized in one batch call, sorted by length and packed into batches, so padding is small;
only the two answer rows of the vocabulary head are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from prorank.prompt import PromptBuilder, answer_logits, relevance_score


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_pairs(
    model,
    builder: PromptBuilder,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    bucketed: bool = True,
    progress: bool = True,
) -> list[float]:
    """Relevance scores, logit("1") - logit("0"), in the order of `pairs`."""
    ids = builder.encode_batch(pairs)
    if bucketed:
        batches = length_buckets([len(x) for x in ids], batch_size)
    else:
        batches = [list(range(i, min(i + batch_size, len(ids)))) for i in range(0, len(ids), batch_size)]
    pad_id = builder.tokenizer.pad_token_id
    scores = [0.0] * len(ids)
    bar = tqdm(total=len(ids), desc="scoring pairs", unit="pair", disable=not progress)
    for batch in batches:
        logits = answer_logits(model, [ids[i] for i in batch], builder.answer_ids, pad_id)
        for i, s in zip(batch, relevance_score(logits).tolist()):
            scores[i] = s
        bar.update(len(batch))
    bar.close()
    return scores
