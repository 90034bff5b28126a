"""Mixed precision for the learner (`learner.mixed_precision`): bf16 arithmetic, float32 master weights
and optimizer state. Two forms: under ZeRO-2 without LoRA the weights themselves are bf16 and DeepSpeed's
bf16 mode keeps their float32 masters (`bf16_weights`); otherwise float32 weights with the forward's
matrix products in bf16 under torch.autocast (`forward_precision`).

On a CPU with AVX512-BF16 or AMX units a bf16 GEMM runs several times faster than a float32 one, while
AdamW's small updates stay exact in the float32 masters (bf16 weights alone would round many of them
away). Losses and log-softmaxes are computed in float32 by the callers (`.float()`).
"""

from __future__ import annotations

import contextlib

import torch

from prorank.model.models import native_bf16


def uses_bf16(mode: str, device: str) -> bool:
    """Whether `learner.mixed_precision` `mode` ("no", "bf16", "auto") computes in bf16 on `device` ("cpu"/"cuda")."""
    if mode == "auto":
        return native_bf16(device)
    return mode == "bf16"


def forward_precision(bf16: bool, device: str):
    """The context a forward pass runs in: bf16 autocast on `device` when `bf16` (see `uses_bf16`), else nothing."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def bf16_weights(cfg, device: str) -> bool:
    """Whether the learner holds bf16 weights, DeepSpeed keeping float32 masters and AdamW state (its bf16
    mode), instead of float32 weights under autocast: when `learner.mixed_precision` resolves to bf16,
    under ZeRO-2, without LoRA. Every tensor of the step is then bf16, so the step loses autocast's casts
    (bench/score_step.py: the score step 12% faster); ZeRO-3 and LoRA keep autocast."""
    return uses_bf16(cfg.mixed_precision, device) and cfg.zero_stage == 2 and cfg.lora is None


def fold_head_input(model) -> None:
    """Give the vocabulary head its input as one matrix. transformers slices the answer position out of
    the hidden states ([N, 1, H], not contiguous), and a bf16 matmul on that expands the embedding matrix
    to [N, H, V] for a batched product (0.34 s a score step); folded, it is one [N, H] x [H, V] product."""
    head = model.get_output_embeddings()
    shapes: list[torch.Size] = []

    def fold(_module, args):
        shapes.append(args[0].shape[:-1])
        return (args[0].reshape(-1, args[0].shape[-1]), *args[1:])

    def unfold(_module, _args, out):
        return out.view(*shapes.pop(), out.shape[-1])

    head.register_forward_pre_hook(fold)
    head.register_forward_hook(unfold)


def trainable_copies(model) -> dict[str, torch.Tensor]:
    """The trainable weights' float32 values, before DeepSpeed's bf16 mode rounds the module to bf16."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


def set_masters(module, values: dict[str, torch.Tensor]) -> None:
    """Make `values` the float32 masters of the engine's bf16 weights (DeepSpeed made them from the rounded
    weights; most of a float32 checkpoint's tensors are not bf16-exact)."""
    from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415 DeepSpeed: heavy, needed only by the learner ranks

    for name, p in module.named_parameters():
        if name in values:
            safe_set_full_fp32_param(p, values[name].to(p.device))


def masters(module) -> dict[str, torch.Tensor]:
    """The float32 masters of the trainable bf16 weights, by name. A collective: every rank calls it (each
    holds a partition of them)."""
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415 DeepSpeed: heavy, needed only by the learner ranks

    return {name: safe_get_full_fp32_param(p) for name, p in module.named_parameters() if p.requires_grad}
