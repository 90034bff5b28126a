"""The gRPC weight transport: the two ends the learner and the actors are handed (prorank/run/weight_transport.py).

Sender: rank 0's WeightServer (weights/server.py), packing each version from the parameters in place.
Receiver: pulls with weights/receiver.py into a reused safetensors blob, verifies it, has the engine apply
it (weights/vllm_extension.py inside vLLM's worker), reports to the sender, and, with `weights.relay`,
serves each version onwards to the next actor from a WeightServer of its own while it still arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import torch

from prorank.guard.guarded_server import ServerLimits
from prorank.model.lora import adapter_specs_model
from prorank.protocol import weights_pb2
from prorank.run.weight_transport import Apply
from prorank.settings.config import LoraSettings, WeightSyncConfig
from prorank.weights import codec
from prorank.weights.codec import WeightError, sent_bytes
from prorank.weights.receiver import pull_newest, report
from prorank.weights.server import WeightServer

log = logging.getLogger(__name__)


class GrpcTransport:
    """The job's choice of transport: its token and settings, and the two ends made from them. `lora`: the
    learner's LoRA settings when a version is an adapter (prorank/model/lora.py), else None (the full weights)."""

    def __init__(self, token: str, cfg: WeightSyncConfig, lora: LoraSettings | None = None):
        self.token, self.cfg, self.lora = token, cfg, lora

    def sender(self) -> GrpcWeightSender:
        return GrpcWeightSender(self.token, self.cfg)

    def receiver(self, name: str) -> GrpcWeightReceiver:
        return GrpcWeightReceiver(self.token, self.cfg, name, self.lora)


class GrpcWeightSender:
    def __init__(self, token: str, cfg: WeightSyncConfig):
        self.token, self.cfg = token, cfg
        self.server: WeightServer | None = None

    def start(self) -> str:
        cfg = self.cfg
        wire = torch.bfloat16 if cfg.wire_dtype == "bfloat16" else None
        server = self.server = WeightServer(
            self.token,
            cfg.host,
            cfg.port,
            cfg.tls_cert,
            cfg.tls_key,
            chunk_bytes=int(cfg.chunk_mb * 2**20),
            limits=ServerLimits.of(cfg),
            wire_dtype=wire,
        ).start()
        return server.address  # the node's IP for a wildcard bind

    def publish(
        self, version: int, state: Mapping[str, torch.Tensor], receivers: Sequence[str] | None = None
    ) -> dict[str, float]:
        start = time.perf_counter()
        if self.server is None:
            raise RuntimeError("publish before start: the learner's weight server is not up")
        packed = self.server.publisher.publish(version, state, receivers)
        changed = packed.changed()
        return {
            "seconds": time.perf_counter() - start,
            "bytes": float(packed.manifest.total_bytes),
            "changed_bytes": float(sum(s.nbytes for s in changed)),
            "changed_tensors": float(len(changed)),
            "tensors": float(len(packed.manifest.tensors)),
        }

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class GrpcWeightReceiver:
    vllm_extension = "prorank.weights.vllm_extension.WeightLoaderExtension"

    def __init__(self, token: str, cfg: WeightSyncConfig, name: str = "receiver", lora: LoraSettings | None = None):
        self.token, self.cfg, self.name, self.lora = token, cfg, name, lora
        self.relays = cfg.relay
        self.version = 0
        self.model, self.dtype = "", ""
        self._expected = None  # names, dtypes and shapes a version must have; read on first sync
        self._relay: WeightServer | None = None  # this actor's WeightServer for the next actor
        self._buffer = bytearray()  # the last version's blob: the next one is received into it (no new 0.5 GB)
        self._held = 0  # the version whose complete blob `_buffer` holds (0: none): only changes are sent

    def bind(self, model: str, dtype: str) -> None:
        self.model, self.dtype = model, dtype

    def relay_address(self) -> str:
        if self._relay is None:
            cfg = self.cfg
            self._relay = WeightServer(
                self.token, host=cfg.relay_host, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, limits=ServerLimits.of(cfg)
            ).start()
        return self._relay.address  # the node's IP for a wildcard bind

    def sync(self, address: str, apply: Apply, upstream: str | None = None, wait_seconds: float | None = None) -> dict:

        cfg = self.cfg
        wait = cfg.wait_seconds if wait_seconds is None else wait_seconds
        if self._expected is None:
            self._expected = expected_specs(self.model, self.dtype, self.lora)
        publisher = None
        if self.relays:  # each chunk is handed on, as received, to this actor's relay
            self.relay_address()
            publisher = self._relay.publisher if self._relay else None
        source, received = "", 0
        start = time.perf_counter()

        def tell(applied: bool, error: str = "") -> dict:
            try:  # the sender's table is informative: failing to update it must not fail the actor
                report(
                    address,
                    self.token,
                    weights_pb2.Ack(version=self.version, applied=applied, error=error, receiver=self.name),
                    cfg.tls_ca,
                )
            except Exception as err:  # noqa: BLE001 - grpc raises several types
                log.warning("%s: could not report version %d to %s: %s", self.name, self.version, address, err)
            return {
                "version": self.version,
                "applied": applied,
                "error": error,
                "source": source,
                "bytes": received,
                "seconds": time.perf_counter() - start,
            }

        sources = [(upstream, cfg.relay_wait_seconds if self.relays else wait)] if upstream else []
        try:
            got, source = pull_newest(
                sources + [(address, wait)],
                self.token,
                self.version,
                self.name,
                self._expected,
                cfg.tls_ca,
                publisher,
                self._buffer,
                base_version=self._held,
            )
        except WeightError as err:
            self._held, source = 0, address  # the blob may be half written
            return tell(False, str(err))
        if got is None:
            return {"version": self.version, "applied": False, "error": "", "source": "", "bytes": 0, "seconds": 0.0}
        manifest, self._buffer = got
        self._held, received = manifest.version, sent_bytes(manifest)
        try:
            apply(manifest.version, self._buffer)
        except Exception as err:  # noqa: BLE001 - the engine's own errors: reported, the actor lives on
            log.error("%s: the engine could not apply version %d: %s", self.name, manifest.version, err)
            return tell(
                False, f"version {manifest.version}: the engine could not apply it: {type(err).__name__}: {err}"
            )
        self.version = manifest.version
        return tell(True)


def expected_specs(model: str, dtype: str, lora: LoraSettings | None = None):
    """The named tensors a version holds, built on the meta device: the model's state dict (tied ones
    included), or with `lora` the adapter's."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    if lora is not None:
        return codec.expected_specs(adapter_specs_model(model, lora, dtype))
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return codec.expected_specs(skeleton.state_dict())
