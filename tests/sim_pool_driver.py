"""Run inside the simulated cluster's head node by tests/integration/test_simcluster.py: a real ActorPool of 2 vLLM
actors (one per actor node) streams a long batch; after the first answers it says so on stdout, so the
test can cut a node off mid-stream; at the end it prints what came back. JSON lines."""

from __future__ import annotations

import json
import sys

import ray

from prorank.actors.pool import ActorPool
from prorank.corpus.data import load_local
from prorank.run.rollout import RolloutRequest
from prorank.settings.config import ActorConfig, PromptConfig, SamplingConfig


def main(address: str, model: str, scifact: str, n: int) -> None:
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    data = load_local(scifact, "test")
    pairs = [(q, d) for q in data.query_ids for d in data.qrels[q]]
    requests = [
        RolloutRequest(f"r{i}", q, d, data.queries[q], data.corpus[d].text[:300])
        for i, (q, d) in enumerate(pairs[i % len(pairs)] for i in range(n))
    ]
    actors = ActorConfig(num_actors=2, resources={"actor_node": 1}, max_model_len=256, chunk_size=8, kv_cache_gib=1)
    pool = ActorPool(model, actors, SamplingConfig(group_size=4, max_tokens=1), PromptConfig(max_length=96))
    pool.start()
    print(json.dumps({"ready": pool.ready, "nodes": sorted(set(pool.nodes().values()))}), flush=True)
    answered = []
    for result in pool.stream(requests):
        answered.append(result.request_id)
        if len(answered) == 1:
            print(json.dumps({"first": result.actor}), flush=True)
    print(
        json.dumps(
            {
                "answered": answered,
                "requeued": pool.requeued,
                "lost": pool.replaced,
                "actors": sorted({r for r in pool.slots}),
            }
        ),
        flush=True,
    )
    pool.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
