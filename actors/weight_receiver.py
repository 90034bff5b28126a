"""The actors' side of weight sync: pull the newest version from the learner's weight server.

Chunks are written straight into a preallocated safetensors blob (header first, then the data section
in the manifest's layout), checked for order and completeness, and every tensor's checksum is verified
before anything is applied. Any failure raises WeightError and leaves the engine on its last version.
"""

from __future__ import annotations

import grpc

from protocol import weights_pb2, weights_pb2_grpc
from prorank.security import auth_metadata, channel_credentials
from protocol.weights_codec import CHANNEL_OPTIONS, Spec, WeightError, check_manifest, safetensors_header, verify


def _channel(address: str, tls_ca: str | None, tls: bool) -> grpc.Channel:
    options = CHANNEL_OPTIONS
    if tls or tls_ca:
        return grpc.secure_channel(address, channel_credentials(tls_ca), options=options)
    return grpc.insecure_channel(address, options=options)


def fetch_version(address: str, token: str, min_version: int, receiver: str, expected: dict[str, Spec] | None = None,
                  tls_ca: str | None = None, tls: bool = False, timeout: float = 300.0):
    """(manifest, safetensors blob) of the newest version above `min_version`, or None if the server
    has none before `timeout`. Raises WeightError for a refused call or a bad transfer."""
    with _channel(address, tls_ca, tls) as channel:
        stream = weights_pb2_grpc.WeightsStub(channel).Fetch(
            weights_pb2.FetchRequest(min_version=min_version, receiver=receiver),
            timeout=timeout, metadata=auth_metadata(token))
        try:
            return _receive(stream, min_version, expected)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no version above" in (err.details() or ""):
                return None
            raise WeightError(f"weight server {address}: {err.code().name}: {err.details()}") from None


def _receive(stream, min_version: int, expected: dict[str, Spec] | None):
    first = next(stream, None)
    if first is None or first.WhichOneof("kind") != "manifest":
        raise WeightError("the stream did not start with a manifest")
    manifest = first.manifest
    if manifest.version <= min_version:  # never go back, whatever a server sends
        raise WeightError(f"stale version {manifest.version}: already serving {min_version}")
    check_manifest(manifest, expected)
    header = safetensors_header(manifest)
    blob = bytearray(len(header) + manifest.total_bytes)
    blob[: len(header)] = header
    data = memoryview(blob)[len(header) :]
    received = 0
    for message in stream:
        chunk = message.chunk
        if message.WhichOneof("kind") != "chunk" or chunk.version != manifest.version:
            raise WeightError(f"version {manifest.version}: unexpected message in the stream")
        end = chunk.offset + len(chunk.data)
        if chunk.offset != received or end > manifest.total_bytes:
            raise WeightError(f"version {manifest.version}: chunk at {chunk.offset} (+{len(chunk.data)}) does not "
                              f"follow byte {received} of {manifest.total_bytes}")
        data[chunk.offset : end] = chunk.data
        received = end
    if received != manifest.total_bytes:
        raise WeightError(f"version {manifest.version}: partial transfer, {received} of {manifest.total_bytes} bytes")
    verify(manifest, data)
    return manifest, blob


def report(address: str, token: str, ack: weights_pb2.Ack, tls_ca: str | None = None, tls: bool = False) -> None:
    with _channel(address, tls_ca, tls) as channel:
        weights_pb2_grpc.WeightsStub(channel).Report(ack, timeout=10, metadata=auth_metadata(token))
