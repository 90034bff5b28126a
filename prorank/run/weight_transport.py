"""What the learner and the rollout actors need of a weight transport; weights/ implements it over gRPC.

The driver chooses the transport and hands each end its object, so neither role imports it: the learner
gets a WeightSender (its rank 0 serves versions), the actor pool a factory that makes each actor's
WeightReceiver from the actor's name. A new transport (NCCL broadcast on a GPU cluster, a shared file
system) is a new module in weights/ with these two classes, and the one line in driver/job.py that picks it.

Versions: the sender publishes the version the driver asks for (the job's global step) and refuses one that
is not newer; a receiver applies what it is sent and is the one place an actor's served version is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from prorank.settings.config import LoraSettings

# Applies a complete version inside the inference engine: (version, safetensors blob) -> None.
Apply = Callable[[int, bytearray], None]


class WeightSender(Protocol):
    """The learner's end, on its rank 0."""

    def start(self) -> str:
        """Start serving; returns the address receivers pull from."""

    def publish(
        self, version: int, state: Mapping[str, torch.Tensor], receivers: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Make `state` (read where it lies) the newest version. `receivers`: the names allowed to report.
        Returns {"seconds", "bytes", "changed_bytes", "changed_tensors", "tensors"}."""

    def stop(self) -> None: ...


class WeightReceiver(Protocol):
    """An actor's end, made in the driver (picklable until first used) and used inside the actor."""

    version: int  # the version the actor serves: the last one applied
    lora: LoraSettings | None  # set when a version is a LoRA adapter for the base model (prorank/model/lora.py)
    relays: bool  # whether actors hand each version on to the next one (a pipeline)
    vllm_extension: str  # the class vLLM's workers load (LLM(worker_extension_cls=...)) to apply a version

    def bind(self, model: str, dtype: str) -> None:
        """The model whose weights arrive (their names, dtypes and shapes are checked on arrival)."""

    def relay_address(self) -> str:
        """Start this actor's relay (if not yet) and return where the next actor pulls from."""

    def sync(self, address: str, apply: Apply, upstream: str | None = None, wait_seconds: float | None = None) -> dict:
        """Pull the newest version above `version` (from `upstream`, else the sender at `address`), verify it
        and `apply` it. Returns {"version", "applied", "error", "source", "bytes", "seconds"}; a bad transfer
        is refused (applied False, error set) and the served version stays."""


ReceiverFactory = Callable[[str], WeightReceiver]  # actor name -> its receiver
