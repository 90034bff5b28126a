"""Scored completions/s: the reward service over loopback gRPC vs the scoring function in-process, at
batches of 64 and 1024 completions (groups of G=8), on real SciFact train qrels, in one script.

    .venv/bin/python -m bench.reward --data ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import random
import time

from prorank.corpus.data import load_dataset
from prorank.protocol import reward_pb2
from prorank.reward.client import SyncRewardClient, client_options
from prorank.reward.scoring import group_stats, label_of, score_completions
from prorank.reward.server import RewardServer
from prorank.settings.config import DataConfig, RewardConfig

TOKEN = "bench-token"


def make_groups(qrels, n_groups: int, g: int, rng: random.Random) -> list[reward_pb2.Group]:
    qids = list(qrels)
    groups = []
    for i in range(n_groups):
        qid = rng.choice(qids)
        doc = rng.choice(list(qrels[qid])) if rng.random() < 0.5 else "not-judged"
        groups.append(
            reward_pb2.Group(
                request_id=f"r{i}",
                query_id=qid,
                doc_id=doc,
                completions=[rng.choice(["0", "1", "1 ", "x"]) for _ in range(g)],
            )
        )
    return groups


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--calls", type=int, default=50, help="calls per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = RewardConfig(port=0)
    qrels = load_dataset(DataConfig(path=args.data, split="train")).qrels
    server = RewardServer(qrels, cfg, TOKEN).start()
    client = SyncRewardClient([server.address], TOKEN, **client_options(cfg))
    rng = random.Random(0)
    try:
        for batch in (64, 1024):
            groups = make_groups(qrels, batch // args.group_size, args.group_size, rng)
            plain = [(g.query_id, g.doc_id, list(g.completions)) for g in groups]

            def in_process():
                for _ in range(args.calls):
                    for qid, doc, completions in plain:
                        group_stats(score_completions(completions, label_of(qrels[qid], doc, 1), cfg))

            def over_grpc():
                for _ in range(args.calls):
                    client.score(groups)

            local = batch * args.calls / timed(in_process, args.repeats)
            remote = batch * args.calls / timed(over_grpc, args.repeats)
            print(
                f"batch {batch:5d}: in-process {local:11,.0f}/s   gRPC loopback {remote:11,.0f}/s   "
                f"ratio gRPC / in-process {remote / local:.2f}x"
            )
    finally:
        client.close()
        server.stop(0)


if __name__ == "__main__":
    main()
