"""Relevance scores of (query, document) pairs under a causal LM: one forward pass per pair, no generation.

`answer_logits` is the one scorer: the logits of "0" and "1" at the end of each prompt, with gradients
when called under grad mode (the stage-2 learner trains through it). `score_pairs` packs any pairs into
length-sorted batches; `score_query` scores one query's candidates. Both encode the prompt tokens a
batch shares (the system message, and the query for one query's candidates) once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from prorank.model.padding import pad_rows
from prorank.model.prompt import PromptBuilder, relevance_score


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


def encode_prefix(model, prefix: Sequence[int], copies: int, device):
    """Run the tokens `copies` sequences share once: (logits at its last position [1, 1, V], the key/value
    cache repeated `copies` times). The rest of each sequence then runs on the cache, positions after
    the prefix. The one shared-prefix forward: the learner's GRPO group logprobs and `answer_logits` use it."""
    out = model(input_ids=torch.as_tensor([list(prefix)], device=device), logits_to_keep=1, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(copies)
    return out.logits, cache


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving at least one token of each prompt after it."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def answer_logits(
    model, prompts: Sequence[Sequence[int]], answer_ids: tuple[int, int], pad_id: int, shared_prefix: bool = True
) -> torch.Tensor:
    """Logits of "0" and "1" at the end of each prompt (any lengths): [N, 2] float32, columns "0", "1".

    Left padding puts every prompt's answer position in the last column, so the vocabulary head runs on
    that column only (logits_to_keep=1) and the model is called as a whole (ZeRO-3's hooks). With
    `shared_prefix`, the tokens all prompts share (the system message, and the query when they are one
    query's candidates) are encoded once and their keys and values repeated for the N prompts (as the
    learner's GRPO forward does for a group).
    """
    device = next(model.parameters()).device
    p = common_prefix_length(prompts) if shared_prefix and len(prompts) > 1 else 0
    ids, mask = pad_rows([list(x)[p:] for x in prompts], pad_id, torch.long, device, left=True)
    mask = mask.long()
    n = len(prompts)
    if p == 0:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False
        ).logits
    else:
        _, cache = encode_prefix(model, prompts[0][:p], n, device)
        attn = torch.cat([torch.ones(n, p, dtype=mask.dtype, device=device), mask], dim=1)
        positions = p + (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=cache,
            logits_to_keep=1,
            use_cache=True,
        ).logits
    return logits[:, -1, list(answer_ids)].float()


@torch.inference_mode()
def score_query(
    model,
    builder: PromptBuilder,
    query: str,
    documents: Sequence[str],
    batch_size: int = 16,
    shared_prefix: bool = True,
) -> list[float]:
    """Relevance scores of one query's documents, in their order, `batch_size` candidates per forward."""
    ids = builder.encode_batch([(query, d) for d in documents])
    pad_id = builder.tokenizer.pad_token_id
    scores: list[float] = []
    for start in range(0, len(ids), batch_size):
        logits = answer_logits(model, ids[start : start + batch_size], builder.answer_ids, pad_id, shared_prefix)
        scores += relevance_score(logits).tolist()
    return scores
