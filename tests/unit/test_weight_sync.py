"""Weight versions over real gRPC on loopback: codec checks, security, corrupt and partial transfers."""

from __future__ import annotations

import threading

import grpc
import pytest
import safetensors.torch
import torch

from prorank.guard.security import auth_metadata
from prorank.protocol import weights_pb2, weights_pb2_grpc
from prorank.weights.codec import (
    TransferError,
    WeightError,
    check_manifest,
    decode_chunk,
    expected_specs,
    pack,
    stream_messages,
    verify,
)
from prorank.weights.receiver import fetch_version, pull_newest, receive_version
from prorank.weights.server import WeightPublisher, WeightServer
from tests.unit.test_reward import self_signed

TOKEN = "weights-token"


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(300, 200, generator=g),
        "b.bias": torch.randn(7, generator=g),
        "c.half": torch.randn(33, 5, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def server():
    srv = WeightServer(TOKEN, chunk_bytes=64 * 1024).start()
    yield srv
    srv.stop(0)


def test_round_trip_is_exact(server):
    server.publisher.publish(1, state())
    manifest, blob = fetch_version(server.address, TOKEN, 0, "r", expected_specs(state()), timeout=10)
    assert manifest.version == 1 and len(manifest.tensors) == 3
    got = safetensors.torch.load(bytes(blob))
    for name, tensor in state().items():
        assert torch.equal(got[name], tensor), name


def _data(messages: list[bytes], total: int) -> bytearray:
    """The data section a receiver assembles from a version's chunk messages."""
    buffer = bytearray(total)
    for raw in messages[1:]:
        _, offset, payload = decode_chunk(raw)
        buffer[offset : offset + len(payload)] = payload
    return buffer


def test_manifest_checks():
    packed = pack(3, state(), 1024)
    manifest = packed.manifest
    buffer = _data(stream_messages(packed), manifest.total_bytes)
    check_manifest(manifest, expected_specs(state()))
    wrong_shape = {**state(), "b.bias": torch.zeros(8)}
    with pytest.raises(WeightError, match=r"tensor b.bias: got FLOAT32\[7\], expected FLOAT32\[8\]"):
        check_manifest(manifest, expected_specs(wrong_shape))
    wrong_dtype = {**state(), "b.bias": torch.zeros(7, dtype=torch.float16)}
    with pytest.raises(WeightError, match=r"tensor b.bias: got FLOAT32\[7\], expected FLOAT16\[7\]"):
        check_manifest(manifest, expected_specs(wrong_dtype))
    with pytest.raises(WeightError, match=r"unknown tensors \['a.weight'\], missing \['z'\]"):
        check_manifest(
            manifest,
            expected_specs(
                {"z": torch.zeros(1), "b.bias": torch.zeros(7), "c.half": torch.zeros(33, 5, dtype=torch.bfloat16)}
            ),
        )
    buffer[5] ^= 0xFF
    with pytest.raises(WeightError, match=r"version 3: tensor a.weight: checksum"):
        verify(manifest, memoryview(buffer))
    manifest.tensors[1].nbytes += 4
    with pytest.raises(WeightError, match=r"tensor b.bias: bytes at .* do not fit"):
        check_manifest(manifest, None)


def test_corrupt_chunk_is_rejected(server):
    server.publisher.publish(1, state())
    messages = server.publisher._current.packed.chunks["a.weight"]
    corrupt = bytearray(messages[1])
    corrupt[-10] ^= 0x01  # one flipped bit in the second chunk, after checksumming
    messages[1] = bytes(corrupt)
    with pytest.raises(WeightError, match=r"version 1: tensor a.weight: checksum"):
        fetch_version(server.address, TOKEN, 0, "r", timeout=10)


def test_mismatched_version_is_rejected_before_any_byte(server):
    server.publisher.publish(1, state())
    other = expected_specs({"x": torch.zeros(3)})
    with pytest.raises(WeightError, match=r"unknown tensors"):
        fetch_version(server.address, TOKEN, 0, "r", other, timeout=10)


def test_stale_and_absent_versions(server):
    assert fetch_version(server.address, TOKEN, 0, "r", timeout=0.5) is None  # nothing published yet
    server.publisher.publish(2, state())
    assert fetch_version(server.address, TOKEN, 2, "r", timeout=0.5) is None  # nothing newer than 2
    with pytest.raises(ValueError, match="not newer"):
        server.publisher.publish(1, state())


def test_unauthenticated_is_refused(server):
    server.publisher.publish(1, state())
    with pytest.raises(WeightError, match="UNAUTHENTICATED"):
        fetch_version(server.address, "wrong", 0, "r", timeout=5)


class _Stop(Exception):
    pass


class _StopAfter:
    """The call's context, except that the stream ends (OK status) after `n` messages."""

    def __init__(self, context, n: int):
        self.context, self.n = context, n

    def __getattr__(self, name):
        return getattr(self.context, name)

    async def write(self, message):
        if self.n == 0:
            raise _Stop
        self.n -= 1
        await self.context.write(message)


class _Truncating(WeightPublisher):
    """Sends the manifest and only the first chunk, as a learner that dies mid-stream would; with `cuts`
    set, only that many streams are cut and the later ones are whole."""

    cuts: int | None = None

    async def Fetch(self, request, context):
        if self.cuts is not None:
            if not self.cuts:
                return await super().Fetch(request, context)
            self.cuts -= 1
        try:
            await super().Fetch(request, _StopAfter(context, 2))
        except _Stop:
            pass


def test_partial_transfer_is_rejected():
    srv = WeightServer(TOKEN, publisher=_Truncating(64 * 1024)).start()
    try:
        srv.publisher.publish(1, state())
        with pytest.raises(WeightError, match=r"partial transfer, stopped in tensor a.weight at byte 65536"):
            fetch_version(srv.address, TOKEN, 0, "r", timeout=10)
    finally:
        srv.stop(0)


def test_a_receiver_that_dies_mid_stream_does_not_stall_others(server):
    server.publisher.publish(1, state())
    channel = grpc.insecure_channel(server.address)
    stream = weights_pb2_grpc.WeightsStub(channel).Fetch(
        weights_pb2.FetchRequest(min_version=0, receiver="dying"), metadata=auth_metadata(TOKEN), timeout=30
    )
    assert next(stream).WhichOneof("kind") == "manifest"
    assert next(stream).WhichOneof("kind") == "chunk"
    results = []
    others = [
        threading.Thread(target=lambda: results.append(fetch_version(server.address, TOKEN, 0, "ok", timeout=10)))
        for _ in range(3)
    ]
    for t in others:
        t.start()
    stream.cancel()
    channel.close()  # the dying receiver is gone mid-stream
    for t in others:
        t.join(timeout=30)
    assert len(results) == 3 and all(r[0].version == 1 for r in results)


def test_tls(tmp_path):

    cert, key = self_signed(tmp_path)
    srv = WeightServer(TOKEN, tls_cert=cert, tls_key=key).start()
    try:
        srv.publisher.publish(1, state())
        manifest, _ = fetch_version(srv.address, TOKEN, 0, "r", tls_ca=cert, timeout=10)
        assert manifest.version == 1
        with pytest.raises(WeightError, match="UNAVAILABLE"):
            fetch_version(srv.address, TOKEN, 0, "r", timeout=3)  # plaintext against TLS
    finally:
        srv.stop(0)


def test_chunk_decoding_matches_protobuf():
    packed = pack(9, state(), 1000)
    messages = stream_messages(packed)
    assert weights_pb2.WeightMessage.FromString(messages[0]).manifest == packed.manifest
    for raw in messages[1:]:
        version, offset, data = decode_chunk(raw)
        chunk = weights_pb2.WeightMessage.FromString(raw).chunk
        assert (version, offset, bytes(data)) == (chunk.version, chunk.offset, chunk.data)
    # Other field orders and empty payloads still decode (through protobuf or the fast path).
    odd = weights_pb2.WeightMessage(chunk=weights_pb2.Chunk(data=b"xy", offset=0, version=0)).SerializeToString()
    assert decode_chunk(odd)[0:2] == (0, 0) and bytes(decode_chunk(odd)[2]) == b"xy"
    with pytest.raises(WeightError, match="expected a chunk, got a manifest"):
        decode_chunk(messages[0])
    with pytest.raises(WeightError, match="not a WeightMessage"):
        decode_chunk(b"\x12\xff\xff")


def _relay_of(upstream: WeightServer, name: str) -> tuple[WeightServer, threading.Thread, list]:
    """A relay: receives from `upstream` while serving what it has to the next receiver."""
    relay = WeightServer(TOKEN, chunk_bytes=64 * 1024).start()
    out: list = []

    def run():
        try:
            out.append(fetch_version(upstream.address, TOKEN, 0, name, timeout=10, relay=relay.publisher))
        except WeightError as err:
            out.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return relay, thread, out


def test_relay_pipeline_hands_on_every_byte(server):
    first, t1, got1 = _relay_of(server, "a")
    second, t2, got2 = _relay_of(first, "b")  # pulls from the first relay while it still receives
    try:
        server.publisher.publish(1, state())
        manifest, blob = fetch_version(second.address, TOKEN, 0, "c", expected_specs(state()), timeout=10)
        t1.join(10)
        t2.join(10)
        assert manifest.version == 1 and got1[0][0].version == 1 and got2[0][0].version == 1
        got = safetensors.torch.load(bytes(blob))
        assert all(torch.equal(got[name], tensor) for name, tensor in state().items())
        assert first.publisher.version == second.publisher.version == 1
    finally:
        first.stop(0)
        second.stop(0)


def test_relay_passes_on_an_upstream_failure():
    upstream = WeightServer(TOKEN, publisher=_Truncating(64 * 1024)).start()
    relay, thread, got = _relay_of(upstream, "a")
    try:
        upstream.publisher.publish(1, state())
        with pytest.raises(WeightError, match=r"UNAVAILABLE: relay of version 1: .*partial transfer"):
            fetch_version(relay.address, TOKEN, 0, "b", timeout=10)
        thread.join(10)
        assert isinstance(got[0], WeightError)
    finally:
        upstream.stop(0)
        relay.stop(0)


class _CutOnce(_Truncating):
    """Its first stream stops after one chunk (a connection lost mid-transfer); later ones are whole."""

    cuts = 1


def test_a_transfer_cut_mid_stream_is_asked_again():

    srv = WeightServer(TOKEN, publisher=_CutOnce(64 * 1024)).start()
    try:
        srv.publisher.publish(1, state())
        (manifest, _), source = pull_newest([(srv.address, 10)], TOKEN, 0, "r")
        assert manifest.version == 1 and source == srv.address and srv.publisher.cuts == 0
        srv.publisher.cuts = 5  # more cuts than retries: refused, naming the cut
        with pytest.raises(TransferError, match="partial transfer"):
            pull_newest([(srv.address, 10)], TOKEN, 0, "r", retries=2)
    finally:
        srv.stop(0)


def test_only_changed_tensors_are_sent_and_the_receiver_keeps_the_rest(server):
    """Version 2 changes one tensor of three: a receiver holding version 1 is sent that tensor alone,
    keeps the other two in its blob, and still verifies all three; one holding nothing gets all."""
    first = state()
    server.publisher.publish(1, first)
    m1, blob = fetch_version(server.address, TOKEN, 0, "r", expected_specs(first), timeout=10)
    second = {**first, "b.bias": first["b.bias"] + 1}
    packed = server.publisher.publish(2, second)
    assert [s.name for s in packed.changed()] == ["b.bias"]
    assert [s.changed_at for s in packed.manifest.tensors] == [1, 2, 1]
    assert packed.chunks["a.weight"] is server.publisher._current.packed.chunks["a.weight"]  # not copied again

    m2, kept = fetch_version(
        server.address, TOKEN, 1, "r", expected_specs(first), timeout=10, buffer=blob, base_version=1
    )
    assert kept is blob and m2.base_version == 1
    assert [s.nbytes for s in m2.tensors if s.changed_at > m2.base_version] == [7 * 4]
    got = safetensors.torch.load(bytes(kept))
    assert all(torch.equal(got[name], t) for name, t in second.items())

    m_full, fresh = fetch_version(server.address, TOKEN, 1, "other", timeout=10)  # holds no blob: everything
    assert m_full.base_version == 0 and safetensors.torch.load(bytes(fresh)).keys() == second.keys()


def test_a_delta_onto_a_blob_that_is_not_the_base_is_refused(server):
    server.publisher.publish(1, state())
    _, blob = fetch_version(server.address, TOKEN, 0, "r", timeout=10)
    server.publisher.publish(2, {**state(), "b.bias": torch.zeros(7)})
    blob[-1] ^= 0xFF  # the kept bytes of c.half no longer are version 1's
    with pytest.raises(WeightError, match=r"version 2: tensor c.half: checksum"):
        fetch_version(server.address, TOKEN, 1, "r", timeout=10, buffer=blob, base_version=1)
    with pytest.raises(WeightError, match=r"only the tensors changed after version 1 were sent"):
        stream = iter(stream_messages(server.publisher._current.packed, 1))
        receive_version(stream, 1, None, None, None, held=0)


def test_a_relay_holding_a_delta_sends_a_receiver_that_holds_less_to_the_learner(server):
    server.publisher.publish(1, state())
    _, relay_blob = fetch_version(server.address, TOKEN, 0, "relay", timeout=10)
    server.publisher.publish(2, {**state(), "b.bias": torch.zeros(7)})
    relay = WeightServer(TOKEN).start()
    try:
        fetch_version(
            server.address, TOKEN, 1, "relay", timeout=10, relay=relay.publisher, buffer=relay_blob, base_version=1
        )
        with pytest.raises(WeightError, match=r"FAILED_PRECONDITION.*only the tensors changed after version 1"):
            fetch_version(relay.address, TOKEN, 0, "late", timeout=10)  # holds nothing
        _, blob = fetch_version(server.address, TOKEN, 0, "peer", timeout=5)
        server.publisher.publish(3, {**state(), "b.bias": torch.ones(7)})  # the relay has version 2 only
        manifest, _ = fetch_version(relay.address, TOKEN, 0, "peer2", timeout=5, buffer=bytearray(blob), base_version=1)
        assert manifest.version == 2
    finally:
        relay.stop(0)


def test_bfloat16_on_the_wire_for_a_float32_model():
    """Half the bytes; a float32 receiver accepts it, and gets each value rounded to bfloat16."""
    srv = WeightServer(TOKEN, wire_dtype=torch.bfloat16).start()
    try:
        packed = srv.publisher.publish(1, state())
        full = pack(1, state(), 2**20)
        assert packed.manifest.total_bytes < 0.55 * full.manifest.total_bytes
        manifest, blob = fetch_version(srv.address, TOKEN, 0, "r", expected_specs(state()), timeout=10)
        got = safetensors.torch.load(bytes(blob))
        assert all(
            got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16))
            for name, t in state().items()
        )
    finally:
        srv.stop(0)
