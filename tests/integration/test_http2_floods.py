"""HTTP/2 floods without the token, from other loopback hosts, against a server process of its own: every
legitimate call beside the attack is answered, and the server's memory comes back once it ends.
(The callers that hold calls, send garbage or too many calls: tests/integration/test_hostile_callers.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from bench.hostile_peers import attacking_hosts, oversized_headers, rapid_reset
from bench.peak_rss import PeakRss
from prorank.guard.security import auth_metadata
from prorank.protocol import reward_pb2, weights_pb2
from prorank.reward.client import RewardError, SyncRewardClient

TOKEN = "flood-token"
SCORE, FETCH = "/prorank.reward.v1.Reward/Score", "/prorank.weights.v1.Weights/Fetch"
ROOT = Path(__file__).resolve().parents[2]


def group(i: int = 0) -> reward_pb2.Group:
    return reward_pb2.Group(request_id=f"r{i}", query_id="q1", doc_id="d1", completions=["1", "0"])


SERVERS = {  # a server process of its own, printing its address; the weight server with its accept layer on
    "reward": "from prorank.settings.config import RewardConfig; from prorank.reward.server import RewardServer; "
    f"s = RewardServer({{'q1': {{'d1': 1}}}}, RewardConfig(port=0), '{TOKEN}').start()",
    "weights": "import torch; from prorank.guard.guarded_server import ServerLimits; "
    "from prorank.weights.server import WeightServer; "
    f"s = WeightServer('{TOKEN}', limits=ServerLimits(max_connections_per_peer=16)).start(); "
    "s.publisher.publish(1, {'w': torch.arange(2**14, dtype=torch.float32)})",
}


def start_server(service: str, stderr) -> subprocess.Popen:
    """SERVERS[service] in a process of its own; its first line of output is its address."""
    code = f"import sys; {SERVERS[service]}; print(s.address, flush=True); sys.stdin.read()"
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
    )


def settled_rss(rss: PeakRss, bound: float) -> list[float]:
    """RSS read every 0.5 s after an attack (freed memory goes back every 2 s), for at least 5 s and until
    it is within `bound`, at most 20 s: the readings."""
    settled = [rss.rss()]
    for _ in range(40):
        if settled[-1] <= bound and len(settled) >= 10:
            break
        time.sleep(0.5)
        settled.append(rss.rss())
    return settled


def legitimate_call(channel: grpc.Channel, service: str) -> None:
    """One raw call with a 2 s deadline and no retry: a Score, or a whole Fetch of version 1."""
    if service == "reward":
        request = reward_pb2.ScoreRequest(groups=[group()]).SerializeToString()
        reply = reward_pb2.ScoreResponse.FromString(
            channel.unary_unary(SCORE)(request, metadata=auth_metadata(TOKEN), timeout=2.0)
        )
        assert reply.groups[0].label == 1
    else:
        request = weights_pb2.FetchRequest(min_version=0, receiver="legitimate").SerializeToString()
        assert list(channel.unary_stream(FETCH)(request, metadata=auth_metadata(TOKEN), timeout=2.0))


@pytest.mark.parametrize("service", ["reward", "weights"])
def test_rapid_reset_from_4_hosts_loses_no_legitimate_call(service, tmp_path):
    """HTTP/2 rapid reset without the token from 4 loopback hosts (127.0.0.2-5), each on 15 connections for
    7 s (a connection closed is opened again at once), after a 2 s round that warms the server up (its hosts'
    cooldown ends ~5 s into the attack, which then comes back and is closed again). Beside
    it, from 127.0.0.1, raw calls with a 2 s deadline and no retry, every fourth on a new connection: none is
    lost. The budget on unauthenticated resets closes the attacking connections (the server's log names
    them, 127.0.0.x and port) and cools their hosts down; RSS is back within 10 MB of the start."""
    log = tmp_path / "server.log"
    with log.open("w") as err:
        proc = start_server(service, err)
    path = SCORE if service == "reward" else FETCH
    try:
        address = proc.stdout.readline().strip()
        asyncio.run(rapid_reset(address, path, 15, seconds=2, hosts=4))  # the warm-up round
        time.sleep(3.0)  # freed memory goes back to the system every 2 s
        kept = grpc.insecure_channel(address)
        legitimate_call(kept, service)
        with PeakRss(proc.pid) as rss:
            start, sent, failed, answered = rss.rss(), {}, [], 0
            attack = lambda: sent.update(n=asyncio.run(rapid_reset(address, path, 15, 7, hosts=4)))  # noqa: E731
            attacker = threading.Thread(target=attack, daemon=True)
            attacker.start()
            while attacker.is_alive():
                fresh = grpc.insecure_channel(address) if answered % 4 == 3 else None
                try:
                    legitimate_call(fresh or kept, service)
                    answered += 1
                except grpc.RpcError as err:
                    failed.append((err.code().name, err.details()))
                finally:
                    if fresh is not None:
                        fresh.close()
                time.sleep(0.1)
            attacker.join(timeout=30)
            settled = settled_rss(rss, start + 10)
        legitimate_call(kept, service)
        kept.close()
        print(
            f"{service}: {sent['n']} streams reset, legitimate calls {answered} answered, {len(failed)} failed; "
            f"RSS {start:.0f} -> peak {rss.peak:.0f} -> {settled[-1]:.0f} MB"
        )
        assert sent["n"] > 1000 and answered >= 15 and not failed, (sent, answered, failed)
        assert settled[-1] <= start + 10, (start, rss.peak, [round(r) for r in settled])
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait(timeout=30)
    closed = [line for line in log.read_text().splitlines() if "closed the connection of" in line]
    hosts = {h for h in attacking_hosts(4) if any(f"ipv4:{h}:" in line for line in closed)}
    assert closed and hosts, log.read_text()[-2000:]
    assert all("BUDGET" in line and "unix-abstract" not in line for line in closed), closed[:3]


def test_oversized_headers_across_64_connections():
    """Without the token, on 64 connections for 10 s from another loopback host, against a reward server
    process of its own after a 5 s round that warms it up: calls whose header block (10,000 headers) is past
    gRPC's metadata limit; a connection the server refuses or closes is opened again at once. Legitimate
    Score calls (a 5 s deadline, no retry) go on beside it, and RSS is measured once the attack has ended.
    (Rapid reset: test_rapid_reset_from_4_hosts_loses_no_legitimate_call, below.)

    Every legitimate call is answered: the cap on connections per host (16) leaves the attacker 16 of its
    64 (without it, 1-4 of ~60 oversized-header calls timed out on 2 cores). RSS: back within 10 MB of the
    start, from a peak of ~240 (the server returns freed memory to the system every 2 s; without that it
    stayed +150 MB). Not 10%: from a 57 MB start CI once ended 6.0 MB up. RSS is read every 0.5 s for at
    least 5 s and at most 20 s after the attack, until it is within the bound: a fixed 5 s wait once read
    +10.2 MB in CI where 3-4 MB is usual here."""
    proc = start_server("reward", subprocess.DEVNULL)
    try:
        address = proc.stdout.readline().strip()
        asyncio.run(oversized_headers(address, SCORE, 64, seconds=5))  # the warm-up round
        time.sleep(5.0)  # freed memory goes back to the system every 2 s
        client = SyncRewardClient([address], TOKEN, timeout=5.0, retries=0)
        with PeakRss(proc.pid) as rss:
            start, sent, failed = rss.rss(), {}, []
            attack = lambda: sent.update(n=asyncio.run(oversized_headers(address, SCORE, 64, 10)))  # noqa: E731
            attacker = threading.Thread(target=attack, daemon=True)
            attacker.start()
            answered = 0
            while attacker.is_alive():
                try:
                    (res,) = client.score([group(answered)])
                    assert res.label == 1
                    answered += 1
                except RewardError as err:
                    failed.append(err.code)
                time.sleep(0.2)
            attacker.join(timeout=30)
            bound = start + 10
            settled = settled_rss(rss, bound)
            after = settled[-1]
        (res,) = client.score([group()])  # answered once the attack is over
        client.close()
        print(
            f"oversized headers: {sent['n']} sent, legitimate calls {answered} answered, {len(failed)} failed "
            f"{failed}; RSS {start:.0f} -> peak {rss.peak:.0f} -> {after:.0f} MB"
        )
        assert sent["n"] > 1000 and res.label == 1, (sent, answered, failed)
        assert answered >= 10 and not failed, (answered, failed)
        assert after <= bound, (start, rss.peak, [round(r) for r in settled])
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait(timeout=30)
