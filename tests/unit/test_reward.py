"""The reward service: real gRPC servers on loopback, real SciFact train qrels. (As Ray actors:
tests/integration/test_reward_replicas.py.)"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prorank.corpus.data import load_local
from prorank.guard.security import SecurityError, auth_metadata
from prorank.protocol import reward_pb2
from prorank.reward.client import RewardError, SyncRewardClient, client_options
from prorank.reward.scoring import label_of, score_completions
from prorank.reward.server import RewardServer
from prorank.settings.config import RewardConfig
from tests.jobs import env_without_token, serve_reward

TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def train_qrels(scifact_dir):

    return load_local(scifact_dir, "train").qrels


@pytest.fixture
def server(train_qrels):
    srv = RewardServer(train_qrels, RewardConfig(port=0), TOKEN).start()
    yield srv
    srv.stop(0)


def client_for(*servers, **kw):
    return SyncRewardClient([s.address for s in servers], TOKEN, **kw)


def G(request_id, query_id, doc_id, *completions):
    return reward_pb2.Group(request_id=request_id, query_id=query_id, doc_id=doc_id, completions=completions)


def test_rewards_on_scifact_train_by_hand(server):
    client = client_for(server)
    a, b, c = client.score(
        [
            G("a", "0", "31715818", "1", "0", " 1\n", "yes"),  # train qrel 0 -> 31715818 (score 1): label 1
            G("b", "0", "4983", "0", "0"),  # not in the qrels for query 0: label 0
            G("c", "no-such-query", "4983", "1"),
        ]
    )
    assert a.status == reward_pb2.OK and a.label == 1
    assert [r.format for r in a.rewards] == [1, 1, 1, 0]
    assert [r.relevance for r in a.rewards] == [1, 0, 1, 0]
    assert [r.total for r in a.rewards] == [2, 1, 2, 0]
    assert [r.judgment for r in a.rewards] == [1, 0, 1, -1]
    assert a.mean == pytest.approx(1.25) and a.std == pytest.approx(0.6875**0.5)
    assert (b.label, b.mean, b.std, [r.total for r in b.rewards]) == (0, 2, 0, [2, 2])
    assert c.status == reward_pb2.UNKNOWN_QUERY and "no-such-query" in c.error and not c.rewards
    client.close()


def test_scoring_weights_strictness_threshold():
    lenient = RewardConfig(strict_format=False, format_weight=0.5, relevance_weight=2.0)
    assert [s.total for s in score_completions(["1.", "0", "x"], 1, lenient)] == [2.5, 0.5, 0.0]
    assert [s.total for s in score_completions(["1.", "0", "x"], 1, RewardConfig())] == [0.0, 1.0, 0.0]

    assert [label_of({"d": 1, "e": 2}, doc, 2) for doc in "def"] == [0, 1, 0]


@pytest.mark.parametrize(
    "groups, message",
    [
        ([], "no groups in the request"),
        ([G("x", "0", "d")], "group 0 (x): no completions"),
        ([G("x", "0", "d", "1"), G("y", "", "d", "1")], "group 1 (y): empty query_id"),
        ([G("x", "0", "", "1")], "group 0 (x): empty doc_id"),
    ],
)
def test_malformed_request_is_invalid_argument(server, groups, message):
    client = client_for(server)
    with pytest.raises(
        RewardError, match=r"INVALID_ARGUMENT: " + message.replace("(", r"\(").replace(")", r"\)")
    ) as err:
        client.score(groups)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    client.close()


def test_refuses_calls_without_the_token(server):
    for token in ("wrong", ""):
        client = SyncRewardClient([server.address], token)
        with pytest.raises(RewardError, match="UNAUTHENTICATED") as err:
            client.score([G("a", "0", "d", "1")])
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        client.close()
    with grpc.insecure_channel(server.address) as channel:  # the health service too, by default
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Check(
            health_pb2.HealthCheckRequest(service="prorank.reward.v1.Reward"), metadata=auth_metadata(TOKEN)
        )
        assert ok.status == health_pb2.HealthCheckResponse.SERVING


def test_open_health_check_and_graceful_stop(train_qrels):
    srv = RewardServer(train_qrels, RewardConfig(port=0, open_health_check=True), TOKEN).start()
    with grpc.insecure_channel(srv.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    srv.stop(0)
    client = client_for(srv, retries=0, timeout=2)
    with pytest.raises(RewardError, match="UNAVAILABLE"):
        client.score([G("a", "0", "d", "1")])
    client.close()


def test_server_needs_a_token(train_qrels, monkeypatch):
    monkeypatch.delenv("PRORANK_TOKEN", raising=False)
    with pytest.raises(SecurityError, match="no token"):
        RewardServer(train_qrels, RewardConfig(port=0))


def self_signed(tmp_path: Path) -> tuple[str, str]:
    from cryptography import x509  # noqa: PLC0415 cryptography: only to make a TLS certificate
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 cryptography: only to make a TLS certificate
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 cryptography: only to make a TLS certificate
    from cryptography.x509.oid import NameOID  # noqa: PLC0415 cryptography: only to make a TLS certificate

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_tls(train_qrels, tmp_path):
    cert, key = self_signed(tmp_path)
    srv = RewardServer(train_qrels, RewardConfig(port=0, tls_cert=cert, tls_key=key), TOKEN).start()
    try:
        client = client_for(srv, tls_ca=cert)
        (res,) = client.score([G("a", "0", "31715818", "1")])
        assert res.label == 1 and res.rewards[0].total == 2
        client.close()
        plain = client_for(srv, retries=0, timeout=2)  # a plaintext client cannot talk to it
        with pytest.raises(RewardError, match="UNAVAILABLE"):
            plain.score([G("a", "0", "d", "1")])
        plain.close()
    finally:
        srv.stop(0)


def test_deadline_expiry(server):

    client = client_for(server, **client_options(RewardConfig(timeout_seconds=1e-4, retries=0)))
    big = [G(f"g{i}", "0", "31715818", *["1"] * 8) for i in range(20000)]
    with pytest.raises(RewardError, match="DEADLINE_EXCEEDED") as err:
        client.score(big)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    client.close()


def test_failover_when_a_replica_stops_mid_stream(train_qrels):
    first = RewardServer(train_qrels, RewardConfig(port=0), TOKEN).start()
    second = RewardServer(train_qrels, RewardConfig(port=0), TOKEN).start()
    client = client_for(first, second, timeout=5, retries=3, backoff=0.01)
    answered = []
    for i in range(40):
        if i == 10:
            first.stop(0)
        (res,) = client.score([G(f"r{i}", "0", "31715818", "1", "0")])
        answered.append(res.request_id)
    assert answered == [f"r{i}" for i in range(40)]
    second.stop(0)
    client.close()


def test_cli_serve_and_sigterm(scifact_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    exe = Path(sys.executable).with_name("prorank")
    proc, address = serve_reward([str(exe)], scifact_dir, token_file)
    try:
        client = SyncRewardClient([address], TOKEN)
        (res,) = client.score([G("a", "0", "31715818", "1")])
        assert res.label == 1
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    bad = subprocess.run(
        [str(exe), "reward", "serve", "--data", str(scifact_dir), "--port", "0"],
        capture_output=True,
        text=True,
        env=env_without_token(),
    )
    assert bad.returncode == 2 and "no token" in bad.stderr


@pytest.mark.parametrize(
    ("code", "said"),
    [
        ("import sys, time; print('starting', file=sys.stderr, flush=True); time.sleep(60)", "'starting\\n'"),
        ("import sys; sys.exit('no qrels')", "'no qrels\\n'"),
    ],
)
def test_a_server_that_names_no_address_fails_the_helper_in_time(code, said, scifact_dir, tmp_path):
    """tests.jobs.serve_reward gives up at its deadline on a server that goes quiet, and at once on one that
    exits, naming the last line it said (the tests that start `reward serve` fail fast and say why)."""
    with pytest.raises(AssertionError, match="named no address within 1 s") as err:
        serve_reward([sys.executable, "-c", code], scifact_dir, tmp_path / "token", wait=1)
    assert str(err.value).endswith(said)
