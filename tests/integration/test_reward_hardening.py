"""The reward service under careless and hostile clients, on real gRPC over loopback: refused before
parsing without the token, errors that never grow with the input, limits on what one call may ask, no
silent port sharing, and a client whose defaults ride out a replica restart."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest

from prorank.guard.security import auth_metadata
from prorank.protocol import reward_pb2
from prorank.reward.client import RewardClient, RewardError, SyncRewardClient, client_options
from prorank.reward.server import SERVICE, RewardServer
from prorank.settings.config import RewardConfig

TOKEN = "hardening-token"


@pytest.fixture(scope="module")
def qrels():
    return {"q1": {"d1": 1}}


@pytest.fixture
def server(qrels):
    srv = RewardServer(qrels, RewardConfig(port=0), TOKEN).start()
    yield srv
    srv.stop(0)


def G(request_id="r", query_id="q1", doc_id="d1", completions=("1",)):
    return reward_pb2.Group(request_id=request_id, query_id=query_id, doc_id=doc_id, completions=completions)


def _score(server, groups, token=TOKEN):
    with grpc.insecure_channel(
        server.address,
        options=[("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)],
    ) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/Score", request_serializer=None, response_deserializer=reward_pb2.ScoreResponse.FromString
        )
        payload = groups if isinstance(groups, bytes) else reward_pb2.ScoreRequest(groups=groups).SerializeToString()
        return call(payload, timeout=30, metadata=auth_metadata(token))


def test_garbage_without_the_token_is_unauthenticated_not_parsed(server):
    with pytest.raises(grpc.RpcError) as err:
        _score(server, b"\xff" * (50 * 2**20), token="wrong")  # 50 MiB that is not a ScoreRequest
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # was INTERNAL, after parsing it


def test_errors_quote_client_input_cut_short(server):
    with pytest.raises(grpc.RpcError) as err:
        _score(server, [G(request_id="x" * 8192, completions=())])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # was RESOURCE_EXHAUSTED (the echo)
    assert len(err.value.details()) < 300 and "8192 characters" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _score(server, [G(query_id="q" * 20 * 2**20)])  # a 20 MiB query id: refused, not echoed
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 300
    (answer,) = _score(server, [G(query_id="q" * 250)]).groups  # unknown, within the limit: quoted cut short
    assert answer.status == reward_pb2.UNKNOWN_QUERY and len(answer.error) < 160


@pytest.mark.parametrize(
    "groups, message",
    [
        ([G(completions=["1"] * 65)], "65 completions; at most 64 (reward.max_completions)"),
        ([G(completions=["1" * 5000])], "a completion of 5000 characters; at most 4096"),
        ([G(request_id=f"r{i}") for i in range(4097)], "4097 groups in one request; at most 4096"),
        ([G(request_id="x" * (10 * 2**20))], "a request_id of 10485760 characters; at most 256 (reward.max_id_chars)"),
        ([G(doc_id="d" * 257)], "a doc_id of 257 characters; at most 256"),
        ([G(request_id="a"), G(request_id="b"), G(request_id="a")], "group 2 (a): request_id 'a' is used twice"),
    ],
)
def test_limits_per_call(server, groups, message):
    with pytest.raises(grpc.RpcError) as err:
        _score(server, groups)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_a_second_server_on_a_used_port_fails_to_start(server, qrels):
    port = int(server.address.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError):
        RewardServer(qrels, RewardConfig(port=port), TOKEN).start()


def test_stop_from_several_threads_at_once_returns_promptly(qrels):
    """Two threads stopping one server (a replica's own stop racing a test's or a signal handler's): the
    second waits for the first and returns; before, it could hand health's shutdown to the loop being
    closed and wait out a 60 s timeout."""
    for _ in range(20):
        srv = RewardServer(qrels, RewardConfig(port=0), TOKEN).start()
        errors: list[BaseException] = []

        def stop() -> None:
            try:
                srv.stop(0)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=stop) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        assert srv.server.loop.is_closed()


def test_default_client_rides_out_a_restart_of_its_only_replica(qrels):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = RewardConfig(port=port)
    first = RewardServer(qrels, cfg, TOKEN).start()
    client = SyncRewardClient([first.address], TOKEN, **client_options(cfg))  # the job's defaults
    restarted = []

    def restart() -> None:
        first.stop(0)
        time.sleep(3.0)  # the replica is down for 3 s
        restarted.append(RewardServer(qrels, cfg, TOKEN).start())

    failed, answered = 0, 0
    try:
        thread = threading.Thread(target=restart)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            if answered == 5 and not thread.is_alive() and not restarted:
                thread.start()
            try:
                client.score([G(request_id=f"r{answered}")])
                answered += 1
            except RewardError:
                failed += 1
            time.sleep(0.02)
        thread.join()
    finally:
        client.close()
        for srv in restarted:
            srv.stop(0)
    assert failed == 0 and answered > 5


def test_calls_in_flight_when_a_replica_stops_go_to_the_other(qrels):
    """A replica stopping mid-call cancels its calls in flight (CANCELLED, not UNAVAILABLE): they are
    retried on the other replica, not failed (this failed a step under CI load before)."""

    groups = [G(request_id=f"r{i}", completions=["1"] * 64) for i in range(3000)]
    for _ in range(5):
        first, second = (RewardServer(qrels, RewardConfig(port=0), TOKEN).start() for _ in range(2))

        async def race() -> list:
            client = RewardClient([first.address, second.address], TOKEN, **client_options(RewardConfig()))
            calls = [asyncio.create_task(client.score(groups)) for _ in range(4)]
            await asyncio.sleep(0.05)
            threading.Thread(target=first.stop, args=(0,)).start()  # while the calls run
            answers = await asyncio.gather(*calls)
            await client.close()
            return answers

        try:
            assert [len(a) for a in asyncio.run(race())] == [3000] * 4
        finally:
            first.stop(0)
            second.stop(0)
