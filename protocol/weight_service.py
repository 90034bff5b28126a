"""The weight service: a gRPC server holding the newest weight version, for the learner and for relays.

Pull, not push: each actor asks for the newest version above the one it serves. So an actor that joins
late or restarts simply pulls the latest before it serves; a receiver that dies only ends its own stream
and never stalls the others; and the learner needs no list of actor addresses while actors scale.
Receivers report the version they serve, so the learner side knows who serves what.

The same server runs inside each actor as a relay: while an actor receives a version it serves the
chunks it already has to the next actor (a pipeline), so the learner sends one copy, not one per actor.
A version is kept as its serialized messages (`weights_codec.encode_messages`): every stream of it sends
the same bytes, with no protobuf encoding per receiver.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent import futures

import grpc
import torch

from protocol import weights_pb2
from protocol.weights_codec import CHANNEL_OPTIONS, CHUNK_BYTES, encode_messages, pack
from prorank.security import TokenAuthInterceptor, announced_address, server_credentials

log = logging.getLogger(__name__)
SERVICE = "prorank.weights.v1.Weights"


class _Version:
    """One version's serialized stream: complete at once when published, growing while relayed."""

    def __init__(self, manifest: weights_pb2.Manifest, messages: list[bytes], complete: bool):
        self.manifest, self.messages, self.complete = manifest, messages, complete
        self.error = ""  # set when a relayed transfer failed upstream


class WeightPublisher:
    """The servicer: Fetch streams the newest version (waiting for one), Report records who serves what."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._cond = threading.Condition()
        self._current: _Version | None = None
        self.receivers: dict[str, tuple[int, str]] = {}  # receiver -> (version served, last error)

    @property
    def version(self) -> int:
        return self._current.manifest.version if self._current else 0

    def publish(self, version: int, state: Mapping[str, torch.Tensor]) -> weights_pb2.Manifest:
        """Make `state` the newest version; versions only go up."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the published {self.version}")
        manifest, buffer = pack(version, state, self.chunk_bytes)
        self._swap(_Version(manifest, encode_messages(manifest, buffer), complete=True))
        return manifest

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
        with self._cond:
            remaining = context.time_remaining()
            ok = self._cond.wait_for(lambda: self.version > request.min_version,
                                     timeout=None if remaining is None else max(0.0, remaining))
            if not ok:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no version above {request.min_version} yet")
            current = self._current  # a snapshot: a newer version swaps in a new object
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

    def Report(self, request: weights_pb2.Ack, context) -> weights_pb2.ReportReply:
        self.receivers[request.receiver or context.peer()] = (request.version, request.error)
        if not request.applied:
            log.warning("receiver %s refused a version: %s", request.receiver, request.error)
        return weights_pb2.ReportReply()

    def wait_for(self, receivers: set[str], version: int, timeout: float) -> bool:
        """True once each named receiver reports serving `version` (or newer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.receivers.get(r, (0, ""))[0] >= version for r in receivers):
                return True
            time.sleep(0.01)
        return False


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
                 publisher: WeightPublisher | None = None):
        self.publisher = publisher or WeightPublisher(chunk_bytes)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=[TokenAuthInterceptor(token)], options=CHANNEL_OPTIONS)
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
