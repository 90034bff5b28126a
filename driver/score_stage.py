"""Stage 2 of `prorank train`: fine-grained score learning, what one step does (the loop: driver/loop.py).

The score is logit("1") - logit("0") at the answer position of the stage-1 prompt; no layer is added.
A fresh DeepSpeed learner (same ranks and ZeRO stage, its own optimizer and lr) starts from the warmup
stage's final model (or `score.init_from`). Per step: `score.queries_per_step` training queries, each
with its positives and BM25 hard negatives in one padded batch; the weighted mix of the listwise
contrastive, pairwise and pointwise losses (learner/objectives.py, RankingObjective); one optimizer step;
every `score.sync_every` steps the new weights to every actor over gRPC, so that the actors and the dev
evaluation serve the latest model. With `score.negatives_from: policy` the actors also mine the coming
queries' hard negatives (driver/negative_mining.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prorank.corpus.batches import RankingSampler
from prorank.model.models import load_tokenizer
from prorank.model.prompt import PromptBuilder
from prorank.run import checkpoints

if TYPE_CHECKING:
    from prorank.driver.loop import Job


class ScoreStage:
    """Stage 2 for driver.loop.run_stage, logging at global steps offset + 1 ... offset + score.steps."""

    name = "score"

    def __init__(self, job: Job, init_model: str, offset: int):
        from prorank.driver.negative_mining import NegativeMiner  # noqa: PLC0415 pulls ray, torch, which importing this module does not
        from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, torch, which importing this module does not
        from prorank.learner.objectives import RankingObjective  # noqa: PLC0415 pulls torch, which importing this module does not

        cfg, sc = job.cfg, job.cfg.score
        self.job, self.sc, self.offset = job, sc, offset
        self.steps, self.dev_every, self.checkpoint_every = sc.steps, sc.dev_every, sc.checkpoint_every
        self.wait_for_actors = sc.wait_for_actors
        adapter = None  # with LoRA after the warmup: its adapter, trained on (the actors serve it already)
        if cfg.learner.lora is not None and "warmup" in cfg.train.stages:
            adapter = checkpoints.final_adapter(checkpoints.stage_root(job.out, "warmup"))
        self.learner = LearnerGroup(
            init_model, cfg.score_learner(), RankingObjective.of(sc), sender=job.sync.sender(), adapter=adapter
        )
        job.stack.callback(self.learner.shutdown)
        builder = PromptBuilder.from_config(load_tokenizer(init_model), cfg.prompt)
        self.sampler = RankingSampler(
            job.prompts, job.ranking, sc, builder, cfg.train.seed, cfg.reward.relevance_threshold
        )
        self.miner = NegativeMiner(self.sampler, job.dataset, job.ranking, job.pool, sc)
        self.mine_due = False

    def begin(self, step: int) -> None:
        if not step and "warmup" not in self.job.cfg.train.stages:  # else the warmup's final figures are "before"
            self.job.dev.start()
            if self.wait_for_actors:
                self.job.log_dev(wait=True)
        if self.miner.due(step):  # the actors serve this step's weights (the start model, or the checkpoint's)
            self.miner.start(step)

    def train(self, step: int) -> tuple[dict[str, float], float]:
        metrics = self.miner.collect(wait=self.wait_for_actors)  # the actor's time: the job's clock counts it
        train_metrics = self.learner.step(self.sampler.batch(step, self.sc.queries_per_step))
        metrics.update({f"score/{k}": v for k, v in train_metrics.items()})
        return metrics, train_metrics["step_seconds"]

    def sync_due(self, step: int, dev_due: bool) -> bool:
        # Nothing samples from the actors in this stage: they need the weights only to evaluate or mine.
        self.mine_due = step < self.steps and self.miner.due(step)
        return dev_due or self.mine_due or step % self.sc.sync_every == 0 or step == self.steps

    def synced(self, step: int, metrics: dict[str, float]) -> None:
        if self.mine_due:
            self.miner.start(step)  # queued behind the pull of this version, as the dev evaluation

    def end(self, step: int) -> None:
        if self.job.stopping and step % self.sc.sync_every:  # stopped between syncs: the actors get the model saved
            self.job.run.log(self.offset + step, self.job.sync(self.offset + step))
