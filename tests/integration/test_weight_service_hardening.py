"""The weight service under load and under careless or hostile clients, on real gRPC over loopback:
"no version yet" is an answer (never an error), waiting receivers leave room for reports and
transfers, a call without a deadline works, and Report cannot be forged past what was published or grow unbounded."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import torch

from prorank.guard.guarded_server import ServerLimits
from prorank.guard.security import auth_metadata
from prorank.protocol import weights_pb2, weights_pb2_grpc
from prorank.weights import server as weight_service
from prorank.weights.receiver import fetch_version
from prorank.weights.server import SERVICE, WeightServer

TOKEN = "hardening-token"


def state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(1000, dtype=torch.float32)}


@pytest.fixture
def server():
    srv = WeightServer(TOKEN, limits=ServerLimits(max_calls=16, max_calls_per_peer=16)).start()
    yield srv
    srv.stop(0)


def _raw_fetch(channel, wait_ms: int, timeout: float | None):
    fetch = channel.unary_stream(
        f"/{SERVICE}/Fetch",
        request_serializer=weights_pb2.FetchRequest.SerializeToString,
        response_deserializer=weights_pb2.WeightMessage.FromString,
    )
    return fetch(
        weights_pb2.FetchRequest(min_version=0, receiver="raw", wait_ms=wait_ms),
        timeout=timeout,
        metadata=auth_metadata(TOKEN),
    )


def test_no_version_yet_is_never_an_error_under_load(server):
    """The client's deadline and the server's wait used to race: under load a receiver that should
    wait got DEADLINE_EXCEEDED. Now the server answers "none yet" before the deadline, every time."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(50):
            assert fetch_version(server.address, TOKEN, 0, f"r{i}", timeout=0.05 + 0.01 * (i % 25)) is None
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    server.publisher.publish(1, state())
    assert fetch_version(server.address, TOKEN, 0, "r", timeout=5)[0].version == 1
    assert fetch_version(server.address, TOKEN, 1, "r", timeout=0.2) is None


def test_fetch_without_a_deadline_waits_and_answers(server):
    with grpc.insecure_channel(server.address) as channel:
        answers = list(_raw_fetch(channel, wait_ms=200, timeout=None))  # used to fail: time_t overflow
    assert [a.WhichOneof("kind") for a in answers] == ["none_yet"]


def test_waiting_receivers_leave_workers_for_reports_and_transfers(server):
    """16 receivers wait for a version that does not come (8 wait, 8 are told "none yet"): a Report and a
    transfer still go through, and when the waiting callers cancel, their waits end at once."""
    with grpc.insecure_channel(server.address) as channel:
        waiting = [_raw_fetch(channel, wait_ms=60_000, timeout=120) for _ in range(16)]
        time.sleep(1.0)
        assert server.publisher._waiting == server.publisher.max_waiters == 8  # the rest were told "none yet"
        stub = weights_pb2_grpc.WeightsStub(channel)
        stub.Report(weights_pb2.Ack(version=0, receiver="actor-0"), timeout=5, metadata=auth_metadata(TOKEN))
        server.publisher.publish(1, state())
        got = fetch_version(server.address, TOKEN, 0, "late", timeout=5)
        assert got is not None and got[0].version == 1
        for call in waiting:
            call.cancel()
    server.publisher.publish(2, state())  # nobody waits any more
    assert server.publisher._waiting == 0


def test_cancelled_waits_end_at_once(server):
    with grpc.insecure_channel(server.address) as channel:
        waiting = [_raw_fetch(channel, wait_ms=60_000, timeout=120) for _ in range(8)]
        time.sleep(1.0)
        assert server.publisher._waiting == 8
        for call in waiting:
            call.cancel()
        deadline = time.monotonic() + 3
        while server.publisher._waiting and time.monotonic() < deadline:
            time.sleep(0.05)
    assert server.publisher._waiting == 0  # not after the callers' 120 s deadline


def test_report_cannot_claim_an_unpublished_version_and_is_bounded(server, monkeypatch):
    server.publisher.publish(1, state())
    with grpc.insecure_channel(server.address) as channel:
        stub = weights_pb2_grpc.WeightsStub(channel)
        report = lambda ack: stub.Report(ack, timeout=5, metadata=auth_metadata(TOKEN))  # noqa: E731
        with pytest.raises(grpc.RpcError) as err:
            report(weights_pb2.Ack(version=999, applied=True, receiver="actor-0"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "newest is 1" in err.value.details()
        assert not server.publisher.wait_for({"actor-0"}, 999, timeout=0.1)

        report(weights_pb2.Ack(version=1, applied=True, receiver="x" * 2**19))  # a 512 KiB name
        assert max(map(len, server.publisher.receivers)) == weight_service.MAX_NAME == 100
        with pytest.raises(grpc.RpcError) as err:  # over 1 MiB: refused by its length, unread
            report(weights_pb2.Ack(version=1, applied=True, receiver="x" * 2**20))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        monkeypatch.setattr(weight_service, "MAX_RECEIVERS", 5)
        for i in range(20):
            report(weights_pb2.Ack(version=1, applied=True, receiver=f"r{i}"))
        assert list(server.publisher.receivers) == [f"r{i}" for i in range(15, 20)]  # the newest kept

        server.publisher.known = {"rollout-0"}  # the job names its actors: nobody else may report
        with pytest.raises(grpc.RpcError) as err:
            report(weights_pb2.Ack(version=1, applied=True, receiver="intruder"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        report(weights_pb2.Ack(version=1, applied=True, receiver="rollout-0"))
        assert server.publisher.wait_for({"rollout-0"}, 1, timeout=1)


def test_a_second_server_on_a_used_port_fails_to_start(server):
    port = int(server.address.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError):
        WeightServer(TOKEN, port=port).start()
