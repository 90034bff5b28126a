"""Logprobs of a group's completions under a causal LM: naive, and with the prompt encoded once.

A group's G completions share one prompt of hundreds of tokens and differ in a few answer tokens. The
shared-prefix forward runs the prompt once, repeats its keys and values G times, and runs only the
completion tokens on them: P + G*T tokens instead of G*(P+T), with the same logprobs and gradients.
The vocabulary head runs on completion positions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prorank.model.padding import pad_rows
from prorank.model.scoring import encode_prefix


@dataclass
class GroupLogprobs:
    logprobs: torch.Tensor  # [G, T] of each completion token (0 on padding)
    entropy: torch.Tensor  # [G, T] of the policy's distribution at each completion position
    mask: torch.Tensor  # [G, T], 1 on completion tokens


def pad_completions(completions: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, T] token ids right-padded with `pad_id`, and the [G, T] float mask of real tokens."""
    ids, mask = pad_rows(completions, pad_id, torch.long, device)
    return ids, mask.float()


def _token_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float) -> GroupLogprobs:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [G, T, V]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logp.exp() * logp).sum(-1).detach() * mask
    return GroupLogprobs(token_logp, entropy, mask)


def naive_group_logprobs(
    model, prompt: Sequence[int], completions: Sequence[Sequence[int]], pad_id: int, temperature: float = 1.0
) -> GroupLogprobs:
    """G full forward passes of prompt + completion (the baseline, and the reference in tests)."""
    device = next(model.parameters()).device
    comp, mask = pad_completions(completions, pad_id, device)
    p, (g, t) = len(prompt), comp.shape
    ids = torch.cat([torch.as_tensor(list(prompt), device=device).expand(g, p), comp], dim=1)
    attn = torch.cat([torch.ones(g, p, device=device), mask], dim=1).long()
    # The model is called as a whole (never its submodules) so that ZeRO-3's hooks gather and
    # release its parameters; logits_to_keep keeps the vocabulary head off the prompt positions.
    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=t + 1, use_cache=False).logits
    return _token_stats(logits[:, :-1], comp, mask, temperature)


def shared_prefix_group_logprobs(
    model, prompt: Sequence[int], completions: Sequence[Sequence[int]], pad_id: int, temperature: float = 1.0
) -> GroupLogprobs:
    """The same numbers as `naive_group_logprobs`, encoding the prompt once for the whole group."""
    device = next(model.parameters()).device
    comp, mask = pad_completions(completions, pad_id, device)
    p, (g, t) = len(prompt), comp.shape
    prompt_logits, cache = encode_prefix(model, prompt, g, device)
    first = prompt_logits.expand(g, 1, -1)  # predicts each completion's first token
    if t == 1:
        logits = first
    else:
        # Completion token i sits at position p + i; the last token predicts nothing we score.
        positions = torch.arange(p, p + t - 1, device=device).expand(g, t - 1)
        attn = torch.cat([torch.ones(g, p, device=device), mask[:, :-1]], dim=1).long()
        rest = model(
            input_ids=comp[:, :-1], attention_mask=attn, position_ids=positions, past_key_values=cache, use_cache=True
        ).logits
        logits = torch.cat([first, rest], dim=1)
    return _token_stats(logits, comp, mask, temperature)
