"""GRPO as pure functions on tensors.

Notation: B groups of G completions; N = B * G completion rows; T = the longest completion (padded).
Losses come back as a *sum* divided by a caller-given `normalizer`, so that a batch split across
micro-batches and data-parallel ranks adds up to exactly the loss of the whole batch in one process.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token_mean", "sequence_mean"]


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group; with `scale_by_std=False`, r - mean.

    rewards: [B, G]. returns: [B, G]. std is the population std (a group of equal rewards gives 0).
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - lp) - (ref - lp) - 1 (>= 0).

    logprobs, ref_logprobs: [N, T]. returns: [N, T].
    """
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def token_weights(mask: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """How much each token counts before the normaliser: 1 (token mean) or 1/len (sequence mean).

    mask: [N, T] of 0/1. returns: [N, T].
    """
    mask = mask.float()
    if aggregation == "token_mean":
        return mask
    if aggregation == "sequence_mean":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def grpo_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normalizer: float,
    clip_eps: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    aggregation: Aggregation = "token_mean",
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate plus beta * k3 KL to the reference, over completion tokens only.

    logprobs: [N, T] of the policy being trained (carries gradients).
    behaviour_logprobs: [N, T] that the actors sampled with (the ratio's denominator).
    advantages: [N], one per completion, broadcast over its tokens.
    mask: [N, T], 1 on completion tokens, 0 on padding.
    normalizer: total weight of the whole batch (token count for token_mean, sequence count for
        sequence_mean) so that sums over pieces of the batch add up to the batch mean.
    tis_cap: None: the ratio is taken against the behaviour policy (the sampler is the "old" policy).
        A number C: truncated importance sampling. The ratio is taken against the learner's own
        policy at the start of the step (`logprobs` detached), and each token is weighted by
        min(pi_learner / pi_behaviour, C), which corrects for samples from a stale or numerically
        different sampler (vLLM) without letting one token's weight explode.
    returns: (scalar loss, sums of per-token statistics weighted like the loss: kl, clipped, ratio,
        and with tis_cap, truncated: tokens whose importance weight hit the cap).
    """
    weights = token_weights(mask, aggregation)
    stats = {}
    if tis_cap is None:
        ratio = torch.exp(logprobs - behaviour_logprobs)
        importance = torch.ones_like(logprobs)
    else:
        old = logprobs.detach()
        ratio = torch.exp(logprobs - old)
        raw = torch.exp(old - behaviour_logprobs)
        importance = torch.clamp(raw, max=tis_cap)
        stats["truncated"] = ((raw > tis_cap).float() * weights).sum().detach()
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped) * importance
    stats["clipped"] = ((clipped < unclipped).float() * weights).sum().detach()
    if ref_logprobs is not None and beta > 0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        stats["kl"] = (kl * weights).sum().detach()
    stats["ratio"] = (ratio * weights).sum().detach()
    return (per_token * weights).sum() / normalizer, stats


def batch_normalizer(masks: list[torch.Tensor], aggregation: Aggregation) -> float:
    """The `normalizer` of `grpo_loss` for a batch given as masks [n_i, T_i] of its pieces."""
    if aggregation == "token_mean":
        return float(sum(m.sum().item() for m in masks))
    return float(sum(m.shape[0] for m in masks))
