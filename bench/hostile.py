"""The reward and weight servers under hostile callers without the token, this tree (B) against the
code at `--before` (A, in a temporary git worktree), in one run, on loopback.

    .venv/bin/python -m bench.hostile [--before e1e9231] [--json docs/results/hostile.json]

Each server runs in a process of its own (from A's or B's code). For each attack (bench/hostile_peers.py:
"silent" headers and no body, a "slow" body at a byte a second, "unread": a caller that never reads,
with N = 4, 64 and 1,000 calls from this process), the legitimate call is timed while the attack holds:
Score through the job's client (its defaults: it gives up after about 10 s), and Fetch + a whole
transfer (4 MiB) + Report for the weight server. Printed: the slowest of `--calls` legitimate calls
under attack, and its ratio to the same call on the idle server.
Then: RSS of the reward server while 100 calls without the token send 60 MiB bodies (100 at once);
the small Score's latency while 8 maximum-size Scores (4,096 groups x 64 completions) are in flight;
the load: 32 clients x 200 small Score calls, calls/s; and one whole weight transfer (256 MiB), GB/s.
`--only floods` (issue 34's shapes, from another loopback host): HTTP/2 rapid reset and header blocks past
gRPC's metadata limit on 64 connections, and 2,000 idle connections against a server whose soft open-file
limit is 1,024 (a common default), each for 20 s beside legitimate Score calls (5 s deadline, no retry,
every 0.2 s): the slowest, the failures, and RSS before, at its peak and 5 s after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench.critical_path import worktree
from bench.hostile_peers import Attack, hold_idle, oversized_headers, rapid_reset
from bench.peak_rss import PeakRss
from bench.served import TOKEN, Served
from prorank.protocol import reward_pb2, weights_pb2
from prorank.reward.client import RewardError, SyncRewardClient, client_options
from prorank.settings.config import RewardConfig

ROOT = Path(__file__).resolve().parents[1]
SCORE, REPORT, FETCH = (
    "/prorank.reward.v1.Reward/Score",
    "/prorank.weights.v1.Weights/Report",
    "/prorank.weights.v1.Weights/Fetch",
)


def small_groups(n: int = 1):
    return [
        reward_pb2.Group(
            request_id=f"r{i}", query_id=f"q{i % 1000}", doc_id=f"d{i % 1000}", completions=["1", "0", "1", "x"] * 2
        )
        for i in range(n)
    ]


def legit_score(address: str):
    """The job's client with its defaults; seconds until answered, or until it gave up (+ 'gave up')."""

    client = SyncRewardClient([address], TOKEN, **client_options(RewardConfig()))
    groups = small_groups()

    def call() -> tuple[float, bool]:
        start = time.perf_counter()
        try:
            client.score(groups)
            return time.perf_counter() - start, True
        except RewardError:
            return time.perf_counter() - start, False

    return call, client.close


def legit_transfer(address: str):
    from prorank.weights.receiver import fetch_version, report  # noqa: PLC0415 the name is also a local of another function here

    def call() -> tuple[float, bool]:
        start = time.perf_counter()
        try:
            got = fetch_version(address, TOKEN, 0, "bench", timeout=10)
            report(address, TOKEN, weights_pb2.Ack(version=1, applied=True, receiver="bench"))
            return time.perf_counter() - start, got is not None
        except Exception:  # noqa: BLE001 - a stalled server fails in several ways; counted, not raised
            return time.perf_counter() - start, False

    return call, lambda: None


def attacks(tree: Path, calls: int) -> list[dict]:
    rows = []
    for kind, legit, paths in (
        ("reward", legit_score, {"silent": SCORE, "slow": SCORE, "unread": SCORE}),
        ("weights", legit_transfer, {"silent": REPORT, "slow": REPORT, "unread": FETCH}),
    ):
        server = Served(tree, kind)
        call, close = legit(server.address)
        try:
            idle = statistics.median(call()[0] for _ in range(calls + 2))
            for mode, path in paths.items():
                for n in (4, 64, 1000):
                    with Attack(server.address, path, n, mode, seconds=12):  # a stall lasts as long as this
                        got = [call() for _ in range(calls)]
                    worst = max(t for t, _ in got)
                    rows.append(
                        {
                            "server": kind,
                            "attack": mode,
                            "n": n,
                            "idle_s": idle,
                            "worst_s": worst,
                            "ratio": worst / idle,
                            "failed": sum(not ok for _, ok in got),
                        }
                    )
                    print(
                        f"  {kind:7s} {mode:6s} N={n:4d}: worst {worst:7.3f} s  idle {idle:.4f} s  "
                        f"{worst / idle:8.1f}x  failed {rows[-1]['failed']}/{calls}",
                        flush=True,
                    )
        finally:
            close()
            server.close()
    return rows


def memory(tree: Path) -> dict:
    """RSS of the reward server while 100 calls without the token each send a 60 MiB body (after two such
    rounds: RSS grows ~9 MB in the first two, then stays flat)."""
    server = Served(tree, "reward")
    try:
        for _ in range(2):  # the first rounds grow RSS once by ~9 MB (allocator arenas, gRPC buffers); then flat
            with Attack(server.address, SCORE, 100, "flood", seconds=60, token="wrong", body_mb=60) as warm_up:
                while warm_up.tally.answered < 100 and warm_up.running():
                    time.sleep(0.02)
        time.sleep(1.0)
        with PeakRss(server.proc.pid) as rss:
            start = rss.rss()
            with Attack(server.address, SCORE, 100, "flood", seconds=60, token="wrong", body_mb=60) as attack:
                while attack.tally.answered < 100 and attack.running():
                    time.sleep(0.02)
        time.sleep(2.0)
        return {
            "start_mb": start,
            "peak_mb": rss.peak,
            "after_mb": rss.rss(),
            "sent_mb": attack.tally.sent_bytes / 2**20,
            "refused": attack.tally.answered,
        }
    finally:
        server.close()


def fairness(tree: Path, own_connection: bool = True) -> dict:
    """A small Score's latency while 8 maximum-size Scores are in flight (and alone); the small calls on
    a connection of their own (another client), or on the big calls' one."""
    server = Served(tree, "reward")
    limit = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
    big = reward_pb2.ScoreRequest(
        groups=[
            reward_pb2.Group(request_id=f"r{i}", query_id=f"q{i % 1000}", doc_id="d", completions=["1" * 200] * 64)
            for i in range(4096)
        ]
    ).SerializeToString()
    small = reward_pb2.ScoreRequest(groups=small_groups()).SerializeToString()
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    async def run() -> dict:
        own = limit + [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with (
            grpc.aio.insecure_channel(server.address, options=limit) as channel,
            grpc.aio.insecure_channel(server.address, options=own) as other,
        ):
            score = channel.unary_unary(SCORE)
            small_score = (other if own_connection else channel).unary_unary(SCORE)
            await small_score(small, metadata=metadata, timeout=60)
            alone = []
            for _ in range(5):
                start = time.perf_counter()
                await small_score(small, metadata=metadata, timeout=60)
                alone.append(time.perf_counter() - start)
            start = time.perf_counter()
            one_big = await score(big, metadata=metadata, timeout=120)
            big_s = time.perf_counter() - start
            bigs = [asyncio.ensure_future(score(big, metadata=metadata, timeout=300)) for _ in range(8)]
            await asyncio.sleep(0.3)
            during: list[float] = []
            while not all(b.done() for b in bigs) and len(during) < 20:
                start = time.perf_counter()
                await small_score(small, metadata=metadata, timeout=120)
                during.append(time.perf_counter() - start)
                await asyncio.sleep(0.1)
            await asyncio.gather(*bigs)
            return {
                "small_on_own_connection": own_connection,
                "big_call_mb": len(big) / 2**20,
                "big_response_mb": len(one_big) / 2**20,
                "one_big_s": big_s,
                "small_alone_s": statistics.median(alone),
                "small_during_worst_s": max(during),
                "small_during_median_s": statistics.median(during),
                "small_calls_during": len(during),
            }

    try:
        return asyncio.run(run())
    finally:
        server.close()


def transfer(tree: Path, repeats: int = 5, kind: str = "weights-256mib") -> dict:
    """GB/s of one whole weight transfer (256 MiB in 16 tensors, 1 MiB chunks, verified) into a reused
    buffer, best of `repeats`: the weight server's throughput, which its new event loop must not cost."""
    from prorank.weights.receiver import fetch_version  # noqa: PLC0415 pulls torch, which importing this module does not

    server = Served(tree, kind)
    try:
        _, blob = fetch_version(server.address, TOKEN, 0, "bench", timeout=60)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fetch_version(server.address, TOKEN, 0, "bench", timeout=60, buffer=blob)
            best = min(best, time.perf_counter() - start)
        return {"bytes": len(blob), "seconds": best, "gb_per_s": len(blob) / best / 1e9}
    finally:
        server.close()


def load(tree: Path, clients: int = 32, calls: int = 200) -> dict:
    server = Served(tree, "reward")
    request = reward_pb2.ScoreRequest(groups=small_groups(8)).SerializeToString()
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    async def client() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            score = channel.unary_unary(SCORE)
            for _ in range(calls):
                await score(request, metadata=metadata, timeout=30)

    async def run() -> float:
        await asyncio.gather(*(client() for _ in range(4)))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return clients * calls / (time.perf_counter() - start)

    try:
        return {"clients": clients, "calls": calls, "calls_per_s": asyncio.run(run())}
    finally:
        server.close()


def count(sent) -> int:
    """What an attack returns, as one number: calls or resets sent, or connections opened (IdleTally)."""
    return sent if isinstance(sent, int) else sent.opened


def floods(tree: Path, seconds: float = 20.0) -> list[dict]:

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # this process holds 2,000
    shapes = {
        "rapid reset, 64 connections": lambda a: rapid_reset(a, SCORE, 64, seconds),
        "rapid reset, 4 hosts x 15 connections": lambda a: rapid_reset(a, SCORE, 15, seconds, hosts=4),
        "oversized headers, 64 connections": lambda a: oversized_headers(a, SCORE, 64, seconds),
        "2,000 idle connections": lambda a: hold_idle(a, 2000, seconds),
    }
    rows = []
    for shape, attack in shapes.items():
        server = Served(tree, "reward", open_files=1024)
        client = SyncRewardClient([server.address], TOKEN, timeout=5.0, retries=0)
        try:
            client.score(small_groups())
            with PeakRss(server.proc.pid) as rss:
                start, times, failed = rss.rss(), [], []
                sent: dict[str, int] = {}
                attacker = threading.Thread(
                    target=lambda: sent.update(n=count(asyncio.run(attack(server.address)))), daemon=True
                )
                attacker.start()
                while attacker.is_alive():
                    if shape.endswith("idle connections"):  # a new connection for each call
                        client.close()
                        client = SyncRewardClient([server.address], TOKEN, timeout=5.0, retries=0)
                    began = time.perf_counter()
                    try:
                        client.score(small_groups())
                        times.append(time.perf_counter() - began)
                    except RewardError as err:
                        failed.append(err.code.name if err.code else str(err))
                    time.sleep(0.2)
                attacker.join(timeout=60)
                time.sleep(5.0)
                after = rss.rss()
            rows.append(
                {
                    "shape": shape,
                    "sent": sent.get("n"),  # calls or resets sent (connections, for the idle ones)
                    "answered": len(times),
                    "failed": len(failed),
                    "failures": failed,
                    "worst_s": max(times, default=float("nan")),
                    "rss_start_mb": start,
                    "rss_peak_mb": rss.peak,
                    "rss_after_mb": after,
                }
            )
            print(
                f"  {shape}: sent {sent.get('n')}, answered {len(times)}, failed {len(failed)} "
                f"{sorted(set(failed))}, worst "
                f"{rows[-1]['worst_s']:.2f} s; RSS {start:.0f} -> {rss.peak:.0f} -> {after:.0f} MB",
                flush=True,
            )
        finally:
            client.close()
            server.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="e1e9231", help="git ref of A (the thread-pool servers)")
    ap.add_argument("--calls", type=int, default=3, help="legitimate calls per attack")
    ap.add_argument(
        "--only",
        choices=["floods", "transfer"],
        help="just issue 34's shapes (with --before 52ab31d), or just the weight transfer",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report: dict = {"before": args.before, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp, worktree(args.before, Path(tmp) / "a") as before:
        for side, tree in (("A", before), ("B", ROOT)):
            print(f"{side} ({'git ' + args.before if side == 'A' else 'this tree'})", flush=True)
            if args.only == "floods":
                report[side] = {"floods": floods(tree)}
                continue
            report[side] = {"transfer": transfer(tree)}
            print(f"  weight transfer: {report[side]['transfer']['gb_per_s']:.2f} GB/s", flush=True)
            if args.only == "transfer":
                if side == "B":
                    report[side]["transfer_gated"] = transfer(tree, kind="weights-256mib-gate")
                    print(f"  ... behind the accept layer: {report[side]['transfer_gated']['gb_per_s']:.2f} GB/s")
                continue
            report[side]["load"] = load(tree)
            print(f"  load: {report[side]['load']['calls_per_s']:,.0f} calls/s", flush=True)
            report[side]["memory"] = memory(tree)
            print(f"  memory: {report[side]['memory']}", flush=True)
            report[side]["fairness"] = fairness(tree)
            print(f"  fairness: {report[side]['fairness']}", flush=True)
            report[side]["attacks"] = attacks(tree, args.calls)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.only != "floods":
        ta, tb = report["A"]["transfer"]["gb_per_s"], report["B"]["transfer"]["gb_per_s"]
        print(f"weight transfer B/A: {tb / ta:.3f}x")
        if "transfer_gated" in report["B"]:
            print(f"behind the accept layer / without, in B: {report['B']['transfer_gated']['gb_per_s'] / tb:.3f}x")
    if not args.only:
        a, b = report["A"]["load"]["calls_per_s"], report["B"]["load"]["calls_per_s"]
        print(f"load B/A: {b / a:.3f}x")


if __name__ == "__main__":
    main()
