"""The two training stages' config sections, each owning its steps, learning rate and schedule, dev and
checkpoint cadence and what a step samples: `warmup:` (stage 1, GRPO prompt warmup) and `score:` (stage 2,
fine-grained score learning). The job around them is `train:`, the learner's ranks and precision `learner:`
(prorank/settings/config.py, which also joins a stage's settings with the learner's: `ProRankConfig.warmup_learner`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from prorank.settings.section import Section

Schedule = Literal["constant", "linear", "cosine"]


class GrpoSettings(Section):
    """The GRPO objective's settings: the warmup section's, handed to its learner whole."""

    groups_per_step: int = Field(8, ge=1)  # the global batch of one learner step
    micro_batch_groups: int = Field(2, ge=1)  # per rank, per forward/backward
    clip_eps: float = Field(0.2, gt=0)
    beta: float = Field(0.04, ge=0)  # KL to the reference; 0 does not load the reference
    scale_advantages_by_std: bool = True
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    shared_prefix: bool = True  # encode a group's prompt once (see learner.forward)
    tis_cap: float | None = Field(2.0, gt=0)  # truncated importance sampling (learner.grpo); None: off


class WarmupConfig(GrpoSettings):
    """Stage 1: GRPO prompt warmup. Each step samples `groups_per_step` (query, document) prompts: a
    training query's qrels positives and `negatives_per_positive` BM25 hard negatives for each, from its top
    `hard_negative_depth`; the actors answer each `sampling.group_size` times; one GRPO step follows."""

    steps: int = Field(100, ge=1)
    lr: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up of the learning rate, then lr_schedule over `steps`
    lr_schedule: Schedule = "constant"
    mode: Literal["sync", "async"] = "sync"  # async: actors generate step t+1 while the learner trains on t
    max_staleness: int = Field(1, ge=0)  # policy versions; older samples are generated again
    positives_per_query: int = Field(1, ge=1)
    negatives_per_positive: float = Field(1.0, ge=0)  # BM25 hard negatives per positive
    hard_negative_depth: int = Field(30, ge=1)  # negatives come from this BM25 top-k, minus the positives
    dev_every: int = Field(10, ge=0)  # steps; 0: only before and after the stage
    checkpoint_every: int = Field(50, ge=0)  # steps; 0: only at the end
    # DAPO's dynamic sampling: a group whose G rewards spread (population std) by at most
    # `dynamic_sampling_tolerance` gives GRPO no gradient; it is dropped and fresh prompts are drawn until
    # the step has groups_per_step, for at most `dynamic_sampling_rounds` extra rollout rounds (then the
    # step trains on what it has, topped up with dropped groups: driver/warmup_stage.py).
    dynamic_sampling: bool = False
    dynamic_sampling_tolerance: float = Field(0.0, ge=0)  # > 0 for graded rewards: "all about equal"
    dynamic_sampling_rounds: int = Field(3, ge=1)


class RankingLoss(Section):
    """The stage-2 loss mix as the learner takes it, whole: a weight for every loss that
    learner/score_losses.LOSSES defines (a name missing or unknown there is an error, never a zero)."""

    weights: dict[str, float]  # loss name -> weight (0: computed not at all)
    temperature: float = Field(gt=0)  # of the contrastive loss

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
            raise ValueError(f"ranking loss weights must be >= 0 with one > 0, got {value}")
        return value


class ScoreConfig(Section):
    """Stage 2: fine-grained score learning on logit("1") - logit("0"), on the same DeepSpeed learner.

    Each step takes `queries_per_step` training queries, each with up to `positives_per_query` qrels
    positives and `negatives` hard negatives from BM25's top `hard_negative_depth` (positives excluded).
    The learner (section `learner:`) keeps its ranks, ZeRO stage, precision and LoRA; the learning rate and
    its schedule are this section's, over its own `steps`.
    """

    steps: int = Field(50, ge=1)
    init_from: str | None = None  # checkpoint step dir or model dir; None: the warmup stage's final model
    queries_per_step: int = Field(8, ge=1)
    micro_batch_queries: int = Field(1, ge=1)  # per rank, per forward/backward
    positives_per_query: int = Field(1, ge=1)
    negatives: int = Field(7, ge=1)  # hard negatives per query
    hard_negative_depth: int = Field(30, ge=1)
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up of the learning rate, then lr_schedule over `steps`
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    temperature: float = Field(1.0, gt=0)  # of the contrastive loss
    contrastive_weight: float = Field(1.0, ge=0)
    pairwise_weight: float = Field(0.0, ge=0)
    pointwise_weight: float = Field(0.0, ge=0)
    shared_prefix: bool = True  # encode system message + query once per query (see learner.forward)
    # Weights to the actors every N steps (and at every dev evaluation, checkpoint and the end). Nothing
    # samples from the actors in this stage, so on a small CPU the per-step sync is pure overhead.
    sync_every: int = Field(1, ge=1)
    dev_every: int = Field(10, ge=0)  # steps; 0: only before and after
    checkpoint_every: int = Field(50, ge=0)  # steps; 0: only at the end
    # Where each query's hard negatives come from. bm25: drawn from BM25's top hard_negative_depth, afresh
    # each epoch. policy: every mine_every steps the actors (idle in this stage) score the BM25 top
    # hard_negative_depth of the coming mine_every steps' queries under the current weights, and those
    # queries train on the non-positives the model ranks highest (ANCE-style dynamic negatives); a query
    # not mined yet draws BM25's. A candidate scored more than mine_guard above the query's lowest-scored
    # positive is skipped: likely relevant, only unjudged.
    negatives_from: Literal["bm25", "policy"] = "bm25"
    mine_every: int = Field(100, ge=1)
    mine_guard: float = Field(3.0, ge=0)
    # Wait for the actors' work in this stage (dev evaluations, negative mining) before the next step. On a
    # machine whose cores the learner fills, that work beside a step slows both by far more than their sum
    # (two torch processes spinning on two cores); on a cluster the actors have their own (false).
    wait_for_actors: bool = False

    def ranking_loss(self) -> RankingLoss:
        return RankingLoss(
            weights={
                "contrastive": self.contrastive_weight,
                "pairwise": self.pairwise_weight,
                "pointwise": self.pointwise_weight,
            },
            temperature=self.temperature,
        )

    @model_validator(mode="after")
    def _some_loss(self) -> ScoreConfig:
        if self.contrastive_weight + self.pairwise_weight + self.pointwise_weight <= 0:
            raise ValueError("score: at least one of contrastive_weight, pairwise_weight, pointwise_weight must be > 0")
        return self
