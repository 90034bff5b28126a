"""The job's Ray: embedded and local by default, or a cluster's; started once per command, stopped with it."""

from __future__ import annotations

import os
from contextlib import ExitStack

import ray


def start_ray(cfg, stack: ExitStack) -> None:
    """An embedded local Ray sized for the job (or the cluster at `train.ray_address`), stopped by `stack`;
    a Ray the caller started already is used and left running."""
    if ray.is_initialized():  # a caller's Ray (a test, a notebook): use it, leave it running
        return
    if cfg.train.ray_address:
        ray.init(address=cfg.train.ray_address, log_to_driver=False)
    else:
        # Enough logical CPUs for every actor the job starts, even on a 2-core machine.
        need = (
            cfg.actors.num_actors * cfg.actors.num_cpus
            + cfg.learner.num_ranks * cfg.learner.num_cpus
            + cfg.reward.replicas * cfg.reward.num_cpus
        )
        cpus = cfg.train.ray_num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stack.callback(ray.shutdown)


def ray_kill(handle) -> None:

    ray.kill(handle)
