"""What a learner step optimises: the objective each rank is given, one per stage.

An objective says how big a step is, how its loss over a micro-batch is computed (summed over the step's
global normaliser, so that K ranks and accumulation give the batch loss), and how the ranks' statistics
become the step's figures (the learner adds grad_norm, lr and step_seconds). The rank (learner/rank.py)
does the rest: DeepSpeed, precision, accumulation, checkpoints and weights, the same for both.

- GrpoObjective (stage 1): GRPO on groups of G sampled judgments (learner/step.py, learner/grpo.py).
- RankingObjective (stage 2): the weighted ranking losses of logit("1") - logit("0") over each query's
  candidates (learner/score_step.py, learner/score_losses.py). A new stage-2 loss goes into score_losses.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from prorank.corpus.batches import RankingGroup
from prorank.learner.score_losses import check_losses
from prorank.learner.score_step import score_micro_batch_loss
from prorank.learner.step import micro_batch_loss, step_normalizer
from prorank.model.prompt import answer_token_ids
from prorank.run.rollout import ScoredGroup
from prorank.settings.config import StageLearnerConfig
from prorank.settings.stage_config import RankingLoss, ScoreConfig


class Objective(Protocol):
    batch_size: int  # items (GRPO groups, or queries) in one optimizer step, over all ranks
    micro_batch: int  # items per rank per forward/backward

    def prepare(self, model_path: str, tokenizer, dtype: torch.dtype, gpu: bool) -> None:
        """Once on each rank, before the first step (a reference model, the answer tokens)."""

    def normalizer(self, batch: Sequence) -> float:
        """The step's global normaliser, computed once by the driver for all ranks."""

    def loss(self, model, batch: Sequence, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """A micro-batch's loss over `normalizer`, and sums of its statistics."""

    def metrics(self, batch: Sequence, summed: dict[str, float], seconds: float) -> dict:
        """The objective's figures of a step, from the ranks' summed statistics and the step's seconds."""


class GrpoObjective:
    def __init__(self, cfg: StageLearnerConfig, temperature: float = 1.0):
        self.cfg, self.temperature = cfg, temperature  # the sampling temperature: logprobs are taken at it
        self.batch_size, self.micro_batch = cfg.groups_per_step, cfg.micro_batch_groups
        self.ref: Any = None  # transformers' model, or None without a KL term
        self.pad_id = 0  # the tokenizer's, once `prepare`d

    def prepare(self, model_path: str, tokenizer, dtype: torch.dtype, gpu: bool) -> None:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

        self.pad_id = tokenizer.pad_token_id
        # A frozen copy of the starting policy; skipped entirely when beta is 0, and with LoRA (the policy
        # with its adapter off is the start model).
        if self.cfg.beta > 0 and self.cfg.lora is None:
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
            if gpu:
                self.ref.cuda()

    def normalizer(self, batch: Sequence[ScoredGroup]) -> float:
        return step_normalizer(batch, self.cfg)

    def loss(self, model, batch: Sequence[ScoredGroup], normalizer: float):
        return micro_batch_loss(model, self.ref, batch, normalizer, self.cfg, self.pad_id, self.temperature)

    def metrics(self, batch: Sequence[ScoredGroup], summed: dict[str, float], seconds: float):
        rewards = [r for g in batch for r in g.rewards]
        return {
            "loss": summed["loss"],
            "kl": summed.get("kl", 0.0),
            "clip_fraction": summed["clipped"],
            "truncated_fraction": summed.get("truncated", 0.0),
            "ratio_mean": summed["ratio"],
            "entropy": summed["entropy"],
            "mismatch_kl": summed["mismatch_kl"],
            "reward_mean": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
            "zero_variance_groups": sum(len(set(g.rewards)) == 1 for g in batch) / len(batch),
            "tokens_per_second": summed["tokens"] / seconds,
            "prompt_tokens": summed["prompt_tokens"],
        }


class RankingObjective:
    def __init__(self, loss: RankingLoss, queries_per_step: int, micro_batch_queries: int, shared_prefix: bool = True):
        check_losses(loss)  # here, in the driver, before any rank starts
        self.ranking_loss, self.shared_prefix = loss, shared_prefix
        self.batch_size, self.micro_batch = queries_per_step, micro_batch_queries
        self.answer_ids, self.pad_id = (0, 0), 0  # the tokenizer's, once `prepare`d

    @classmethod
    def of(cls, sc: ScoreConfig) -> RankingObjective:
        """The score stage's objective, from its config section."""
        return cls(sc.ranking_loss(), sc.queries_per_step, sc.micro_batch_queries, sc.shared_prefix)

    def prepare(self, model_path: str, tokenizer, dtype: torch.dtype, gpu: bool) -> None:

        self.pad_id, self.answer_ids = tokenizer.pad_token_id, answer_token_ids(tokenizer)

    def normalizer(self, batch: Sequence[RankingGroup]) -> float:
        return float(len(batch))  # every query's row counts once in the step's mean

    def loss(self, model, batch: Sequence[RankingGroup], normalizer: float):
        return score_micro_batch_loss(
            model, batch, normalizer, self.ranking_loss, self.answer_ids, self.pad_id, self.shared_prefix
        )

    def metrics(self, batch: Sequence[RankingGroup], summed: dict[str, float], seconds: float):
        return {**summed, "prompt_tokens_per_second": summed["prompt_tokens"] / seconds}
