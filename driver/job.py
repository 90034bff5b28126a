"""`prorank train`: the job, read top to bottom: its services, then its stages, then its summary.

Start-up: Ray (embedded, or joined with `train.ray_address`), the reward replicas (when the warmup
runs) and the rollout actors. Then each stage of `train.stages` in order: `warmup` (stage 1, GRPO prompt
warmup: driver/warmup_stage.py) and `score` (stage 2, fine-grained score learning: driver/score_stage.py),
each with its own DeepSpeed learner, whose rank 0 serves its weights to the actors over gRPC after every
step (driver/weight_sync.py). The weight version and the TensorBoard step run on across stages.

Every `dev_every` steps: nDCG@10 on held-out training queries, scored on a rollout actor while training
goes on (driver/dev_eval.py); every `checkpoint_every` steps a checkpoint (DeepSpeed state plus a plain
model folder) that `resume` continues from, with the same data order. A stage whose checkpoint is
already complete is skipped. Everything started is stopped in reverse order on success, on Ctrl-C and on error.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WARMUP_CHECKPOINTS, SCORE_CHECKPOINTS = "checkpoints", "score-checkpoints"


@dataclass
class Job:
    """What the stages share: the config, the data, the running services and the run's log."""

    cfg: object
    out: Path
    stack: ExitStack
    dataset: object
    ranking: dict
    prompts: object  # prorank.batches.PromptSampler: the train/dev query split and warmup batches
    model_path: str  # the weights the actors and the dev evaluation started from
    progress: bool = True
    pool: object = None
    rewards: object = None
    replicas: object = None  # reward.replica.ReplicaSet, while the warmup runs
    sync: object = None  # driver.weight_sync.WeightSync
    dev: object = None  # driver.dev_eval.DevEval
    clock: object = None  # BusyClock
    run: object = None
    control: object = None  # driver.control.JobControl: `prorank scale actors N` writes to it
    placement: dict = None  # role -> Ray node ids, for the summary
    stopping: bool = False  # `prorank stop` asked, or train.max_hours reached: the stages end after this step

    def between_steps(self, stage: str, step: int) -> dict[str, float]:
        """Apply `prorank scale` (or per-node following) to the actor pool and report the job's state."""
        import ray

        from driver.control import wanted_actors

        actors = self.cfg.actors
        wanted = wanted_actors(self.control, actors.per_node, actors.resources, self.pool.size)
        if wanted != self.pool.size:
            log.info("step %d: %d -> %d rollout actors", step, self.pool.size, wanted)
            self.pool.scale(wanted)
        if self.replicas and not self.cfg.reward.addresses and (moved := self.replicas.refresh()):
            log.info("step %d: reward replicas now at %s", step, moved)  # one was restarted
            self.rewards.set_addresses(moved)
        self.control.report.remote({"stage": stage, "step": step, "actors": self.pool.size,
                                    "versions": self.pool.versions()})
        if ray.get(self.control.stop_requested.remote(), timeout=10) and not self.stopping:
            log.info("step %d: stop requested; ending the job", step)
            self.stopping = True
        budget = self.cfg.train.max_hours
        if budget and self.run.wall_hours() >= budget and not self.stopping:
            log.info("step %d: the job clock reached train.max_hours (%.2f h); ending the job", step, budget)
            self.stopping = True
        return {"actors/count": float(self.pool.size), "actors/ready": float(self.pool.ready),
                "actors/lost": float(self.pool.replaced), "rollout/requeued": float(self.pool.requeued),
                "weights/relay_fallbacks": float(self.pool.relay_fallbacks)}

    def log_dev(self, wait: bool = False) -> None:
        """Log the dev figures at the step whose weights they measured, once they are in."""
        if (done := self.dev.finished(wait)) is not None:
            self.run.log(*done)

    def progress_bar(self, stage: str, start: int, total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, disable=not self.progress, unit="step", dynamic_ncols=True,
                   desc=stage)
        self.stack.callback(bar.close)
        return bar


class BusyClock:
    """Per step: the wall seconds since the last step ended, and which share of them the learner and the
    actors were busy. Learner seconds are what the driver waited on the ranks: the step, the publish
    (with the actors' pulls queued) and a checkpoint. Actor seconds are the actors' own (generating,
    scoring, pulling weights), summed over actors and divided by their number."""

    def __init__(self, pool):
        self.pool = pool
        self.restart()

    def restart(self) -> None:
        self.mark, self.actor_seconds = time.perf_counter(), self.pool.busy_seconds

    def __call__(self, learner_seconds: float) -> dict[str, float]:
        now, busy = time.perf_counter(), self.pool.busy_seconds
        wall, actor_seconds = now - self.mark, busy - self.actor_seconds
        self.mark, self.actor_seconds = now, busy
        # A chunk counts when it is collected, which may be in the step after the one it ran in: capped at 1.
        return {"time/step_seconds": wall, "time/learner_seconds": learner_seconds,
                "time/learner_busy_fraction": min(1.0, learner_seconds / wall),
                "time/actor_busy_fraction": min(1.0, actor_seconds / (wall * max(1, self.pool.size)))}


def completed_steps(root: Path) -> int:
    """Steps of the checkpoint LATEST points to under `root`; 0 when there is none."""
    latest = root / "LATEST"
    if not latest.is_file():
        return 0
    return json.loads((root / latest.read_text().strip() / "driver.json").read_text())["steps"]


def train(cfg, resume: bool = False, progress: bool = True, on_start=None) -> dict:
    """Run the job described by `cfg` (a validated ProRankConfig); returns the summary it writes.
    `on_start()` is called once the data and models are checked, before anything is started or written."""
    from actors.pool import ActorPool
    from driver.control import start_control
    from driver.dev_eval import DevEval
    from driver.score_stage import run_score
    from driver.warmup_stage import run_warmup
    from driver.weight_sync import WeightSync
    from prorank.batches import PromptSampler
    from prorank.bm25 import bm25_search
    from prorank.data import load_dataset
    from prorank.models import checkpoint_model_dir, resolve_model
    from prorank.prompt import check_model_layout
    from prorank.tracking import RunLog
    from reward.client import SyncRewardClient, client_options
    from reward.replica import ReplicaSet

    started = time.monotonic()
    tc, sc = cfg.train, cfg.score
    # A start model trained on another prompt layout is refused before anything starts.
    check_model_layout(resolve_model(cfg.model), cfg.prompt.layout)
    if sc.init_from:
        check_model_layout(checkpoint_model_dir(sc.init_from), cfg.prompt.layout)
    out = Path(tc.output_dir)
    data_cfg = cfg.data.model_copy(update={"split": tc.split})
    dataset = load_dataset(data_cfg)
    depth = max(tc.hard_negative_depth, tc.dev_depth, sc.hard_negative_depth if "score" in tc.stages else 0)
    ranking = bm25_search(dataset, dataset.query_ids, cfg.bm25.model_copy(update={"top_k": depth}))
    token = _job_token(cfg)
    if on_start:
        on_start()

    # Which stages still have work, and the model each starts from (a finished warmup's final model).
    warmup_done = completed_steps(out / WARMUP_CHECKPOINTS) if resume else 0
    score_done = completed_steps(out / SCORE_CHECKPOINTS) if resume else 0
    run_warm = "warmup" in tc.stages and warmup_done < tc.steps
    run_sc = "score" in tc.stages and score_done < sc.steps
    offset = tc.steps if "warmup" in tc.stages else 0  # the score stage's steps follow the warmup's
    if sc.init_from:
        score_init = checkpoint_model_dir(sc.init_from)
    elif "warmup" in tc.stages:
        score_init = str(out / WARMUP_CHECKPOINTS / "LATEST")  # resolved once the warmup has finished
    else:
        score_init = resolve_model(cfg.model)
    model_path = resolve_model(cfg.model) if run_warm else checkpoint_model_dir(score_init)

    with ExitStack() as stack:  # stops everything started, in reverse order, however the run ends
        prompts = PromptSampler(dataset, ranking, tc, cfg.reward.relevance_threshold)
        job = Job(cfg, out, stack, dataset, ranking, prompts, model_path, progress, placement={})
        _start_ray(cfg, stack)
        addresses = []
        if run_warm:
            job.replicas = ReplicaSet(data_cfg, cfg.reward, token)
            stack.callback(job.replicas.stop)
            addresses = list(job.replicas.addresses)
            job.rewards = SyncRewardClient(cfg.reward.addresses or addresses, token, **client_options(cfg.reward))
            stack.callback(job.rewards.close)
        job.control = start_control(tc.job_name)
        stack.callback(ray_kill, job.control)
        job.pool = ActorPool(model_path, cfg.actors, cfg.sampling, cfg.prompt, cfg.weights).start(wait=False)
        stack.callback(job.pool.shutdown)
        job.sync = WeightSync(job.pool, token, cfg.weights)
        job.dev = DevEval(cfg, dataset, ranking, job.prompts.dev_query_ids, job.pool)
        job.clock = BusyClock(job.pool)
        job.pool.wait_ready()
        resumed_at = warmup_done if run_warm else offset + score_done
        job.run = RunLog(out, start_step=resumed_at, started=started)
        stack.callback(job.run.close)
        log.info("job %s: stages %s from step %d", tc.job_name, tc.stages, resumed_at)

        if run_warm:
            run_warmup(job, resume=warmup_done > 0)
        if run_sc and not job.stopping:
            run_score(job, resume=score_done > 0, init_model=checkpoint_model_dir(score_init), offset=offset)

        job.pool.wait_synced()
        job.placement["actors"] = sorted(set(job.pool.nodes().values()))
        summary = {"steps": job.run.last_step, "stages": tc.stages, "versions": job.pool.versions(),
                   "placement": job.placement, "final": job.run.latest, "dev_bm25": job.dev.bm25,
                   "output_dir": str(out), "model": _final_model(out, tc.stages),
                   "prompt": cfg.prompt.model_dump(), "addresses": [job.sync.address, *addresses]}
        (out / "summary.json").write_text(_json(summary))
        return summary


def _final_model(out: Path, stages: list[str]) -> str | None:
    """The model folder of the job's last stage (what `prorank export` and `Reranker` take)."""
    root = out / (SCORE_CHECKPOINTS if "score" in stages else WARMUP_CHECKPOINTS)
    latest = root / "LATEST"
    return str(root / latest.read_text().strip() / "model") if latest.is_file() else None


def _job_token(cfg) -> str:
    """The configured token (file or $PRORANK_TOKEN), else a fresh one that only this job's services know."""
    from prorank.security import TOKEN_ENV, load_token

    if cfg.reward.token_file or cfg.weights.token_file or os.environ.get(TOKEN_ENV):
        return load_token(cfg.reward.token_file or cfg.weights.token_file)
    return secrets.token_urlsafe(32)


def _start_ray(cfg, stack: ExitStack) -> None:
    import ray

    if ray.is_initialized():  # a caller's Ray (a test, a notebook): use it, leave it running
        return
    if cfg.train.ray_address:
        ray.init(address=cfg.train.ray_address, log_to_driver=False)
    else:
        # Enough logical CPUs for every actor the job starts, even on a 2-core machine.
        need = (cfg.actors.num_actors * cfg.actors.num_cpus + cfg.learner.num_ranks * cfg.learner.num_cpus
                + cfg.reward.replicas * cfg.reward.num_cpus)
        cpus = cfg.train.ray_num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stack.callback(ray.shutdown)


def ray_kill(handle) -> None:
    import ray

    ray.kill(handle)


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2, default=float) + "\n"
