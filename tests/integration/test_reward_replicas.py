"""The reward service as Ray actors: two replicas on the local Ray, each its own gRPC server on loopback,
real SciFact train qrels. (The service itself: tests/unit/test_reward.py.)"""

from __future__ import annotations

from prorank.protocol import reward_pb2
from prorank.reward.client import SyncRewardClient
from prorank.reward.replica import start_replicas
from prorank.settings.config import DataConfig, RewardConfig

TOKEN = "test-token-123"


def test_replicas_as_ray_actors(ray_local, scifact_dir):
    handles, addresses = start_replicas(
        DataConfig(path=str(scifact_dir), split="train"), RewardConfig(replicas=2, num_cpus=0.5), TOKEN
    )
    try:
        assert len(set(addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
        client = SyncRewardClient(addresses, TOKEN)
        results = [
            client.score([reward_pb2.Group(request_id=f"r{i}", query_id="0", doc_id="31715818", completions=["1"])])[0]
            for i in range(4)
        ]
        assert all(r.label == 1 and r.mean == 2 for r in results)
        client.close()
    finally:
        for h in handles:
            ray_local.kill(h)
