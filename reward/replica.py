"""Reward service replicas as Ray actors, for the training job: each loads the qrels and serves."""

from __future__ import annotations

import logging

import ray

from prorank.corpus.data import load_dataset
from prorank.guard.grpc_core_log import fold_grpc_core_lines
from prorank.guard.security import announced_address
from prorank.reward.server import RewardServer
from prorank.settings.config import DataConfig, RewardConfig

log = logging.getLogger(__name__)


class RewardReplica:
    def __init__(self, data: DataConfig, cfg: RewardConfig, token: str):

        fold_grpc_core_lines(cfg.log_refusals_every_seconds)  # this actor's process is the replica's own
        # Several replicas may share a node: each takes a free port.
        self.server = RewardServer(load_dataset(data).qrels, cfg.model_copy(update={"port": 0}), token).start()

    def address(self) -> str:
        return announced_address(self.server.cfg.host, self.server.port)

    def stop(self) -> None:
        self.server.stop()


def start_replicas(data: DataConfig, cfg: RewardConfig, token: str) -> tuple[list, list[str]]:
    """`cfg.replicas` reward actors; returns their handles and addresses once all are serving. Ray
    restarts one that dies up to `cfg.max_restarts` times (on a new port: see ReplicaSet)."""
    cls = ray.remote(RewardReplica).options(
        num_cpus=cfg.num_cpus, resources=cfg.resources or None, max_restarts=cfg.max_restarts
    )
    handles = [cls.remote(data, cfg, token) for _ in range(cfg.replicas)]
    return handles, ray.get([h.address.remote() for h in handles])


class ReplicaSet:
    """The job's replicas and the addresses they serve on now. A replica that died and was restarted
    by Ray serves on a new port; `refresh()`, called between steps, finds that out without waiting."""

    def __init__(self, data: DataConfig, cfg: RewardConfig, token: str):
        self.handles, addresses = start_replicas(data, cfg, token)
        self.addresses = list(addresses)
        self._asking: dict[int, object] = {}  # replica index -> a pending address() call

    def refresh(self) -> list[str] | None:
        """The new address list when a replica moved since the last call, else None."""
        for i, handle in enumerate(self.handles):
            self._asking.setdefault(i, handle.address.remote())
        ready, _ = ray.wait(list(self._asking.values()), num_returns=len(self._asking), timeout=0)
        moved = False
        for i, ref in [(i, r) for i, r in self._asking.items() if r in ready]:
            del self._asking[i]
            try:
                address = ray.get(ref)
            except ray.exceptions.RayActorError:  # gone for good: the client keeps resting its address
                continue
            moved |= address != self.addresses[i]
            self.addresses[i] = address
        return list(self.addresses) if moved else None

    def stop(self) -> None:
        for replica in self.handles:
            try:
                ray.get(replica.stop.remote(), timeout=10)
            except Exception as err:  # noqa: BLE001 - it is killed next either way
                log.warning("reward replica did not stop cleanly: %s", err)
            ray.kill(replica)
