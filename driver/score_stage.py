"""Stage 2 of `prorank train`: fine-grained score learning, one loop read top to bottom.

The score is logit("1") - logit("0") at the answer position of the stage-1 prompt; no layer is added.
A fresh DeepSpeed learner (same ranks and ZeRO stage, its own optimizer and lr) starts from the warmup
stage's final model (or `score.init_from`). Per step: `score.queries_per_step` training queries, each
with its positives and BM25 hard negatives in one padded batch; the weighted mix of the listwise
contrastive, pairwise and pointwise losses (learner.score_losses); one optimizer step; the new weights
to every actor over gRPC, so that the actors and the dev evaluation serve the latest model. With
`score.negatives_from: policy` the actors also mine the coming queries' hard negatives (driver.negative_mining).
"""

from __future__ import annotations

import time


def run_score(job, resume: bool, init_model: str, offset: int) -> None:
    """Train stage 2 to `score.steps`, logging at global steps offset + 1 ... offset + score.steps."""
    from driver.negative_mining import NegativeMiner
    from learner.group import LearnerGroup
    from prorank.batches import RankingSampler
    from prorank.models import load_tokenizer
    from prorank.prompt import PromptBuilder

    cfg, sc, run, dev = job.cfg, job.cfg.score, job.run, job.dev
    root = job.out / "score-checkpoints"
    ranking_loss = {"weights": {"contrastive": sc.contrastive_weight, "pairwise": sc.pairwise_weight,
                                "pointwise": sc.pointwise_weight}, "temperature": sc.temperature}
    learner = LearnerGroup(init_model, cfg.score_learner(), cfg.sampling.temperature, ranking_loss)
    job.stack.callback(learner.shutdown)
    job.sync.attach(learner)
    job.placement["score_learner"] = sorted(set(learner.nodes()))
    builder = PromptBuilder.from_config(load_tokenizer(init_model), cfg.prompt)
    sampler = RankingSampler(job.prompts, job.ranking, sc, builder, cfg.train.seed,
                             cfg.reward.relevance_threshold)
    miner = NegativeMiner(sampler, job.dataset, job.ranking, job.pool, sc)
    step = learner.load(root)["steps"] if resume and (root / "LATEST").is_file() else 0
    if step:  # resumed: the actors start from the checkpoint's weights
        run.log(offset + step, job.sync(offset + step))
    elif "warmup" not in job.cfg.train.stages:  # else the warmup's final dev figures are the "before"
        dev.start()
        if sc.wait_for_actors:
            job.log_dev(wait=True)
    if miner.due(step):  # the actors serve this step's weights (the start model, or the checkpoint's)
        miner.start(step)

    bar = job.progress_bar("score", step, sc.steps)
    job.clock.restart()
    while step < sc.steps:
        scaled = job.between_steps("score", offset + step)
        if job.stopping:
            break
        metrics = {**scaled, **miner.collect(wait=sc.wait_for_actors)}  # the actor's time: job.clock counts it
        groups = sampler.batch(step, sc.queries_per_step)
        train_metrics = learner.score_step(groups)
        metrics.update({f"score/{k}": v for k, v in train_metrics.items()})
        learner_seconds = train_metrics["step_seconds"]
        step += 1
        dev_due = sc.dev_every and step % sc.dev_every == 0 and step < sc.steps
        save_due = sc.checkpoint_every and step % sc.checkpoint_every == 0 and step < sc.steps
        mine_due = step < sc.steps and miner.due(step)
        if dev_due or mine_due or step % sc.sync_every == 0 or step == sc.steps:
            metrics.update(job.sync(offset + step))
            learner_seconds += metrics["weights/sync_seconds"]
        if mine_due:
            miner.start(step)  # queued behind the pull of this version, as the dev evaluation
        if dev_due:
            dev.start()  # queued behind the pull of this version: it measures this step's weights
            if sc.wait_for_actors:
                job.log_dev(wait=True)
        if save_due:
            clock = time.perf_counter()
            learner.save(root)
            learner_seconds += time.perf_counter() - clock
        metrics.update(job.clock(learner_seconds))
        run.log(offset + step, metrics)
        job.log_dev()
        bar.update(1)
        bar.set_postfix_str(run.console_line(), refresh=True)
    bar.close()
    if job.stopping and step % sc.sync_every:  # stopped between syncs: the actors get the model saved
        run.log(offset + step, job.sync(offset + step))

    learner.save(root)
    job.log_dev(wait=True)  # one still under way
    dev.start()  # the final weights' figures (the last sync was queued before this)
    job.log_dev(wait=True)
    learner.shutdown()
