"""One stage-2 micro-batch: relevance scores of each query's candidates, then the mixed ranking loss.

Shared by the DeepSpeed ranks and the tests' plain torch loop. The loss of a micro-batch is its rows'
losses summed over the step's global row count (`normalizer`), so K ranks give the batch mean.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from prorank.corpus.batches import RankingGroup
from prorank.learner.score_losses import pairs_ordered, ranking_losses, score_margin
from prorank.model.padding import pad_rows
from prorank.model.prompt import relevance_score
from prorank.model.scoring import answer_logits
from prorank.settings.stage_config import RankingLoss


def padded_rows(groups: Sequence[RankingGroup], scores: Sequence[torch.Tensor]):
    """Per-group score vectors -> ([B, N] scores, [B, N] labels, [B, N] mask), padded to the longest."""
    device = scores[0].device
    out, mask = pad_rows(scores, 0.0, torch.float32, device)
    labels, _ = pad_rows([g.labels for g in groups], 0, torch.long, device)
    return out, labels, mask


def score_micro_batch_loss(
    model,
    groups: Sequence[RankingGroup],
    normalizer: float,
    loss_mix: RankingLoss,
    answer_ids: tuple[int, int],
    pad_id: int,
    shared_prefix: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed ranking loss of `groups` over `normalizer` (rows in the whole step), and statistic sums."""
    scores = [relevance_score(answer_logits(model, g.prompt_ids, answer_ids, pad_id, shared_prefix)) for g in groups]
    s, labels, mask = padded_rows(groups, scores)
    total, parts = ranking_losses(s, labels, mask, loss_mix)
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
