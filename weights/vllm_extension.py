"""Runs inside vLLM's worker (named by `LLM(worker_extension_cls=...)`): swaps weights in place.

Arguments reach the worker through vLLM's RPC, which carries bytes but not tensors, so a weight set
arrives as one safetensors blob; its tensors are read as views into it (the reload copies them anyway).
`model_runner.reload_weights` (not `model.load_weights`) is used because
the CPU backend repacks linear weights for its kernels after start-up; reload repacks them again.
"""

from __future__ import annotations

from typing import Any

from prorank.model.models import safetensors_views


class WeightLoaderExtension:
    model_runner: Any  # vLLM's worker, which this class is mixed into, has it

    # Not `update_weights`: that name clashes with an attribute vLLM's worker already has.
    def prorank_load_weights(self, blob: bytes | bytearray) -> int:

        tensors = safetensors_views(blob)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)
