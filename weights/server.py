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

import asyncio
import logging
import threading
import time
from collections.abc import Container, Iterable, Mapping

import grpc
import torch

from prorank.guard.guarded_server import GuardedServer, ServerLimits
from prorank.guard.refusals import RefusalLog, parse_request
from prorank.guard.security import announced_address
from prorank.protocol import weights_pb2
from prorank.weights.codec import CHANNEL_OPTIONS, CHUNK_BYTES, Packed, pack, stream_messages

log = logging.getLogger(__name__)
SERVICE = "prorank.weights.v1.Weights"


class _Version:
    """One version: published (`packed`: streams built per receiver), or relayed (`messages`: one
    serialized stream, growing while it arrives from upstream)."""

    def __init__(
        self, manifest: weights_pb2.Manifest, messages: list[bytes], complete: bool, packed: Packed | None = None
    ):
        self.manifest, self.messages, self.complete, self.packed = manifest, messages, complete, packed
        self.error = ""  # set when a relayed transfer failed upstream


MAX_WAIT_SECONDS = 30.0  # the longest one Fetch waits for a version; the caller asks again if it wants more
DEADLINE_MARGIN = 0.5  # "none yet" goes out this long before the caller's deadline, so it always arrives
MAX_RECEIVERS = 4096  # Report table entries kept (the oldest go first)
MAX_NAME = 100  # characters of a receiver's name kept and logged
MAX_REQUEST_BYTES = 2**20  # a FetchRequest or Ack is a few bytes; a larger one is refused unread


class _Changes:
    """Wakes the Fetch calls waiting on the server's loop when the publisher changes, from any thread.
    The event is replaced on the loop only, after the change: a waiter that took it before looking at the
    state is always woken by the next change."""

    def __init__(self):
        self.wake_from_any_thread = lambda: None  # set by the server that runs the loop
        self._event: asyncio.Event | None = None

    def event(self) -> asyncio.Event:  # on the loop
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def fire(self) -> None:  # on the loop
        if self._event is not None:
            self._event.set()
            self._event = None


class WeightPublisher:
    """The servicer: Fetch streams the newest version (waiting for one), Report records who serves what.

    Its calls run on the server's event loop (a waiting or slow call holds no thread); publish and the
    relay's begin/append/end are called from other threads. At most `max_waiters` Fetches wait for a
    version at once; the others are answered "none yet" at once and ask again."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, max_waiters: int = 128, wire_dtype: torch.dtype | None = None):
        self.chunk_bytes, self.wire_dtype = chunk_bytes, wire_dtype
        self.max_waiters = max_waiters
        self._lock = threading.Lock()
        self.changes = _Changes()
        self.refusals = RefusalLog(10.0)  # the server's, once one runs this publisher
        self._current: _Version | None = None
        self._waiting = 0
        self.receivers: dict[str, tuple[int, str]] = {}  # receiver -> (version served, last error)
        self.known: Container[str] | None = None  # when set, Report accepts only these receivers (the job's actors)

    @property
    def version(self) -> int:
        current = self._current
        return current.manifest.version if current else 0

    def publish(
        self, version: int, state: Mapping[str, torch.Tensor], receivers: Iterable[str] | None = None
    ) -> Packed:
        """Make `state` the newest version; versions only go up. Tensors equal to the last published
        version's are not copied again, and are sent only to receivers that hold none of the versions
        since they last changed. `receivers`: from now on Report accepts only these names (the job's actors)."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the published {self.version}")
        if receivers is not None:
            self.known = frozenset(receivers)
        previous = self._current.packed if self._current else None
        packed = pack(version, state, self.chunk_bytes, previous, self.wire_dtype)
        self._swap(_Version(packed.manifest, [], complete=True, packed=packed))
        return packed

    # A relay fills a version as it arrives from upstream: begin, append each chunk, end.
    def begin(self, manifest: weights_pb2.Manifest, raw_manifest: bytes) -> None:
        if manifest.version > self.version:
            self._swap(_Version(manifest, [raw_manifest], complete=False))

    def append(self, version: int, raw_chunk: bytes) -> None:
        with self._lock:
            if self._current and self._current.manifest.version == version and not self._current.complete:
                self._current.messages.append(raw_chunk)
        self.changes.wake_from_any_thread()

    def end(self, version: int, error: str = "") -> None:
        with self._lock:
            if self._current and self._current.manifest.version == version:
                self._current.complete, self._current.error = True, error
        self.changes.wake_from_any_thread()

    def _swap(self, new: _Version) -> None:
        with self._lock:
            if self._current and not self._current.complete:  # streams of an unfinished one end
                self._current.complete, self._current.error = True, "superseded by a newer version"
            self._current = new
        self.changes.wake_from_any_thread()

    async def Fetch(self, raw: bytes, context):
        request = await parse_request(weights_pb2.FetchRequest, raw, context, self.refusals)
        current = await self._wait_for_version(request, context)
        if current is None:
            await context.write(_none_yet(self.version))
            return
        if current.packed is not None:  # published here: complete, only what this receiver lacks
            for message in stream_messages(current.packed, request.base_version):
                await context.write(message)  # waits while the receiver reads slowly, holding no thread
            return
        base = current.manifest.base_version
        if base and request.base_version < base:
            await self.refusals.refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"relay of version {current.manifest.version} has only the tensors changed "
                f"after version {base}; the receiver holds {request.base_version}",
            )
        sent = 0
        while True:
            changed = self.changes.event()
            with self._lock:
                ready, complete, error = current.messages[sent:], current.complete, current.error
            if not ready and complete:
                break
            if not ready:
                await changed.wait()
                continue
            for message in ready:
                await context.write(message)
            sent += len(ready)
        if error:  # a relay's upstream failed: end this stream in error, the receiver falls back
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"relay of version {current.manifest.version}: {error}")

    async def _wait_for_version(self, request, context) -> _Version | None:
        """The version to send, or None ("none yet") once the wait the caller asked for is over or too
        many callers already wait. A caller that leaves cancels its wait at once (asyncio)."""
        wait = min(request.wait_ms / 1000 if request.wait_ms else MAX_WAIT_SECONDS, MAX_WAIT_SECONDS)
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, not at it
            wait = min(wait, remaining - DEADLINE_MARGIN)
        end = time.monotonic() + max(0.0, wait)
        newer = lambda: self.version > request.min_version  # noqa: E731
        if newer():
            return self._current
        if self._waiting >= self.max_waiters:
            return None
        self._waiting += 1
        try:
            while (left := end - time.monotonic()) > 0:
                changed = self.changes.event()
                if newer():
                    return self._current  # a snapshot: a newer version swaps in a new object
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                    pass
            return self._current if newer() else None
        finally:
            self._waiting -= 1

    async def Report(self, raw: bytes, context) -> weights_pb2.ReportReply:
        request = await parse_request(weights_pb2.Ack, raw, context, self.refusals)
        # Short enough to quote in an error; the caller's own address behind an accept layer.
        name = (request.receiver or self.refusals.real_peer(context.peer()))[:MAX_NAME]
        if self.known is not None and name not in self.known:
            await self.refusals.refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"unknown receiver {name!r}")
        if request.version > self.version:  # nobody can serve a version that was never published
            await self.refusals.refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"receiver {name!r} reports version {request.version}; the newest is {self.version}",
            )
        error = request.error[:1000]
        with self._lock:
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
    # Raw bytes both ways: requests are parsed by the servicer (malformed -> INVALID_ARGUMENT, not a
    # traceback), and Fetch sends the already-serialized WeightMessage bytes. The messages are the .proto's.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Fetch": grpc.unary_stream_rpc_method_handler(publisher.Fetch),
            "Report": grpc.unary_unary_rpc_method_handler(
                publisher.Report, response_serializer=weights_pb2.ReportReply.SerializeToString
            ),
        },
    )


NO_GATE = ServerLimits(max_connections_per_peer=0)  # as weights.max_connections_per_peer's default (why: there)


class WeightServer:
    """The publisher behind a token-checked (optionally TLS) gRPC server; binds 127.0.0.1 by default.
    `limits` caps the calls in flight (see prorank/guard/guarded_server.py); at most half of them wait for a
    version, so reports and transfers always find room."""

    def __init__(
        self,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        limits: ServerLimits = NO_GATE,
        publisher: WeightPublisher | None = None,
        wire_dtype: torch.dtype | None = None,
    ):
        waiters = max(1, min(limits.max_calls, limits.max_calls_per_peer) // 2)
        self.publisher = publisher or WeightPublisher(chunk_bytes, waiters, wire_dtype)
        # The server receives only small requests: a large message is refused by its length, unread.
        options = dict(CHANNEL_OPTIONS) | {"grpc.max_receive_message_length": MAX_REQUEST_BYTES}
        self.server = GuardedServer(
            lambda server, _: server.add_generic_rpc_handlers((_handlers(self.publisher),)),
            token,
            host,
            port,
            tls_cert,
            tls_key,
            limits,
            options.items(),
            name="weights",
        )
        self.publisher.refusals = self.server.refusals
        self.publisher.changes.wake_from_any_thread = lambda: self.server.call_soon(self.publisher.changes.fire)
        self.port = self.server.port
        self.address = announced_address(host, self.port)  # a wildcard bind announces the node's IP

    def start(self) -> WeightServer:
        self.server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace)
