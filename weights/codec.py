"""Weight versions on the wire: named tensors as chunk messages, described by a manifest.

The layout is safetensors' data section (tensors back to back, in manifest order), so a receiver that
knows the manifest writes the incoming chunks straight into a safetensors blob and verifies each
tensor's checksum in place: no reassembly copy, no per-tensor allocation.

`pack` reads each tensor's memory where it lies (no gathered copy of the state dict) and copies it once,
into its serialized chunk messages. A tensor whose bytes equal the previous version's (a frozen layer,
frozen embeddings) keeps that version's messages and `changed_at`: a receiver that already holds an
earlier version is sent only what changed since (`stream_messages`), and keeps the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import xxhash
from google.protobuf.internal.decoder import _DecodeVarint
from google.protobuf.internal.encoder import _VarintBytes
from google.protobuf.message import DecodeError

from prorank.protocol import weights_pb2

DTYPES = {torch.float32: weights_pb2.FLOAT32, torch.bfloat16: weights_pb2.BFLOAT16, torch.float16: weights_pb2.FLOAT16}
SAFETENSORS_DTYPE = {weights_pb2.FLOAT32: "F32", weights_pb2.BFLOAT16: "BF16", weights_pb2.FLOAT16: "F16"}
Spec = tuple[int, tuple[int, ...]]  # (proto dtype, shape)


# Measured on loopback (BENCHMARKS.md): 1 MiB messages with 16 MiB HTTP/2 frames were the fastest
# Python gRPC settings; larger messages were slower.
CHUNK_BYTES = 2**20
CHANNEL_OPTIONS = [
    ("grpc.http2.max_frame_size", 2**24 - 1),
    ("grpc.http2.bdp_probe", 1),
    ("grpc.http2.lookahead_bytes", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.max_receive_message_length", 64 * 2**20),
    # A peer cut off the network mid-transfer sends no RST: without pings a stream would
    # wait out its whole deadline. Both ends ping every 5 s and drop the link after 5 s
    # unanswered (the server accepts pings that often).
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


class WeightError(ValueError):
    """A weight version that must not be applied; the message says which tensor or chunk and why."""


class TransferError(WeightError):
    """The transfer itself broke (connection lost, stream cut short): asking again may succeed."""


def checksum(data) -> str:
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)


@dataclass
class Packed:
    """One version ready to stream: the manifest of every tensor, and each tensor's chunk messages."""

    manifest: weights_pb2.Manifest  # base_version 0: every tensor
    chunks: dict[str, list[bytes]]

    def changed(self) -> list[weights_pb2.TensorSpec]:
        """The tensors this version changed (all of them in a first version)."""
        return [s for s in self.manifest.tensors if s.changed_at == self.manifest.version]


def wire_tensor(t: torch.Tensor, wire_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor as it goes on the wire: on the CPU, contiguous, cast to `wire_dtype` if it is floating."""
    t = t.detach().to("cpu")
    if wire_dtype is not None and t.is_floating_point() and t.dtype != wire_dtype:
        t = t.to(wire_dtype)
    return t.contiguous()


def pack(
    version: int,
    state: Mapping[str, torch.Tensor],
    chunk_bytes: int,
    previous: Packed | None = None,
    wire_dtype: torch.dtype | None = None,
) -> Packed:
    """Every tensor's spec and chunk messages. Unchanged tensors (same name, layout and checksum as in
    `previous`) reuse its messages; the others are copied once, from their own memory, into new ones."""
    old = {s.name: s for s in previous.manifest.tensors} if previous else {}
    specs, chunks, offset = [], {}, 0
    for name, t in state.items():
        if t.dtype not in DTYPES:
            raise WeightError(f"tensor {name}: dtype {t.dtype} cannot be sent")
        t = wire_tensor(t, wire_dtype)
        n = t.numel() * t.element_size()
        raw = t.reshape(-1).view(torch.uint8).numpy() if n else b""
        spec = weights_pb2.TensorSpec(
            name=name,
            dtype=DTYPES[t.dtype],
            shape=list(t.shape),
            offset=offset,
            nbytes=n,
            checksum=checksum(raw),
            changed_at=version,
        )
        before = old.get(name)
        if (
            previous is not None
            and before is not None
            and (before.dtype, before.shape, before.offset, before.nbytes, before.checksum)
            == (
                spec.dtype,
                spec.shape,
                spec.offset,
                spec.nbytes,
                spec.checksum,
            )
        ):
            spec.changed_at = before.changed_at
            chunks[name] = previous.chunks[name]
        else:
            view = memoryview(raw)
            chunks[name] = [
                _chunk_message(version, offset + i, view[i : i + chunk_bytes]) for i in range(0, n, chunk_bytes)
            ]
        specs.append(spec)
        offset += n
    manifest = weights_pb2.Manifest(version=version, tensors=specs, total_bytes=offset, chunk_bytes=chunk_bytes)
    return Packed(manifest, chunks)


def stream_messages(packed: Packed, base_version: int = 0) -> list[bytes]:
    """The serialized WeightMessages for a receiver that holds `base_version` (0: nothing): the manifest,
    then the chunks of the tensors changed after it. The chunks are the same bytes objects for every
    receiver (no protobuf encoding or copy per stream)."""
    version = packed.manifest.version
    base = base_version if 0 < base_version < version else 0
    if all(s.changed_at > base for s in packed.manifest.tensors):
        base = 0  # everything goes: the receiver's blob is not needed (a first version, another layout)
    manifest = weights_pb2.Manifest()
    manifest.CopyFrom(packed.manifest)
    manifest.base_version = base
    messages = [weights_pb2.WeightMessage(manifest=manifest).SerializeToString()]
    for spec in packed.manifest.tensors:
        if spec.changed_at > base:
            messages += packed.chunks[spec.name]
    return messages


def sent_bytes(manifest: weights_pb2.Manifest) -> int:
    """Bytes of the chunks that follow this manifest (the tensors changed after its base version)."""
    return sum(s.nbytes for s in manifest.tensors if s.changed_at > manifest.base_version)


def _chunk_message(version: int, offset: int, payload) -> bytes:
    """A serialized WeightMessage{chunk: Chunk{version, offset, data}}, built around the payload with one
    copy (protobuf's encoder would copy a 1 MiB payload twice more)."""
    head = b"".join(
        (b"\x08", _VarintBytes(version), b"\x10", _VarintBytes(offset), b"\x1a", _VarintBytes(len(payload)))
    )
    return b"".join((bytes([_CHUNK_FIELD]), _VarintBytes(len(head) + len(payload)), head, payload))


_CHUNK_FIELD = (2 << 3) | 2  # WeightMessage.chunk, length-delimited


def decode_chunk(raw: bytes) -> tuple[int, int, memoryview]:
    """(version, offset, data) of a serialized WeightMessage holding a Chunk, with `data` a view into
    `raw`: protobuf's own parser would copy each 1 MiB payload twice more (measured: 0.85 -> 1.04 GB/s).
    Anything else (a manifest, unknown fields) goes through protobuf; the wire format is the .proto's."""
    view = memoryview(raw)
    try:
        if view[0] == _CHUNK_FIELD:
            size, pos = _DecodeVarint(view, 1)
            if pos + size == len(view):
                version = offset = 0
                data = None
                while pos < len(view):
                    tag, pos = _DecodeVarint(view, pos)
                    value, pos = _DecodeVarint(view, pos)
                    if tag == (1 << 3):
                        version = value
                    elif tag == (2 << 3):
                        offset = value
                    elif tag == (3 << 3) | 2 and pos + value <= len(view):
                        data, pos = view[pos : pos + value], pos + value
                    else:
                        break
                else:
                    return version, offset, data if data is not None else view[:0]
    except IndexError:
        pass
    try:
        message = weights_pb2.WeightMessage.FromString(raw)
    except DecodeError as err:
        raise WeightError(f"a message that is not a WeightMessage: {err}") from None
    if message.WhichOneof("kind") != "chunk":
        raise WeightError(f"expected a chunk, got a {message.WhichOneof('kind')}")
    return message.chunk.version, message.chunk.offset, memoryview(message.chunk.data)


def expected_specs(state: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    return {name: (DTYPES.get(t.dtype, 0), tuple(t.shape)) for name, t in state.items()}


def check_manifest(manifest: weights_pb2.Manifest, expected: Mapping[str, Spec] | None) -> None:
    """Layout sanity, and names, dtypes and shapes against what the receiver's model has."""
    offset = 0
    for spec in manifest.tensors:
        itemsize = {weights_pb2.FLOAT32: 4}.get(spec.dtype, 2)
        if spec.dtype not in SAFETENSORS_DTYPE:
            raise WeightError(f"version {manifest.version}: tensor {spec.name}: unknown dtype {spec.dtype}")
        numel = 1
        for d in spec.shape:
            numel *= d
        if spec.offset != offset or spec.nbytes != numel * itemsize:
            raise WeightError(
                f"version {manifest.version}: tensor {spec.name}: bytes at {spec.offset}+{spec.nbytes} "
                f"do not fit its shape {list(spec.shape)} or the layout"
            )
        offset += spec.nbytes
    if offset != manifest.total_bytes:
        raise WeightError(
            f"version {manifest.version}: tensors add up to {offset} bytes, manifest says {manifest.total_bytes}"
        )
    if expected is None:
        return
    names = {s.name for s in manifest.tensors}
    unknown, missing = sorted(names - set(expected)), sorted(set(expected) - names)
    if unknown or missing:
        raise WeightError(f"version {manifest.version}: unknown tensors {unknown[:5]}, missing {missing[:5]}")
    for spec in manifest.tensors:
        dtype, shape = expected[spec.name]
        cast = spec.dtype == weights_pb2.BFLOAT16 and dtype in (weights_pb2.FLOAT32, weights_pb2.FLOAT16)
        if (spec.dtype, tuple(spec.shape)) != (dtype, shape) and not (cast and tuple(spec.shape) == shape):
            raise WeightError(
                f"version {manifest.version}: tensor {spec.name}: got "
                f"{weights_pb2.DType.Name(spec.dtype)}{list(spec.shape)}, expected "
                f"{weights_pb2.DType.Name(dtype)}{list(shape)}"
            )


def safetensors_header(manifest: weights_pb2.Manifest) -> bytes:
    """The 8-byte length and JSON header of a safetensors blob whose data section is the buffer."""
    header = {
        s.name: {
            "dtype": SAFETENSORS_DTYPE[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [s.offset, s.offset + s.nbytes],
        }
        for s in manifest.tensors
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def verify(manifest: weights_pb2.Manifest, data: memoryview) -> None:
    """Every tensor's checksum over `data` (the buffer, however it was received)."""
    for spec in manifest.tensors:
        got = checksum(data[spec.offset : spec.offset + spec.nbytes])
        if got != spec.checksum:
            raise WeightError(f"version {manifest.version}: tensor {spec.name}: checksum {got} != {spec.checksum}")
