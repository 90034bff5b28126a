"""The weight service: a gRPC server holding the newest weight version, for the learner and for relays.

Pull, not push: each actor asks for the newest version above the one it serves. So an actor that joins
late or restarts simply pulls the latest before it serves; a receiver that dies only ends its own stream
and never stalls the others; and the learner needs no list of actor addresses while actors scale.
Receivers report the version they serve, so the learner side knows who serves what.

The same server runs inside each actor as a relay: while an actor receives a version it serves the
chunks it already has to the next actor (a pipeline), so the learner sends one copy, not one per actor.
A published version is kept as each tensor's serialized chunk messages (`weights_codec.pack`): every
stream of it sends the same bytes, with no protobuf encoding per receiver, and a receiver that holds an
earlier version (`FetchRequest.base_version`) is sent only the tensors changed since. A relay serves
what it receives: a receiver that holds less than the relay's base version is refused and falls back
to the learner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Container, Mapping
from concurrent import futures

import grpc
import torch

from protocol import weights_pb2
from protocol.weights_codec import CHANNEL_OPTIONS, CHUNK_BYTES, Packed, pack, stream_messages
from prorank.security import TokenAuthInterceptor, announced_address, server_credentials

log = logging.getLogger(__name__)
SERVICE = "prorank.weights.v1.Weights"


class _Version:
    """One version: published (`packed`: streams built per receiver), or relayed (`messages`: one
    serialized stream, growing while it arrives from upstream)."""

    def __init__(self, manifest: weights_pb2.Manifest, messages: list[bytes], complete: bool,
                 packed: Packed | None = None):
        self.manifest, self.messages, self.complete, self.packed = manifest, messages, complete, packed
        self.error = ""  # set when a relayed transfer failed upstream


MAX_WAIT_SECONDS = 30.0  # the longest one Fetch waits for a version; the caller asks again if it wants more
DEADLINE_MARGIN = 0.5  # "none yet" goes out this long before the caller's deadline, so it always arrives
MAX_RECEIVERS = 4096  # Report table entries kept (the oldest go first)
MAX_NAME = 128  # characters of a receiver's name kept and logged


class WeightPublisher:
    """The servicer: Fetch streams the newest version (waiting for one), Report records who serves what.

    A waiting Fetch re-checks every half second whether its caller is still there, and at most
    `max_waiters` wait at once (the others are answered "none yet" at once and ask again), so waiting
    receivers never take every worker thread from Report and from the receivers that have work."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, max_waiters: int = 8, wire_dtype: torch.dtype | None = None):
        self.chunk_bytes, self.wire_dtype = chunk_bytes, wire_dtype
        self.max_waiters = max_waiters
        self._cond = threading.Condition()
        self._current: _Version | None = None
        self._waiting = 0
        self.receivers: dict[str, tuple[int, str]] = {}  # receiver -> (version served, last error)
        self.known: Container[str] | None = None  # when set, Report accepts only these receivers (the job's actors)

    @property
    def version(self) -> int:
        return self._current.manifest.version if self._current else 0

    def publish(self, version: int, state: Mapping[str, torch.Tensor]) -> Packed:
        """Make `state` the newest version; versions only go up. Tensors equal to the last published
        version's are not copied again, and are sent only to receivers that hold none of the versions
        since they last changed."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the published {self.version}")
        previous = self._current.packed if self._current else None
        packed = pack(version, state, self.chunk_bytes, previous, self.wire_dtype)
        self._swap(_Version(packed.manifest, [], complete=True, packed=packed))
        return packed

    # A relay fills a version as it arrives from upstream: begin, append each chunk, end.
    def begin(self, manifest: weights_pb2.Manifest, raw_manifest: bytes) -> None:
        if manifest.version > self.version:
            self._swap(_Version(manifest, [raw_manifest], complete=False))

    def append(self, version: int, raw_chunk: bytes) -> None:
        with self._cond:
            if self._current and self._current.manifest.version == version and not self._current.complete:
                self._current.messages.append(raw_chunk)
                self._cond.notify_all()

    def end(self, version: int, error: str = "") -> None:
        with self._cond:
            if self._current and self._current.manifest.version == version:
                self._current.complete, self._current.error = True, error
                self._cond.notify_all()

    def _swap(self, new: _Version) -> None:
        with self._cond:
            if self._current and not self._current.complete:  # streams of an unfinished one end
                self._current.complete, self._current.error = True, "superseded by a newer version"
            self._current = new
            self._cond.notify_all()

    def Fetch(self, request: weights_pb2.FetchRequest, context):
        current = self._wait_for_version(request, context)
        if current is None:
            if context.is_active():
                yield _none_yet(self.version)
            return
        if current.packed is not None:  # published here: complete, only what this receiver lacks
            for raw in stream_messages(current.packed, request.base_version):
                if not context.is_active():
                    return
                yield raw
            return
        base = current.manifest.base_version
        if base and request.base_version < base:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"relay of version {current.manifest.version} has only the tensors changed after "
                          f"version {base}; the receiver holds {request.base_version}")
        sent = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: sent < len(current.messages) or current.complete, timeout=1.0)
                ready, complete, error = current.messages[sent:], current.complete, current.error
            if not context.is_active():
                return
            if not ready and complete:
                break
            for raw in ready:
                if not context.is_active():  # the receiver went away: stop for it alone
                    return
                yield raw
            sent += len(ready)
        if error:  # a relay's upstream failed: end this stream in error, the receiver falls back
            context.abort(grpc.StatusCode.UNAVAILABLE, f"relay of version {current.manifest.version}: {error}")

    def _wait_for_version(self, request, context) -> _Version | None:
        """The version to send, or None ("none yet") once the wait the caller asked for is over, the
        caller left, or too many callers already wait."""
        wait = min(request.wait_ms / 1000 if request.wait_ms else MAX_WAIT_SECONDS, MAX_WAIT_SECONDS)
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, not at it
            wait = min(wait, remaining - DEADLINE_MARGIN)
        end = time.monotonic() + max(0.0, wait)
        newer = lambda: self.version > request.min_version  # noqa: E731
        with self._cond:
            if newer():
                return self._current
            if self._waiting >= self.max_waiters:
                return None
            self._waiting += 1
            try:
                while (left := end - time.monotonic()) > 0 and context.is_active():
                    if self._cond.wait_for(newer, timeout=min(0.5, left)):
                        return self._current  # a snapshot: a newer version swaps in a new object
                return None
            finally:
                self._waiting -= 1

    def Report(self, request: weights_pb2.Ack, context) -> weights_pb2.ReportReply:
        name = (request.receiver or context.peer())[:MAX_NAME]
        if self.known is not None and name not in self.known:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"unknown receiver {name!r}")
        if request.version > self.version:  # nobody can serve a version that was never published
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"receiver {name!r} reports version {request.version}; the newest is {self.version}")
        error = request.error[:1000]
        with self._cond:
            self.receivers.pop(name, None)
            self.receivers[name] = (request.version, error)
            while len(self.receivers) > MAX_RECEIVERS:  # dicts keep insertion order: drop the oldest
                self.receivers.pop(next(iter(self.receivers)))
        if not request.applied:
            log.warning("receiver %s refused a version: %s", name, error[:200])
        return weights_pb2.ReportReply()

    def wait_for(self, receivers: set[str], version: int, timeout: float) -> bool:
        """True once each named receiver reports serving `version` (or newer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.receivers.get(r, (0, ""))[0] >= version for r in receivers):
                return True
            time.sleep(0.01)
        return False


def _none_yet(version: int) -> bytes:
    return weights_pb2.WeightMessage(none_yet=weights_pb2.NoneYet(version=version)).SerializeToString()


def _handlers(publisher: WeightPublisher) -> grpc.GenericRpcHandler:
    # Registered by hand rather than with the generated helper only so that Fetch can send the
    # already-serialized WeightMessage bytes; the messages on the wire are the .proto's.
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Fetch": grpc.unary_stream_rpc_method_handler(
            publisher.Fetch, request_deserializer=weights_pb2.FetchRequest.FromString,
            response_serializer=bytes),
        "Report": grpc.unary_unary_rpc_method_handler(
            publisher.Report, request_deserializer=weights_pb2.Ack.FromString,
            response_serializer=weights_pb2.ReportReply.SerializeToString),
    })


class WeightServer:
    """The publisher behind a token-checked (optionally TLS) gRPC server; binds 127.0.0.1 by default."""

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = 0, tls_cert: str | None = None,
                 tls_key: str | None = None, chunk_bytes: int = CHUNK_BYTES, max_workers: int = 16,
                 publisher: WeightPublisher | None = None, wire_dtype: torch.dtype | None = None):
        # Half the workers at most wait for a version; the rest stay for transfers and reports.
        self.publisher = publisher or WeightPublisher(chunk_bytes, max(1, max_workers // 2), wire_dtype)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=[TokenAuthInterceptor(token)],
                                  options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((_handlers(self.publisher),))
        target = f"{host}:{port}"
        self.port = (self.server.add_secure_port(target, server_credentials(tls_cert, tls_key)) if tls_cert
                     else self.server.add_insecure_port(target))
        self.address = announced_address(host, self.port)  # a wildcard bind announces the node's IP

    def start(self) -> WeightServer:
        self.server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
