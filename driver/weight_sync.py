"""Weight sync off the critical path: the learner's rank 0 publishes a version on its own weight server,
reading the parameters where they lie, and every actor is sent a pull that runs after the chunks it has
in flight. The driver only waits for the publish; the weights never pass through it."""

from __future__ import annotations

import time


class WeightSync:
    def __init__(self, pool, token: str, cfg):
        self.pool, self.token, self.cfg = pool, token, cfg
        self.learner, self.address = None, ""

    def attach(self, learner) -> None:
        """Serve the versions of `learner` (a stage's LearnerGroup) from its rank 0."""
        self.learner, self.address = learner, learner.serve_weights(self.token, self.cfg)

    def __call__(self, version: int) -> dict[str, float]:
        """Publish the learner's weights as `version` and have every actor pull it after its chunks in flight."""
        start = time.perf_counter()
        published = self.learner.publish(version, self.pool.receiver_names())
        self.pool.sync_weights(self.address, self.token, self.cfg.tls_ca, self.cfg.wait_seconds, version, wait=False)
        return {"weights/sync_seconds": time.perf_counter() - start, "weights/publish_seconds": published["seconds"],
                "weights/bytes": published["bytes"], "weights/changed_bytes": published["changed_bytes"],
                "weights/changed_tensors": published["changed_tensors"], "weights/version": float(version),
                "weights/received_bytes": self.pool.received_bytes, "weights/refused": float(self.pool.refused)}
