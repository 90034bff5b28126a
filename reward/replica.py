"""Reward service replicas as Ray actors, for the training job: each loads the qrels and serves."""

from __future__ import annotations

import ray

from prorank.config import DataConfig, RewardConfig
from prorank.security import announced_address


class RewardReplica:
    def __init__(self, data: DataConfig, cfg: RewardConfig, token: str):
        from prorank.data import load_dataset
        from reward.server import RewardServer

        # Several replicas may share a node: each takes a free port.
        self.server = RewardServer(load_dataset(data).qrels, cfg.model_copy(update={"port": 0}), token).start()

    def address(self) -> str:
        return announced_address(self.server.cfg.host, self.server.port)

    def stop(self) -> None:
        self.server.stop()


def start_replicas(data: DataConfig, cfg: RewardConfig, token: str) -> tuple[list, list[str]]:
    """`cfg.replicas` reward actors; returns their handles and addresses once all are serving."""
    cls = ray.remote(RewardReplica).options(num_cpus=cfg.num_cpus, resources=cfg.resources or None,
                                            max_restarts=0)
    handles = [cls.remote(data, cfg, token) for _ in range(cfg.replicas)]
    return handles, ray.get([h.address.remote() for h in handles])
