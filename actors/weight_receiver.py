"""The actors' side of weight sync: pull the newest version from the learner's weight server, or from
the actor before this one in the relay pipeline.

Chunks are written straight into a preallocated safetensors blob (header first, then the data section
in the manifest's layout), checked for order and completeness, and every tensor's checksum is verified
before anything is applied. Any failure raises WeightError and leaves the engine on its last version.
With a `relay`, each chunk is also handed on, as received, to the actor's own weight server.
"""

from __future__ import annotations

import logging
import time

import grpc

from protocol import weights_pb2, weights_pb2_grpc
from protocol.weight_service import SERVICE, WeightPublisher
from protocol.weights_codec import (CHANNEL_OPTIONS, Spec, TransferError, WeightError, check_manifest, decode_chunk,
                                    safetensors_header, verify)
from prorank.security import auth_metadata, channel_credentials

log = logging.getLogger(__name__)


def _channel(address: str, tls_ca: str | None, tls: bool) -> grpc.Channel:
    options = CHANNEL_OPTIONS
    if tls or tls_ca:
        return grpc.secure_channel(address, channel_credentials(tls_ca), options=options)
    return grpc.insecure_channel(address, options=options)


# Answers that asking again will not change; any other gRPC failure is a broken transfer (TransferError).
REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                      grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})
TRANSFER_SECONDS = 600.0  # deadline for a transfer once a version is on its way (a dead peer is found sooner by keepalive)


def fetch_version(address: str, token: str, min_version: int, receiver: str, expected: dict[str, Spec] | None = None,
                  tls_ca: str | None = None, tls: bool = False, timeout: float = 300.0,
                  relay: WeightPublisher | None = None, buffer: bytearray | None = None):
    """(manifest, safetensors blob) of the newest version above `min_version`, or None if the server
    has none before `timeout` (the server says "none yet": never an error). Raises WeightError for a
    refused call or a bad transfer. The blob is `buffer` when that has the right size: allocating
    0.65 GB anew costs 0.27 s of page faults."""
    deadline = time.monotonic() + timeout
    with _channel(address, tls_ca, tls) as channel:
        # Raw bytes in (no response deserializer): chunks are decoded as views, see decode_chunk.
        fetch = channel.unary_stream(f"/{SERVICE}/Fetch", request_serializer=weights_pb2.FetchRequest.SerializeToString)
        while (wait := deadline - time.monotonic()) > 0:
            request = weights_pb2.FetchRequest(min_version=min_version, receiver=receiver, wait_ms=int(wait * 1000))
            stream = fetch(request, timeout=wait + TRANSFER_SECONDS, metadata=auth_metadata(token))
            try:
                got = _receive(stream, min_version, expected, relay, buffer)
            except grpc.RpcError as err:
                kind = WeightError if err.code() in REFUSALS else TransferError
                raise kind(f"weight server {address}: {err.code().name}: {err.details()}") from None
            if got is not None:
                return got
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))  # "none yet" early: a busy server
    return None


def pull_newest(sources: list[tuple[str, float]], token: str, min_version: int, receiver: str,
                expected: dict[str, Spec] | None = None, tls_ca: str | None = None,
                relay: WeightPublisher | None = None, buffer: bytearray | None = None, retries: int = 2):
    """((manifest, blob) or None, the source it came from): the newest version from the first of
    `sources` ((address, seconds) pairs: the relay before this receiver, then the learner) that has
    one. A source that fails (a relay hop that died or was cut off mid-transfer) is skipped for the
    next; the last one (the learner) is asked again `retries` times when its transfer broke, and
    its failure is raised (WeightError) after that."""
    *relays, (learner, learner_wait) = sources
    for source, wait in relays:
        try:
            got = fetch_version(source, token, min_version, receiver, expected, tls_ca, timeout=wait,
                                relay=relay, buffer=buffer)
        except WeightError as err:
            log.warning("%s: weights from %s failed (%s); trying the next source", receiver, source, err)
            continue
        if got is not None:
            return got, source
    for attempt in range(1 + retries):
        try:
            got = fetch_version(learner, token, min_version, receiver, expected, tls_ca, timeout=learner_wait,
                                relay=relay, buffer=buffer)
        except TransferError as err:
            if attempt == retries:
                raise
            log.warning("%s: weights from %s broke off (%s); asking again", receiver, learner, err)
            time.sleep(0.5)
            continue
        return (got, learner) if got is not None else (None, "")
    raise AssertionError("unreachable")


def _receive(stream, min_version: int, expected: dict[str, Spec] | None, relay: WeightPublisher | None,
             buffer: bytearray | None):
    raw_manifest = next(stream, None)
    first = weights_pb2.WeightMessage.FromString(raw_manifest) if raw_manifest else None
    if first is not None and first.WhichOneof("kind") == "none_yet":
        return None
    if first is None or first.WhichOneof("kind") != "manifest":
        raise WeightError("the stream did not start with a manifest")
    manifest = first.manifest
    if manifest.version <= min_version:  # never go back, whatever a server sends
        raise WeightError(f"stale version {manifest.version}: already serving {min_version}")
    if relay:  # downstream receivers check the manifest themselves: hand it on at once
        relay.begin(manifest, raw_manifest)
    error = "transfer interrupted"
    try:
        check_manifest(manifest, expected)
        header = safetensors_header(manifest)
        size = len(header) + manifest.total_bytes
        blob = buffer if buffer is not None and len(buffer) == size else bytearray(size)
        blob[: len(header)] = header
        data = memoryview(blob)[len(header) :]
        received = 0
        for raw in stream:
            version, offset, payload = decode_chunk(raw)
            end = offset + len(payload)
            if version != manifest.version:
                raise WeightError(f"version {manifest.version}: a chunk of version {version} in the stream")
            if offset != received or end > manifest.total_bytes:
                raise WeightError(f"version {manifest.version}: chunk at {offset} (+{len(payload)}) does not "
                                  f"follow byte {received} of {manifest.total_bytes}")
            data[offset:end] = payload
            received = end
            if relay:
                relay.append(version, raw)
        if received != manifest.total_bytes:
            raise TransferError(f"version {manifest.version}: partial transfer, {received} of "
                              f"{manifest.total_bytes} bytes")
        verify(manifest, data)
        error = ""
    except WeightError as err:
        error = str(err)
        raise
    finally:
        if relay:
            relay.end(manifest.version, error)
    return manifest, blob


def report(address: str, token: str, ack: weights_pb2.Ack, tls_ca: str | None = None, tls: bool = False) -> None:
    with _channel(address, tls_ca, tls) as channel:
        weights_pb2_grpc.WeightsStub(channel).Report(ack, timeout=10, metadata=auth_metadata(token))
