"""The actors' side of weight sync: pull the newest version from the learner's weight server, or from
the actor before this one in the relay pipeline.

Chunks are written straight into a preallocated safetensors blob (header first, then the data section
in the manifest's layout), checked for order and completeness, and every tensor's checksum is verified
before anything is applied. A receiver that still holds the blob of its version asks with it as
`base_version` and is sent only the tensors changed since; the blob keeps the others, and the checksums
of all of them are verified all the same. Any failure raises WeightError and leaves the engine on its last version.
With a `relay`, each chunk is also handed on, as received, to the actor's own weight server.
"""

from __future__ import annotations

import logging
import time

import grpc

from prorank.guard.security import auth_metadata, channel_credentials
from prorank.protocol import weights_pb2, weights_pb2_grpc
from prorank.weights.codec import (
    CHANNEL_OPTIONS,
    Spec,
    TransferError,
    WeightError,
    check_manifest,
    decode_chunk,
    safetensors_header,
    verify,
)
from prorank.weights.server import SERVICE, WeightPublisher

log = logging.getLogger(__name__)


def _channel(address: str, tls_ca: str | None, tls: bool) -> grpc.Channel:
    options = CHANNEL_OPTIONS
    if tls or tls_ca:
        return grpc.secure_channel(address, channel_credentials(tls_ca), options=options)
    return grpc.insecure_channel(address, options=options)


# Answers that asking again will not change; any other gRPC failure is a broken transfer (TransferError).
REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# The deadline of a transfer once a version is on its way (a dead peer is found sooner, by keepalive).
TRANSFER_SECONDS = 600.0


def fetch_version(
    address: str,
    token: str,
    min_version: int,
    receiver: str,
    expected: dict[str, Spec] | None = None,
    tls_ca: str | None = None,
    tls: bool = False,
    timeout: float = 300.0,
    relay: WeightPublisher | None = None,
    buffer: bytearray | None = None,
    base_version: int = 0,
    transfer_timeout: float = TRANSFER_SECONDS,
):
    """(manifest, safetensors blob) of the newest version above `min_version`, or None if the server has none before
    `timeout` (the server says "none yet": never an error). The whole call ends within `timeout + transfer_timeout`:
    a transfer that started is given `transfer_timeout` on top of the wait. Raises WeightError for a refused call or
    a bad transfer. The blob is `buffer` when that has the right size: allocating 0.65 GB anew costs 0.27 s of page
    faults. `base_version`: the version whose complete blob `buffer` holds (0: none); only the tensors changed since
    are sent, and written into it in place, so after a failure `buffer` no longer holds any complete version."""
    deadline = time.monotonic() + timeout
    with _channel(address, tls_ca, tls) as channel:
        # Raw bytes in (no response deserializer): chunks are decoded as views, see decode_chunk.
        fetch = channel.unary_stream(f"/{SERVICE}/Fetch", request_serializer=weights_pb2.FetchRequest.SerializeToString)
        while (wait := deadline - time.monotonic()) > 0:
            request = weights_pb2.FetchRequest(
                min_version=min_version,
                receiver=receiver,
                wait_ms=int(wait * 1000),
                base_version=base_version if buffer is not None else 0,
            )
            stream = fetch(request, timeout=wait + transfer_timeout, metadata=auth_metadata(token))
            try:
                got = receive_version(stream, min_version, expected, relay, buffer, request.base_version)
            except grpc.RpcError as err:
                kind = WeightError if err.code() in REFUSALS else TransferError
                raise kind(f"weight server {address}: {err.code().name}: {err.details()}") from None
            if got is not None:
                return got
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))  # "none yet" early: a busy server
    return None


def pull_newest(
    sources: list[tuple[str, float]],
    token: str,
    min_version: int,
    receiver: str,
    expected: dict[str, Spec] | None = None,
    tls_ca: str | None = None,
    relay: WeightPublisher | None = None,
    buffer: bytearray | None = None,
    retries: int = 2,
    base_version: int = 0,
):
    """((manifest, blob) or None, the source it came from): the newest version from the first of
    `sources` ((address, seconds) pairs: the relay before this receiver, then the learner) that has
    one. A source that fails (a relay hop that died or was cut off mid-transfer) is skipped for the
    next; the last one (the learner) is asked again `retries` times when its transfer broke, and
    its failure is raised (WeightError) after that. `buffer` holds the complete blob of `base_version`
    until a failed source may have written into it; the next source is then asked for everything."""
    *relays, (learner, learner_wait) = sources
    for source, wait in relays:
        try:
            got = fetch_version(
                source,
                token,
                min_version,
                receiver,
                expected,
                tls_ca,
                timeout=wait,
                relay=relay,
                buffer=buffer,
                base_version=base_version,
            )
        except WeightError as err:
            log.warning("%s: weights from %s failed (%s); trying the next source", receiver, source, err)
            base_version = 0
            continue
        if got is not None:
            return got, source
    for attempt in range(1 + retries):
        try:
            got = fetch_version(
                learner,
                token,
                min_version,
                receiver,
                expected,
                tls_ca,
                timeout=learner_wait,
                relay=relay,
                buffer=buffer,
                base_version=base_version,
            )
        except TransferError as err:
            base_version = 0
            if attempt == retries:
                raise
            log.warning("%s: weights from %s broke off (%s); asking again", receiver, learner, err)
            time.sleep(0.5)
            continue
        return (got, learner) if got is not None else (None, "")
    raise AssertionError("unreachable")


def receive_version(
    stream,
    min_version: int,
    expected: dict[str, Spec] | None,
    relay: WeightPublisher | None,
    buffer: bytearray | None,
    held: int = 0,
):
    raw_manifest = next(stream, None)
    first = weights_pb2.WeightMessage.FromString(raw_manifest) if raw_manifest else None
    if first is not None and first.WhichOneof("kind") == "none_yet":
        return None
    if first is None or first.WhichOneof("kind") != "manifest":
        raise WeightError("the stream did not start with a manifest")
    manifest = first.manifest
    if manifest.version <= min_version:  # never go back, whatever a server sends
        raise WeightError(f"stale version {manifest.version}: already serving {min_version}")
    if relay and raw_manifest:  # downstream receivers check the manifest themselves: hand it on at once
        relay.begin(manifest, raw_manifest)
    error = "transfer interrupted"
    try:
        check_manifest(manifest, expected)
        header = safetensors_header(manifest)
        size = len(header) + manifest.total_bytes
        base = manifest.base_version
        keeps = any(s.changed_at <= base for s in manifest.tensors)  # some tensors are not sent: kept from the blob
        if (
            base
            and keeps
            and not (held >= base and buffer is not None and len(buffer) == size and buffer[: len(header)] == header)
        ):
            raise WeightError(
                f"version {manifest.version}: only the tensors changed after version {base} were "
                f"sent, and this receiver holds no complete version since (it holds {held})"
            )
        blob = buffer if buffer is not None and len(buffer) == size else bytearray(size)
        blob[: len(header)] = header
        data = memoryview(blob)[len(header) :]
        # The byte ranges that follow, in order: every sent tensor's, each in one or more chunks.
        ranges = iter(
            [
                (s.offset, s.offset + s.nbytes, s.changed_at, s.name)
                for s in manifest.tensors
                if s.changed_at > base and s.nbytes
            ]
        )
        current = next(ranges, None)
        received = None  # where the next chunk must start
        for raw in stream:
            version, offset, payload = decode_chunk(raw)
            end = offset + len(payload)
            if current is None:
                raise WeightError(f"version {manifest.version}: a chunk at {offset} after the last tensor")
            start, stop, changed_at, name = current
            expected_at = start if received is None else received
            if offset != expected_at or end > stop or not payload:
                raise WeightError(
                    f"version {manifest.version}: chunk at {offset} (+{len(payload)}) does not follow "
                    f"byte {expected_at} of tensor {name} ({start}..{stop})"
                )
            if version != changed_at:
                raise WeightError(
                    f"version {manifest.version}: tensor {name} changed at version {changed_at}, "
                    f"got a chunk of version {version}"
                )
            data[offset:end] = payload
            received = end
            if end == stop:
                current, received = next(ranges, None), None
            if relay:
                relay.append(manifest.version, raw)
        if current is not None:
            raise TransferError(
                f"version {manifest.version}: partial transfer, stopped in tensor {current[3]} "
                f"at byte {received if received is not None else current[0]}"
            )
        verify(manifest, data)  # every tensor, the kept ones too
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
