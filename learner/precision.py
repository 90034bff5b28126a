"""Mixed precision for the learner's forward: float32 weights, gradients and optimizer state, the matrix
products in bfloat16 under torch.autocast (`learner.mixed_precision`).

On a CPU with AVX512-BF16 or AMX units a bf16 GEMM runs several times faster than a float32 one, while
AdamW's small updates stay exact in the float32 master weights (pure bf16 weights would round many of
them away). Losses and log-softmaxes are computed in float32 by the callers (`.float()`).
"""

from __future__ import annotations

import contextlib

import torch

from prorank.models import native_bf16


def uses_bf16(mode: str, device: str) -> bool:
    """Whether `learner.mixed_precision` `mode` ("no", "bf16", "auto") computes in bf16 on `device` ("cpu"/"cuda")."""
    if mode == "auto":
        return native_bf16(device)
    return mode == "bf16"


def forward_precision(bf16: bool, device: str):
    """The context a forward pass runs in: bf16 autocast on `device` when `bf16` (see `uses_bf16`), else nothing."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
