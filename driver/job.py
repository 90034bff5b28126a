"""`prorank train`: the job, read top to bottom: its services, then its stages, then its summary.

Start-up: Ray (embedded, or joined with `train.ray_address`), the reward replicas (when the warmup
runs) and the rollout actors. Then each stage of `train.stages` in order, through the one stage loop
(driver/loop.py): `warmup` (stage 1, GRPO prompt warmup: driver/warmup_stage.py) and `score` (stage 2,
fine-grained score learning: driver/score_stage.py), each with its own DeepSpeed learner, whose rank 0
serves its weights to the actors (driver/weight_sync.py picks the transport). The weight version and the
TensorBoard step run on across stages.

Every `dev_every` steps: nDCG@10 on held-out training queries, scored on a rollout actor while training
goes on (driver/dev_eval.py); every `checkpoint_every` steps a checkpoint (DeepSpeed state plus a plain
model folder; driver/checkpointing.py keeps the last few) that `resume` continues from, with the same data
order. A stage whose checkpoint is already complete is skipped. Everything started is stopped in reverse
order on success, on error and on a signal: SIGTERM or SIGINT end the job after its step with a checkpoint
(driver/stop.py). One job at a time holds the output folder (prorank/run/run_lock.py).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from contextlib import ExitStack
from pathlib import Path

from prorank.actors.pool import ActorPool
from prorank.corpus.batches import PromptSampler, training_candidates
from prorank.driver.control import start_control
from prorank.driver.dev_eval import DevEval, load_dev_sets
from prorank.driver.loop import BusyClock, Job, StopFlag, run_stage
from prorank.driver.ray_session import ray_kill, start_ray
from prorank.driver.score_stage import ScoreStage
from prorank.driver.stop import StopNow, StopSignals
from prorank.driver.synthesis import synthesis_complete, synthesize
from prorank.driver.warmup_stage import WarmupStage
from prorank.driver.weight_sync import WeightSync
from prorank.guard.security import TOKEN_ENV, load_token
from prorank.model.models import checkpoint_model_dir, resolve_model
from prorank.model.prompt import check_model_layout
from prorank.reward.client import SyncRewardClient, client_options
from prorank.reward.replica import ReplicaSet
from prorank.run import checkpoints
from prorank.run.run_lock import lock_output
from prorank.run.tracking import RunLog
from prorank.settings.config_file import ConfigError

log = logging.getLogger(__name__)


def train(cfg, resume: bool = False, progress: bool = True, on_start=None, signals: StopSignals | None = None) -> dict:
    """Run the job described by `cfg` (a validated ProRankConfig); returns the summary it writes.
    `on_start()` is called once the data and models are checked, before anything is started or written.
    `signals` (the CLI's): once Ray is up, SIGTERM/SIGINT end the job after its step, with a checkpoint."""

    started = time.monotonic()
    tc, wc, sc = cfg.train, cfg.warmup, cfg.score
    if cfg.synthesis is not None and Path(cfg.data.path or "").resolve() != Path(cfg.synthesis.output).resolve():
        raise ConfigError(
            f"synthesis.output ({cfg.synthesis.output}) must be data.path ({cfg.data.path}): the job trains on "
            "the queries it synthesizes"
        )
    if cfg.synthesis is not None and not synthesis_complete(cfg.synthesis):
        # No labels: the actors first write the training queries (data.path is the synthesis's output).
        written = synthesize(cfg, progress, signals)
        if written["stopped"]:
            raise StopNow(f"synthesis stopped ({written['stopped']}); its log keeps every document written")
        started = time.monotonic()  # train.max_hours is the training's clock: the synthesis has its own report
    # A start model trained on another prompt layout is refused before anything starts.
    check_model_layout(resolve_model(cfg.model), cfg.prompt.layout)
    if sc.init_from:
        check_model_layout(checkpoint_model_dir(sc.init_from), cfg.prompt.layout)
    out = Path(tc.output_dir)
    data_cfg = cfg.data.model_copy(update={"split": tc.split})  # the reward replicas' qrels
    dataset, ranking = training_candidates(cfg)
    more_dev = load_dev_sets(cfg, dataset.name)  # train.dev_sets: loaded and checked before anything starts
    token = _job_token(cfg)
    # A second job on this folder is refused here: after the inputs are checked (a bad one leaves no
    # folder behind), before anything is started or written.
    lock = lock_output(out)
    if on_start:
        on_start()

    # Which stages still have work, and the model each starts from (a finished warmup's final model).
    warmup_done = checkpoints.completed_steps(checkpoints.stage_root(out, "warmup")) if resume else 0
    score_done = checkpoints.completed_steps(checkpoints.stage_root(out, "score")) if resume else 0
    run_warm = "warmup" in tc.stages and warmup_done < wc.steps
    run_sc = "score" in tc.stages and score_done < sc.steps
    offset = wc.steps if "warmup" in tc.stages else 0  # the score stage's steps follow the warmup's
    if sc.init_from:
        score_init = checkpoint_model_dir(sc.init_from)
    elif "warmup" in tc.stages:
        # Resolved once the warmup has finished.
        score_init = str(checkpoints.stage_root(out, "warmup") / checkpoints.LATEST)
    else:
        score_init = resolve_model(cfg.model)
    if cfg.learner.lora is not None and "warmup" in tc.stages:
        # LoRA: the base stays the start model in both stages; the score stage goes on with the warmup's adapter.
        score_init = resolve_model(cfg.model)
    model_path = resolve_model(cfg.model) if run_warm else checkpoint_model_dir(score_init)

    with ExitStack() as stack:  # stops everything started, in reverse order, however the run ends
        stack.callback(lock.close)
        prompts = PromptSampler(dataset, ranking, tc, wc, cfg.reward.relevance_threshold)
        halt = StopFlag()
        start_ray(cfg, stack)
        if signals:  # ray.init put its own SIGTERM handler (a stack dump, exit 134) over the CLI's
            signals.install(on_stop=lambda: halt.request(f"{signals.name} received"))
        replicas, rewards, addresses = None, None, []
        if run_warm:
            replicas = ReplicaSet(data_cfg, cfg.reward, token)
            stack.callback(replicas.stop)
            addresses = list(replicas.addresses)
            rewards = SyncRewardClient(cfg.reward.addresses or addresses, token, **client_options(cfg.reward))
            stack.callback(rewards.close)
        control = start_control(tc.job_name)
        stack.callback(ray_kill, control)
        # The weight transport: its two ends go to the actors and learners (with LoRA, versions are adapters).
        sync = WeightSync(token, cfg.weights, cfg.learner.lora)
        pool = ActorPool(model_path, cfg.actors, cfg.sampling, cfg.prompt, sync.receivers()).start(wait=False)
        stack.callback(pool.shutdown)
        dev = DevEval(cfg, dataset, ranking, prompts.dev_query_ids, pool, more_dev)
        clock = BusyClock(pool)
        pool.wait_ready()
        resumed_at = warmup_done if run_warm else offset + score_done
        run = RunLog(out, start_step=resumed_at, started=started)
        stack.callback(run.close)
        job = Job(
            cfg,
            out,
            stack,
            dataset,
            ranking,
            prompts,
            model_path,
            pool,
            sync,
            dev,
            clock,
            run,
            control,
            halt,
            rewards,
            replicas,
            signals,
            progress,
        )
        log.info("job %s: stages %s from step %d", tc.job_name, tc.stages, resumed_at)

        if run_warm:
            run_stage(job, WarmupStage(job), resume=warmup_done > 0)
        if run_sc and not job.stopping:
            run_stage(job, ScoreStage(job, checkpoint_model_dir(score_init), offset), resume=score_done > 0)

        if not (signals and signals.received):  # a scheduler's stop: no time to wait for the actors
            job.pool.wait_synced()
        job.placement["actors"] = sorted(set(job.pool.nodes().values()))
        summary = {
            "steps": job.run.last_step,
            "stages": tc.stages,
            "versions": job.pool.versions(),
            "placement": job.placement,
            "final": job.run.latest,
            "dev_bm25": job.dev.bm25,
            "output_dir": str(out),
            "model": checkpoints.final_model(checkpoints.stage_root(out, tc.stages[-1])),
            "prompt": cfg.prompt.model_dump(),
            "addresses": [job.sync.address, *addresses],
            "dev": job.run.dev_history(),
            "dev_query_ids": job.prompts.dev_query_ids,
            "job_hours": job.run.wall_hours(),
            "stopped": halt.reason,
            "preempted": halt.preempted,
        }
        (out / "summary.json").write_text(_json(summary))
        return summary


def _job_token(cfg) -> str:
    """The configured token (file or $PRORANK_TOKEN), else a fresh one that only this job's services know."""

    if cfg.reward.token_file or cfg.weights.token_file or os.environ.get(TOKEN_ENV):
        return load_token(cfg.reward.token_file or cfg.weights.token_file)
    return secrets.token_urlsafe(32)


def _json(data) -> str:

    return json.dumps(data, indent=2, default=float) + "\n"
