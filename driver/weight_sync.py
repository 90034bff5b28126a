"""Weight sync off the critical path: the learner's rank 0 publishes a version through its end of the
weight transport, reading the parameters where they lie, and every actor is sent a pull that runs after
the chunks it has in flight. The driver only waits for the publish; the weights never pass through it.

The transport is chosen here, once for the job (gRPC: weights/transport.py); the learner and the actors
are handed its two ends. This object owns the job's version number: the last version published. With
`learner.lora` a version is the LoRA adapter alone, and the actors serve it on the base model."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prorank.weights.transport import GrpcTransport

if TYPE_CHECKING:
    from prorank.actors.pool import ActorPool
    from prorank.learner.group import LearnerGroup


class WeightSync:
    learner: LearnerGroup  # the stage's, once `attach`ed
    pool: ActorPool

    def __init__(self, token: str, cfg, lora=None):
        self.transport = GrpcTransport(token, cfg, lora)
        self.address = ""
        self.version = 0

    def receivers(self):
        """The actor pool's factory of receivers (actor name -> its end of the transport)."""
        return self.transport.receiver

    def sender(self):
        """A fresh learner end, for a stage's learner to serve from its rank 0."""
        return self.transport.sender()

    def attach(self, learner: LearnerGroup, pool: ActorPool) -> None:
        """Serve the versions of `learner` (a stage's LearnerGroup, made with `sender()`) to `pool`'s actors."""
        self.learner, self.pool, self.address = learner, pool, learner.serve_weights()

    def __call__(self, version: int) -> dict[str, float]:
        """Publish the learner's weights as `version` and have every actor pull it after its chunks in flight."""
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than the published {self.version}")
        start = time.perf_counter()
        published = self.learner.publish(version, self.pool.receiver_names())
        self.version = version
        self.pool.sync_weights(self.address, version, wait=False)
        return {
            "weights/sync_seconds": time.perf_counter() - start,
            "weights/publish_seconds": published["seconds"],
            "weights/bytes": published["bytes"],
            "weights/changed_bytes": published["changed_bytes"],
            "weights/changed_tensors": published["changed_tensors"],
            "weights/version": float(version),
            "weights/received_bytes": self.pool.received_bytes,
            "weights/refused": float(self.pool.refused),
        }
