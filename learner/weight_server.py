"""The learner's side of weight sync: a gRPC server that holds the newest weight version.

Pull, not push: each actor asks for the newest version above the one it serves. So an actor that joins
late or restarts simply pulls the latest before it serves; a receiver that dies only ends its own stream
and never stalls the others; and the learner needs no list of actor addresses while actors scale.
Receivers report the version they serve, so the learner side knows who serves what.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent import futures

import grpc
import torch

from protocol import weights_pb2, weights_pb2_grpc
from prorank.security import TokenAuthInterceptor, server_credentials
from protocol.weights_codec import CHANNEL_OPTIONS, CHUNK_BYTES, pack

log = logging.getLogger(__name__)


class WeightPublisher(weights_pb2_grpc.WeightsServicer):
    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._cond = threading.Condition()
        self._manifest: weights_pb2.Manifest | None = None
        self._buffer = bytearray()
        self.receivers: dict[str, tuple[int, str]] = {}  # receiver -> (version served, last error)

    @property
    def version(self) -> int:
        return self._manifest.version if self._manifest else 0

    def publish(self, version: int, state: Mapping[str, torch.Tensor]) -> weights_pb2.Manifest:
        """Make `state` the newest version; versions only go up."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the published {self.version}")
        manifest, buffer = pack(version, state, self.chunk_bytes)
        with self._cond:
            self._manifest, self._buffer = manifest, buffer
            self._cond.notify_all()
        return manifest

    def Fetch(self, request: weights_pb2.FetchRequest, context):
        with self._cond:
            remaining = context.time_remaining()
            ok = self._cond.wait_for(lambda: self.version > request.min_version,
                                     timeout=None if remaining is None else max(0.0, remaining))
            if not ok:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no version above {request.min_version} yet")
            manifest, buffer = self._manifest, self._buffer  # a snapshot: a newer publish swaps both
        yield weights_pb2.WeightMessage(manifest=manifest)
        view = memoryview(buffer)
        for offset in range(0, len(buffer), self.chunk_bytes):
            if not context.is_active():  # the receiver went away: stop for it alone
                return
            chunk = weights_pb2.Chunk(version=manifest.version, offset=offset,
                                      data=bytes(view[offset : offset + self.chunk_bytes]))
            yield weights_pb2.WeightMessage(chunk=chunk)

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


class WeightServer:
    """The publisher behind a token-checked (optionally TLS) gRPC server; binds 127.0.0.1 by default."""

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = 0, tls_cert: str | None = None,
                 tls_key: str | None = None, chunk_bytes: int = CHUNK_BYTES, max_workers: int = 16,
                 publisher: WeightPublisher | None = None):
        self.publisher = publisher or WeightPublisher(chunk_bytes)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=[TokenAuthInterceptor(token)], options=CHANNEL_OPTIONS)
        weights_pb2_grpc.add_WeightsServicer_to_server(self.publisher, self.server)
        target = f"{host}:{port}"
        self.port = (self.server.add_secure_port(target, server_credentials(tls_cert, tls_key)) if tls_cert
                     else self.server.add_insecure_port(target))
        self.address = f"{host}:{self.port}"

    def start(self) -> WeightServer:
        self.server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
