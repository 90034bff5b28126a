"""The accept layer in front of our gRPC servers (prorank/guard/connection_gate.py): connections past the cap per
peer host, or in all, are reset at once and logged with the key to raise; the kept ones reach gRPC, which
sees the real caller. Loopback: the "other host" is 127.0.0.2 (every 127.x.y.z is loopback on Linux)."""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.hostile_peers import (
    ATTACKER,
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    frame,
    header_block,
)
from prorank.guard.stream_budget import FrameCounter
from prorank.protocol import reward_pb2
from prorank.reward.client import SyncRewardClient
from prorank.reward.server import RewardServer
from prorank.settings.config import RewardConfig

TOKEN = "gate-token"


def connect(address: str, source: str = ATTACKER) -> socket.socket | None:
    """A connection from `source` that starts HTTP/2, if the server keeps it (its SETTINGS come back);
    None if it is reset (the reset can even reach `connect` itself, on loopback)."""
    host, port = address.rsplit(":", 1)
    sock = None
    try:
        sock = socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        if len(sock.recv(9)) == 9:
            return sock
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        pass
    if sock is not None:
        sock.close()
    return None


def score(address: str) -> int:
    client = SyncRewardClient([address], TOKEN, timeout=5.0, retries=0)
    try:
        (result,) = client.score([reward_pb2.Group(request_id="r", query_id="q1", doc_id="d1", completions=["1"])])
        return result.label
    finally:
        client.close()


def assert_one_line(caplog, pattern: str) -> None:
    """Exactly one log line of the kind `pattern` starts with (its kind: the word after the peer), and it matches."""
    kind = pattern.split(", ", 1)[1].split(":", 1)[0]
    lines = [r.getMessage() for r in caplog.records if f", {kind}:" in r.getMessage()]
    assert len(lines) == 1 and re.match(pattern, lines[0]), lines


@pytest.fixture
def server():
    srv = RewardServer(
        {"q1": {"d1": 1}}, RewardConfig(port=0, max_connections_per_peer=3, max_connections=5), TOKEN
    ).start()
    yield srv
    srv.stop(0)


def test_a_host_past_its_cap_is_reset_and_logged_while_others_are_served(server, caplog):
    caplog.set_level(logging.WARNING, logger="prorank.guard.refusals")
    held = [connect(server.address) for _ in range(3)]
    assert None not in held
    assert connect(server.address) is None
    assert score(server.address) == 1  # from 127.0.0.1: another host, its own allowance
    assert_one_line(
        caplog,
        rf"refused a connection from ipv4:{ATTACKER}:\d+, CONNECTION: 3 connections from "
        rf"ipv4:{ATTACKER}; at most 3 \(max_connections_per_peer\)",
    )
    held.pop().close()  # a connection ends: the host may open another (once the gate has seen it end)
    deadline, again = time.monotonic() + 10, None
    while again is None and time.monotonic() < deadline:
        again = connect(server.address)
        time.sleep(0.1)
    assert again is not None
    for s in [*held, again]:
        s.close()


def test_connections_in_all_are_capped(server):
    held = [
        connect(server.address, source) for source in ("127.0.0.3", "127.0.0.3", "127.0.0.4", "127.0.0.4", "127.0.0.5")
    ]
    assert None not in held
    assert connect(server.address, "127.0.0.6") is None
    for s in held:
        s.close()


def test_grpc_sees_the_real_caller(server, caplog):
    """A call without the token is refused and logged naming the caller (its address and port), not the
    relay's abstract socket; counted under its host."""
    caplog.set_level(logging.WARNING, logger="prorank.guard.refusals")
    client = SyncRewardClient([server.address], "wrong-token", timeout=5.0, retries=0)
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        client.score([reward_pb2.Group(request_id="r", query_id="q1", doc_id="d1", completions=["1"])])
    client.close()
    refusals = [r.getMessage() for r in caplog.records if "UNAUTHENTICATED" in r.getMessage()]
    assert refusals and re.match(r"refused a call from ipv4:127\.0\.0\.1:\d+, UNAUTHENTICATED", refusals[0]), refusals
    assert refusals[0].endswith("since its last line)") and "from ipv4:127.0.0.1 since" in refusals[0], refusals


def test_a_port_in_use_is_a_clear_error(server):
    port = int(server.address.rsplit(":", 1)[1])
    ours = lambda: set(Path(tempfile.gettempdir()).glob(f"prorank-gate-{os.getpid()}-*"))  # noqa: E731
    before = ours()
    with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
        RewardServer({"q1": {"d1": 1}}, RewardConfig(port=port), TOKEN)
    assert ours() == before  # nothing left behind


def test_without_the_gate_grpc_listens_itself():
    srv = RewardServer({"q1": {"d1": 1}}, RewardConfig(port=0, max_connections_per_peer=0), TOKEN).start()
    try:
        assert srv.server.gate is None and score(srv.address) == 1
    finally:
        srv.stop(0)


def test_a_killed_servers_backend_folder_is_removed_by_the_next_gate():
    """A server killed before its stop leaves its backend folder; the next gate to start removes the
    folders of processes no longer running, and only those."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = Path(tempfile.gettempdir())
    left, alive = tmp / f"prorank-gate-{dead.pid}-test", tmp / f"prorank-gate-{os.getpid()}-test"
    for folder in (left, alive):
        folder.mkdir()
        (folder / "grpc.sock").touch()
    try:
        srv = RewardServer({"q1": {"d1": 1}}, RewardConfig(port=0), TOKEN)
        srv.server.stop(0)
        assert not left.exists() and alive.is_dir()
    finally:
        for folder in (left, alive):
            if folder.exists():
                (folder / "grpc.sock").unlink()
                folder.rmdir()


def test_frames_are_counted_across_reads_and_tls_is_left_unread():
    """HEADERS (a stream opened) and RST_STREAM (one reset) counted however the bytes are cut into reads,
    payloads skipped; a connection that does not start with the HTTP/2 preface (TLS) is not parsed."""
    data = (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_HEADERS, 1, b"h" * 20)
        + frame(RST_STREAM, 0, 1, struct.pack(">I", 8))
        + frame(DATA, 0, 3, bytes([HEADERS, RST_STREAM]) * 50)  # frame types inside a payload are not frames
        + frame(HEADERS, END_HEADERS, 5, b"h")
    )
    for cut in (1, 7, 9, len(data)):
        counter = FrameCounter()
        counts = [counter.feed(data[i : i + cut]) for i in range(0, len(data), cut)]
        assert (sum(c[0] for c in counts), sum(c[1] for c in counts)) == (2, 1), cut
    tls = FrameCounter()
    assert tls.feed(b"\x16\x03\x01\x02\x00\x01") == (0, 0) and not tls.parsing


def closed_by_server(sock: socket.socket, seconds: float = 10.0) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):  # the server's SETTINGS and acks, then the end
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_a_connection_past_the_reset_budget_is_closed_and_its_host_cools_down(caplog):
    """Streams opened and reset without the token, past max_unauthenticated_resets_per_second: the
    connection is closed with its host's other connections that carried no authenticated call, the line
    names the caller, and the host's new connections are refused for the cooldown; other hosts are served."""
    caplog.set_level(logging.WARNING, logger="prorank.guard.refusals")
    cfg = RewardConfig(port=0, max_unauthenticated_resets_per_second=4, abuse_cooldown_seconds=3)
    srv = RewardServer({"q1": {"d1": 1}}, cfg, TOKEN).start()
    try:
        block = header_block([(":method", "POST"), (":path", "/prorank.reward.v1.Reward/Score"), (":scheme", "http")])
        attacker, idle = connect(srv.address), connect(srv.address)
        assert attacker and idle
        for s in range(1, 21, 2):
            attacker.sendall(frame(HEADERS, END_HEADERS, s, block) + frame(RST_STREAM, 0, s, struct.pack(">I", 8)))
        assert closed_by_server(attacker) and closed_by_server(idle)
        assert connect(srv.address) is None  # cooling down
        assert score(srv.address) == 1  # 127.0.0.1: served
        assert_one_line(
            caplog,
            rf"closed the connection of ipv4:{ATTACKER}:\d+, BUDGET: \d+ streams reset in 1 s; at most 4 "
            rf"\(max_unauthenticated_resets_per_second\); closed 2 unauthenticated connection\(s\) of ipv4:{ATTACKER}",
        )
        refused = [r.getMessage() for r in caplog.records if "CONNECTION" in r.getMessage()]
        assert refused and "(abuse_cooldown_seconds)" in refused[0], refused
        deadline, again = time.monotonic() + 10, None
        while again is None and time.monotonic() < deadline:
            time.sleep(0.5)
            again = connect(srv.address)
        assert again is not None  # the cooldown is over
        again.close()
    finally:
        srv.stop(0)
