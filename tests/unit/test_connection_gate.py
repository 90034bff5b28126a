"""The accept layer in front of our gRPC servers (prorank/guard/connection_gate.py): connections past the cap per
peer host, or in all, are reset at once and logged with the key to raise; the kept ones reach gRPC, which
sees the real caller. Loopback: the "other host" is 127.0.0.2 (every 127.x.y.z is loopback on Linux)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.hostile_peers import ATTACKER, PREFACE, SETTINGS, frame
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


@pytest.fixture
def server():
    srv = RewardServer(
        {"q1": {"d1": 1}}, RewardConfig(port=0, max_connections_per_peer=3, max_connections=5), TOKEN
    ).start()
    yield srv
    srv.stop(0)


def test_a_host_past_its_cap_is_reset_and_logged_while_others_are_served(server, caplog):
    caplog.set_level(logging.WARNING, logger="prorank.guard.guarded_server")
    held = [connect(server.address) for _ in range(3)]
    assert None not in held
    assert connect(server.address) is None
    assert score(server.address) == 1  # from 127.0.0.1: another host, its own allowance
    [line] = [r.getMessage() for r in caplog.records if "CONNECTION" in r.getMessage()]
    assert line.startswith(
        f"refused a connection from ipv4:{ATTACKER}, CONNECTION: 3 connections from "
        f"ipv4:{ATTACKER}; at most 3 (max_connections_per_peer)"
    ), line
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
    """A call without the token is refused and logged under the caller's host, not the relay's address."""
    caplog.set_level(logging.WARNING, logger="prorank.guard.guarded_server")
    client = SyncRewardClient([server.address], "wrong-token", timeout=5.0, retries=0)
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        client.score([reward_pb2.Group(request_id="r", query_id="q1", doc_id="d1", completions=["1"])])
    client.close()
    refusals = [r.getMessage() for r in caplog.records if "UNAUTHENTICATED" in r.getMessage()]
    assert refusals and refusals[0].startswith("refused a call from ipv4:127.0.0.1, UNAUTHENTICATED"), refusals


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
