"""One GRPO micro-batch, shared by the DeepSpeed ranks and the plain torch loop, plus the LR schedule.

Both paths call `micro_batch_loss` on the same groups with the same global normaliser, which is what
makes a K-rank DeepSpeed step equal to one single-process step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from prorank.learner.forward import naive_group_logprobs, pad_completions, shared_prefix_group_logprobs
from prorank.learner.grpo import batch_normalizer, group_advantages, grpo_loss, token_weights
from prorank.model.padding import pad_rows
from prorank.run.rollout import ScoredGroup
from prorank.settings.config import StageLearnerConfig


def lr_lambda(cfg: StageLearnerConfig):
    """Multiplier of cfg.lr at a step: linear warmup, then constant, linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def completion_masks(groups: Sequence[ScoredGroup]) -> list[torch.Tensor]:
    """One [G, T] mask per group, for `batch_normalizer`."""
    return [pad_completions(g.completions, 0, "cpu")[1] for g in groups]


def step_normalizer(groups: Sequence[ScoredGroup], cfg: StageLearnerConfig) -> float:
    return batch_normalizer(completion_masks(groups), cfg.aggregation)


def _pad(rows: Sequence[Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    """`rows` (one per completion) as a tensor shaped, typed and placed like `like`, 0 on padding."""
    return pad_rows(rows, 0.0, like.dtype, like.device, width=like.shape[1])[0]


def micro_batch_loss(
    model,
    ref_model,
    groups: Sequence[ScoredGroup],
    normalizer: float,
    cfg: StageLearnerConfig,
    pad_id: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed GRPO loss of `groups` over `normalizer`, and sums of statistics for the step's metrics.
    `ref_model`: the frozen reference; with `cfg.lora` and none given, the policy with its adapter off is
    the reference (the start model itself, at no memory cost)."""
    forward = shared_prefix_group_logprobs if cfg.shared_prefix else naive_group_logprobs
    total = torch.zeros((), device=next(model.parameters()).device)
    stats: dict[str, float] = defaultdict(float)
    for g in groups:
        out = forward(model, g.prompt_ids, g.completions, pad_id, temperature)
        behaviour = _pad(g.behaviour_logprobs, out.logprobs.detach())
        advantages = group_advantages(torch.tensor([g.rewards], dtype=torch.float32), cfg.scale_advantages_by_std)[
            0
        ].to(out.logprobs.device)
        ref = None
        if cfg.beta > 0 and ref_model is not None:
            with torch.no_grad():
                ref = forward(ref_model, g.prompt_ids, g.completions, pad_id, temperature).logprobs
        elif cfg.beta > 0 and cfg.lora is not None:
            with torch.no_grad(), model.disable_adapter():
                ref = forward(model, g.prompt_ids, g.completions, pad_id, temperature).logprobs
        loss, sums = grpo_loss(
            out.logprobs,
            behaviour,
            advantages,
            out.mask,
            normalizer,
            cfg.clip_eps,
            ref,
            cfg.beta,
            cfg.aggregation,
            cfg.tis_cap,
        )
        total = total + loss
        weights = token_weights(out.mask, cfg.aggregation)
        stats["loss"] += loss.item()
        stats["entropy"] += (out.entropy * weights).sum().item() / normalizer
        # KL(behaviour || learner), k1 estimate on the sampled tokens: how far the sampler is off.
        stats["mismatch_kl"] += (behaviour - out.logprobs.detach()).mul(weights).sum().item() / normalizer
        for key, value in sums.items():
            stats[key] += value.item() / normalizer
        stats["tokens"] += out.mask.sum().item()
        stats["prompt_tokens"] += len(g.prompt_ids) * (1 if cfg.shared_prefix else len(g.completions))
    return total, stats
