"""LoRA adapters (peft) as the job uses them, in one place for the learner that trains them, the actors
that serve them and the checkpoints that keep them.

With `learner.lora` the base model stays frozen for the whole job, in both stages: the learner trains the
adapter only (the score stage goes on with the warmup's adapter), a weight version is the adapter alone
(peft's tensor names, as in `adapter_model.safetensors`), and each vLLM actor serves the base with the
newest version as its LoRA. A checkpoint keeps the adapter as a peft folder beside the merged model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from huggingface_hub import snapshot_download

from prorank.settings.config import LoraSettings

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# The ranks vLLM's LoRA kernels are built for (vllm.config.lora.MaxLoRARanks): the engine takes the
# smallest one that holds the adapter.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def peft_config(lora: LoraSettings, base_model: str | None = None):
    """peft's LoraConfig of these settings, for a causal LM."""
    from peft import LoraConfig  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def add_adapter(model, lora: LoraSettings, adapter_dir: str | None = None):
    """`model` wrapped by peft with a trainable adapter: a fresh one (B = 0, so the model is unchanged), or
    the one saved in `adapter_dir` (the warmup's, for the score stage), which must have these settings."""
    from peft import PeftModel, get_peft_model  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora

    if adapter_dir is None:
        return get_peft_model(model, peft_config(lora))
    check_adapter_dir(adapter_dir, lora)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def check_adapter_dir(folder: str | Path, lora: LoraSettings) -> None:
    """An error naming the file and the setting when the adapter saved in `folder` is not `lora`'s."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no LoRA adapter here (missing {ADAPTER_CONFIG})")
    saved = json.loads(path.read_text())
    for key, ours in (("r", lora.r), ("lora_alpha", lora.alpha)):
        if saved.get(key) != ours:
            raise ValueError(f"{path}: {key} is {saved.get(key)}, learner.lora says {ours}")


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (no adapter name): a weight version's content."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora

    return get_peft_model_state_dict(model)


def merged_state(model) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter's update added to its base weight (W + s B A),
    under the base model's own names, without changing `model` (peft's merge would, and unmerging after
    leaves rounding in the weights being trained)."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora

    base = model.get_base_model()
    deltas = {
        name: module.get_delta_weight(module.active_adapters[0]).detach()
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }
    state = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        name = key.replace(".base_layer.", ".")
        owner = name.rsplit(".", 1)[0]
        if owner in deltas and key.endswith(".base_layer.weight"):
            tensor = tensor.detach() + deltas[owner].to(tensor.dtype)
        state[name] = tensor.detach()
    return state


def write_adapter(
    folder: str | Path,
    lora: LoraSettings,
    base_model: str | None,
    state: Mapping[str, torch.Tensor] | None = None,
    blob: bytes | bytearray | None = None,
) -> Path:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) that peft and vLLM load: from
    named tensors, or from a safetensors `blob` as a weight version arrives."""

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if blob is not None:
        (out / ADAPTER_WEIGHTS).write_bytes(blob)
    elif state is None:
        raise ValueError("write_adapter: give the adapter's tensors (state) or its safetensors blob")
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        safetensors.torch.save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config(lora, base_model).save_pretrained(str(out))
    return out


def adapter_specs_model(model_path: str, lora: LoraSettings, dtype: str):
    """The adapter's named tensors as peft makes them on `model_path`, built on the meta device (no memory):
    what a weight version must hold."""
    from peft import get_peft_model  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        return adapter_state(get_peft_model(skeleton, peft_config(lora)))


def merge_into(
    base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], lora: LoraSettings
) -> dict[str, torch.Tensor]:
    """{weight name: W + (alpha / r) B A} for every module the adapter (peft's names, as a version carries
    them) adapts, from the base weights `base` (the model folder's names); the others are not returned."""
    scale = lora.alpha / lora.r
    merged = {}
    for name, a in adapter.items():
        if ".lora_A." not in name:
            if ".lora_B." not in name:
                raise ValueError(f"adapter tensor {name}: only LoRA A/B matrices of linear layers can be merged")
            continue
        module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        weight = base[f"{module}.weight"]
        b = adapter[name.replace(".lora_A.", ".lora_B.")]
        merged[f"{module}.weight"] = weight + (scale * (b.float() @ a.float())).to(weight.dtype)
    return merged


def base_weights(model: str, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors of a model's safetensors files (a local folder, or a hub id's cached snapshot), floating
    ones in `dtype`: what an actor merges each adapter version into."""

    folder = Path(model)
    if not folder.is_dir():
        folder = Path(snapshot_download(model, allow_patterns=["*.safetensors"]))
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"{model}: no safetensors weights to merge LoRA versions into")
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def vllm_rank(r: int) -> int:
    """vLLM's `max_lora_rank` for an adapter of rank `r`."""
    return next(rank for rank in VLLM_RANKS if rank >= r)
