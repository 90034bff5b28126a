"""Weight versions on the wire: named tensors packed into one byte buffer, described by a manifest.

The buffer's layout is safetensors' data section (tensors back to back, in manifest order), so a receiver
that knows the manifest writes the incoming chunks straight into a safetensors blob and verifies each
tensor's checksum in place: no reassembly copy, no per-tensor allocation.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping

import torch
import xxhash
from google.protobuf.internal.decoder import _DecodeVarint
from google.protobuf.message import DecodeError

from protocol import weights_pb2

DTYPES = {torch.float32: weights_pb2.FLOAT32, torch.bfloat16: weights_pb2.BFLOAT16,
          torch.float16: weights_pb2.FLOAT16}
SAFETENSORS_DTYPE = {weights_pb2.FLOAT32: "F32", weights_pb2.BFLOAT16: "BF16", weights_pb2.FLOAT16: "F16"}
Spec = tuple[int, tuple[int, ...]]  # (proto dtype, shape)


# Measured on loopback (BENCHMARKS.md): 1 MiB messages with 16 MiB HTTP/2 frames were the fastest
# Python gRPC settings; larger messages were slower.
CHUNK_BYTES = 2**20
CHANNEL_OPTIONS = [("grpc.http2.max_frame_size", 2**24 - 1), ("grpc.http2.bdp_probe", 1),
                   ("grpc.http2.lookahead_bytes", 64 * 2**20),
                   ("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20),
                   # A peer cut off the network mid-transfer sends no RST: without pings a stream would
                   # wait out its whole deadline. Both ends ping every 5 s and drop the link after 5 s
                   # unanswered (the server accepts pings that often).
                   ("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 5000),
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000), ("grpc.http2.max_ping_strikes", 0)]


class WeightError(ValueError):
    """A weight version that must not be applied; the message says which tensor or chunk and why."""


class TransferError(WeightError):
    """The transfer itself broke (connection lost, stream cut short): asking again may succeed."""


def checksum(data) -> str:
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)


def pack(version: int, state: Mapping[str, torch.Tensor], chunk_bytes: int) -> tuple[weights_pb2.Manifest, bytearray]:
    """One contiguous buffer of all tensors and the manifest that describes it."""
    tensors = {}
    for name, t in state.items():
        if t.dtype not in DTYPES:
            raise WeightError(f"tensor {name}: dtype {t.dtype} cannot be sent")
        tensors[name] = t.detach().to("cpu").contiguous()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    buffer = bytearray(total)
    view = memoryview(buffer)
    specs, offset = [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        raw = t.view(torch.uint8).reshape(-1).numpy() if n else b""
        view[offset : offset + n] = raw
        specs.append(weights_pb2.TensorSpec(name=name, dtype=DTYPES[t.dtype], shape=list(t.shape),
                                            offset=offset, nbytes=n, checksum=checksum(view[offset : offset + n])))
        offset += n
    return weights_pb2.Manifest(version=version, tensors=specs, total_bytes=total, chunk_bytes=chunk_bytes), buffer


def encode_messages(manifest: weights_pb2.Manifest, buffer: bytearray) -> list[bytes]:
    """A version as the serialized WeightMessages of its stream: the manifest, then its chunks.

    Serialized once per version, so every receiver (and every relay hop) is sent the same bytes
    without another protobuf encode or slice copy.
    """
    view, step = memoryview(buffer), manifest.chunk_bytes
    messages = [weights_pb2.WeightMessage(manifest=manifest).SerializeToString()]
    for offset in range(0, manifest.total_bytes, step):
        chunk = weights_pb2.Chunk(version=manifest.version, offset=offset, data=bytes(view[offset : offset + step]))
        messages.append(weights_pb2.WeightMessage(chunk=chunk).SerializeToString())
    return messages


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
            raise WeightError(f"version {manifest.version}: tensor {spec.name}: bytes at {spec.offset}+{spec.nbytes} "
                              f"do not fit its shape {list(spec.shape)} or the layout")
        offset += spec.nbytes
    if offset != manifest.total_bytes:
        raise WeightError(f"version {manifest.version}: tensors add up to {offset} bytes, manifest says "
                          f"{manifest.total_bytes}")
    if expected is None:
        return
    names = {s.name for s in manifest.tensors}
    unknown, missing = sorted(names - set(expected)), sorted(set(expected) - names)
    if unknown or missing:
        raise WeightError(f"version {manifest.version}: unknown tensors {unknown[:5]}, missing {missing[:5]}")
    for spec in manifest.tensors:
        dtype, shape = expected[spec.name]
        if (spec.dtype, tuple(spec.shape)) != (dtype, shape):
            raise WeightError(f"version {manifest.version}: tensor {spec.name}: got "
                              f"{weights_pb2.DType.Name(spec.dtype)}{list(spec.shape)}, expected "
                              f"{weights_pb2.DType.Name(dtype)}{list(shape)}")


def safetensors_header(manifest: weights_pb2.Manifest) -> bytes:
    """The 8-byte length and JSON header of a safetensors blob whose data section is the buffer."""
    header = {s.name: {"dtype": SAFETENSORS_DTYPE[s.dtype], "shape": list(s.shape),
                       "data_offsets": [s.offset, s.offset + s.nbytes]} for s in manifest.tensors}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


_TORCH_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def safetensors_views(blob) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob as views into it (no copy), for a loader that copies them
    into the model anyway; `safetensors.torch.load` would first copy the whole blob."""
    view = memoryview(blob)
    size = int.from_bytes(view[:8], "little")
    header = json.loads(bytes(view[8 : 8 + size]))
    base = 8 + size
    out = {}
    with warnings.catch_warnings():  # read-only bytes are fine: the views are only read
        warnings.simplefilter("ignore", UserWarning)
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = _TORCH_DTYPE[spec["dtype"]]
            start, end = spec["data_offsets"]
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            flat = (torch.frombuffer(view, dtype=dtype, count=count, offset=base + start) if count
                    else torch.empty(0, dtype=dtype))
            out[name] = flat.reshape(spec["shape"])
    return out


def verify(manifest: weights_pb2.Manifest, data: memoryview) -> None:
    """Every tensor's checksum over `data` (the buffer, however it was received)."""
    for spec in manifest.tensors:
        got = checksum(data[spec.offset : spec.offset + spec.nbytes])
        if got != spec.checksum:
            raise WeightError(f"version {manifest.version}: tensor {spec.name}: checksum {got} != {spec.checksum}")
