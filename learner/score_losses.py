"""Stage-2 ranking losses on relevance scores (logit("1") - logit("0")), as pure functions.

A row is one query's candidates: its positives and k hard negatives. `labels` are the graded qrels
(0 for a negative), `mask` is False on the padding of rows with fewer candidates. Every loss returns
one value per row, so that the caller can average rows over a global batch split across ranks.

A new loss: write it here as a pure function of (scores, labels, mask, temperature) -> [B], add it to
LOSSES, and give it a weight in ScoreConfig.ranking_loss (prorank/settings/config.py) and the config section.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from prorank.settings.stage_config import RankingLoss


def listwise_contrastive(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """InfoNCE of each positive against the row's negatives, averaged over the row's positives.

    For positive p: -log(exp(s_p/t) / (exp(s_p/t) + sum_n exp(s_n/t))). The other positives are not in
    its denominator, so a row with several positives does not push them against each other.
    scores: [B, N] float; labels: [B, N] graded (> 0 is positive); mask: [B, N] bool.
    returns: [B]; 0 for a row without positives or without negatives.
    """
    positive, negative = (labels > 0) & mask, (labels <= 0) & mask
    logits = scores / temperature
    negatives_lse = logits.masked_fill(~negative, float("-inf")).logsumexp(-1, keepdim=True)  # [B, 1]
    per_candidate = torch.logaddexp(logits, negatives_lse) - logits  # [B, N]
    per_candidate = per_candidate.masked_fill(~positive, 0.0)
    return per_candidate.sum(-1) / positive.sum(-1).clamp(min=1)


def pairwise_preference(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logistic loss softplus(-(s_i - s_j)) on every pair of a row with label_i > label_j (graded qrels:
    a grade-2 document should outscore a grade-1 one, which should outscore a negative).

    scores: [B, N] float; labels: [B, N] graded; mask: [B, N] bool.
    returns: [B], the mean over the row's ordered pairs; 0 for a row without any.
    """
    better = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]  # [B, N, N]
    losses = F.softplus(scores[:, None, :] - scores[:, :, None]).masked_fill(~better, 0.0)
    return losses.sum((1, 2)) / better.sum((1, 2)).clamp(min=1)


def pointwise_bce(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(score) against relevance (label > 0).

    scores: [B, N] float; labels: [B, N] graded; mask: [B, N] bool.
    returns: [B], the mean over the row's candidates.
    """
    losses = F.binary_cross_entropy_with_logits(scores, (labels > 0).to(scores.dtype), reduction="none")
    return losses.masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def score_margin(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean positive score minus mean negative score, per row. [B, N] -> [B]; 0 where a side is empty."""
    positive, negative = ((labels > 0) & mask).float(), ((labels <= 0) & mask).float()
    pos_mean = (scores * positive).sum(-1) / positive.sum(-1).clamp(min=1)
    neg_mean = (scores * negative).sum(-1) / negative.sum(-1).clamp(min=1)
    both = (positive.sum(-1) > 0) & (negative.sum(-1) > 0)
    return torch.where(both, pos_mean - neg_mean, torch.zeros_like(pos_mean))


def pairs_ordered(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of a row's (label_i > label_j) pairs with s_i > s_j. [B, N] -> [B]; 0 without pairs."""
    better = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    right = (scores[:, :, None] > scores[:, None, :]) & better
    return right.sum((1, 2)).float() / better.sum((1, 2)).clamp(min=1)


# The losses a RankingLoss weighs, by name: (scores, labels, mask, temperature) -> [B].
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "contrastive": listwise_contrastive,
    "pairwise": lambda scores, labels, mask, temperature: pairwise_preference(scores, labels, mask),
    "pointwise": lambda scores, labels, mask, temperature: pointwise_bce(scores, labels, mask),
}


def check_losses(loss: RankingLoss) -> None:
    """Raise ValueError unless `loss` weighs exactly the losses defined here."""
    if set(loss.weights) != set(LOSSES):
        raise ValueError(
            f"ranking loss weights {sorted(loss.weights)}: every loss of {sorted(LOSSES)} needs a "
            f"weight, and no other name has one"
        )


def ranking_losses(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, loss: RankingLoss
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted mix of the losses, per row: ([B] total, {name: [B]}). Zero weights are not computed.
    scores: [B, N] float; labels: [B, N] graded; mask: [B, N] bool."""
    check_losses(loss)
    parts = {name: LOSSES[name](scores, labels, mask, loss.temperature) for name, w in loss.weights.items() if w}
    total = sum(loss.weights[name] * value for name, value in parts.items())
    return total, parts
