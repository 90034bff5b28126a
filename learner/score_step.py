"""One stage-2 micro-batch: relevance scores of each query's candidates, then the mixed ranking loss.

Shared by the DeepSpeed ranks and the tests' plain torch loop. The loss of a micro-batch is its rows'
losses summed over the step's global row count (`normalizer`), so K ranks give the batch mean.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from learner.score_losses import (listwise_contrastive, pairs_ordered, pairwise_preference, pointwise_bce,
                                  score_margin)
from prorank.prompt import relevance_score
from prorank.rollout import RankingGroup
from prorank.scoring import answer_logits


def padded_rows(groups: Sequence[RankingGroup], scores: Sequence[torch.Tensor]):
    """Per-group score vectors -> ([B, N] scores, [B, N] labels, [B, N] mask), padded to the longest."""
    width = max(len(g.labels) for g in groups)
    device = scores[0].device
    out = torch.zeros((len(groups), width), device=device)
    labels = torch.zeros((len(groups), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(groups), width), dtype=torch.bool, device=device)
    for i, (g, s) in enumerate(zip(groups, scores)):
        n = len(g.labels)
        out[i, :n] = s
        labels[i, :n] = torch.as_tensor(g.labels, device=device)
        mask[i, :n] = True
    return out, labels, mask


def ranking_losses(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, weights: dict[str, float],
                   temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted mix of the three losses, per row: ([B] total, {name: [B]}). Zero weights are skipped."""
    parts = {}
    if weights.get("contrastive", 0):
        parts["contrastive"] = listwise_contrastive(scores, labels, mask, temperature)
    if weights.get("pairwise", 0):
        parts["pairwise"] = pairwise_preference(scores, labels, mask)
    if weights.get("pointwise", 0):
        parts["pointwise"] = pointwise_bce(scores, labels, mask)
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts


def score_micro_batch_loss(model, groups: Sequence[RankingGroup], normalizer: float, weights: dict[str, float],
                           temperature: float, answer_ids: tuple[int, int], pad_id: int,
                           shared_prefix: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed ranking loss of `groups` over `normalizer` (rows in the whole step), and statistic sums."""
    scores = [relevance_score(answer_logits(model, g.prompt_ids, answer_ids, pad_id, shared_prefix))
              for g in groups]
    s, labels, mask = padded_rows(groups, scores)
    total, parts = ranking_losses(s, labels, mask, weights, temperature)
    loss = total.sum() / normalizer
    stats: dict[str, float] = defaultdict(float)
    stats["loss"] = loss.item()
    for name, value in parts.items():
        stats[f"loss_{name}"] = value.sum().item() / normalizer
    detached = s.detach()
    stats["margin"] = score_margin(detached, labels, mask).sum().item() / normalizer
    stats["pairs_ordered"] = pairs_ordered(detached, labels, mask).sum().item() / normalizer
    stats["score_mean"] = (detached * mask).sum().item() / mask.sum().item() * len(groups) / normalizer
    stats["prompt_tokens"] = float(sum(len(p) for g in groups for p in g.prompt_ids))
    return loss, stats
