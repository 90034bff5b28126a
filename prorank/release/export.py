"""`prorank export`: a checkpoint -> a Hugging Face model folder that the clients our users run load unchanged.

Besides the model and tokenizer, the folder holds:
- `prorank.json`: the prompt layout and the length the model was trained at;
- `chat_template.jinja`: a template that renders a `query` and a `document` message into the released
  layout (what sentence-transformers' CrossEncoder and vLLM's score API feed the model), and any other
  conversation as plain ChatML;
- sentence-transformers' files (`modules.json`, its two configs, `1_LogitScore/`): the causal LM followed
  by the score logit("1") - logit("0"), with no activation on top;
- config and tokenizer entries transformers 4.x needs (where `mxbai-rerank` runs): `rope_theta` beside
  `rope_parameters`, and a tokenizer class it knows;
- a model card (README.md) with the layout, each client's usage and the evaluation table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prorank.model.models import ModelError, check_model_folder, checkpoint_model_dir, load_tokenizer
from prorank.model.prompt import (
    ANSWERS,
    CHAT_PREFIX,
    CHAT_SUFFIX,
    DOCUMENT_TEMPLATE,
    INSTRUCTION_TEMPLATE,
    LAYOUT,
    QUERY_TEMPLATE,
    SEP,
    TASK_PROMPT,
    answer_token_ids,
    check_layout,
    model_prompt_settings,
)
from prorank.release.fusion import FusionSettings
from prorank.release.model_card import model_card
from prorank.run import checkpoints
from prorank.settings.config import PromptConfig

# Transformers 5 names a plain fast tokenizer `TokenizersBackend`; transformers 4 knows it by this name.
TOKENIZER_CLASS_V4 = "PreTrainedTokenizerFast"


def pair_chat_template(instruction: str | None = None) -> str:
    """Jinja: a `query` and a `document` message -> the released layout, ending with the assistant's
    opening (its final newline comes from an expression: Jinja drops a template's trailing literal one);
    any other messages -> ChatML."""
    query = (INSTRUCTION_TEMPLATE.format(instruction=instruction) + SEP if instruction else "") + QUERY_TEMPLATE.format(
        query=""
    )
    document = SEP + DOCUMENT_TEMPLATE.format(document="")
    tail = SEP + TASK_PROMPT + CHAT_SUFFIX
    return (
        '{%- set query = messages | selectattr("role", "equalto", "query") | map(attribute="content") | first -%}\n'
        '{%- set document = messages | selectattr("role", "equalto", "document") | map(attribute="content") '
        "| first -%}\n"
        "{%- if query is defined and document is defined -%}\n"
        f"{{{{- {CHAT_PREFIX + query!r} + query + {document!r} + document + {tail!r} -}}}}\n"
        "{%- else -%}\n"
        "{%- for message in messages -%}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
        "{%- endif -%}"
    )


def vllm_overrides(config: dict) -> dict:
    """vLLM's `hf_overrides` that serve the causal LM as a 1-label classifier: sigmoid(logit("1") - logit("0"))."""
    arch = (config.get("architectures") or ["ForCausalLM"])[0]
    return {
        "architectures": [arch.replace("ForCausalLM", "ForSequenceClassification")],
        "classifier_from_token": list(ANSWERS),
        "method": "from_2_way_softmax",
    }


def export_model(
    checkpoint: str | Path,
    output: str | Path,
    reports: list[dict] | None = None,
    prompt: dict | None = None,
    name: str | None = None,
    fusion: FusionSettings | None = None,
) -> Path:
    """Copy the model behind `checkpoint` (a checkpoint step, checkpoints root or model folder) to
    `output`, with the files above. `prompt`: the settings it was trained with (a `PromptConfig` dump);
    default: those its run recorded in summary.json. `fusion`: how to fuse its score with the first
    stage's (prorank.json's `fusion`, which `Reranker` and `prorank eval` apply)."""
    source = Path(checkpoint_model_dir(str(checkpoint)))
    if not source.is_dir():
        raise ModelError(f"{checkpoint} is not a local checkpoint or model folder")
    _check_source(source)
    out = Path(output)
    if out.resolve() == source.resolve():
        raise ModelError(f"--output {out} is the checkpoint's own model folder")
    summary = _find_summary(source)
    # Only models of the released layout load unchanged in the clients: a run recorded before it is refused.
    prompt = check_layout(
        prompt or (summary or {}).get("prompt") or model_prompt_settings(str(source)) or PromptConfig().model_dump(),
        str(checkpoint),
    )
    config = json.loads((source / "config.json").read_text())
    overrides = vllm_overrides(config)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in ("README.md", "prorank.json"):
            shutil.copy2(item, out / item.name)
            if (out / item.name).stat().st_size != item.stat().st_size:  # a full disk can cut a copy short
                raise ModelError(f"{out / item.name}: copied short ({item.stat().st_size:,} bytes in {item})")

    _write_json(out / "config.json", _config_for_transformers4(config))
    _fix_tokenizer_config(out / "tokenizer_config.json")
    (out / "chat_template.jinja").write_text(pair_chat_template(prompt.get("instruction")))
    false_id, true_id = _answer_ids(out)
    _write_sentence_transformers_files(out, true_id, false_id)
    _write_json(
        out / "prorank.json",
        {
            "layout": LAYOUT,
            "max_length": prompt["max_length"],
            "instruction": prompt.get("instruction"),
            "answers": list(ANSWERS),
            "answer_token_ids": [false_id, true_id],
            "score": 'logit("1") - logit("0") at the last prompt position',
            "vllm_hf_overrides": overrides,
            **({"fusion": fusion.model_dump()} if fusion else {}),
        },
    )
    (out / "README.md").write_text(model_card(name or out.name, reports or [], summary, prompt, overrides, fusion))
    return out


def _check_source(model: Path) -> None:
    """A damaged checkpoint is refused before anything is written: its step's file list (sizes as
    written, prorank/run/checkpoints.py) when it is a checkpoint's model, and the weights' own headers."""

    step = model.parent
    if model.name == checkpoints.MODEL and (step / checkpoints.STATE).is_file():
        if damage := checkpoints.problems(step):
            raise ModelError(f"{step} is damaged, not exported: {'; '.join(damage[:3])}")
    check_model_folder(str(model))


def adapter_of(checkpoint: str | Path) -> Path:
    """The LoRA adapter folder of a run trained with `learner.lora` (the checkpoint's adapter/, beside the
    model/ that holds the merged model); a ModelError when there is none."""
    from prorank.model.lora import ADAPTER_CONFIG  # noqa: PLC0415 pulls torch, which importing this module does not

    source = Path(checkpoint_model_dir(str(checkpoint))).parent / checkpoints.ADAPTER
    if not (source / ADAPTER_CONFIG).is_file():
        raise ModelError(
            f"{checkpoint}: no LoRA adapter (missing {source / ADAPTER_CONFIG}); --adapter is for "
            "runs trained with learner.lora"
        )
    return source


def export_adapter(checkpoint: str | Path, output: str | Path) -> Path:
    """Copy the LoRA adapter of `checkpoint` (see `adapter_of`) to `output`: a peft folder that
    `PeftModel.from_pretrained(base, output)` or vLLM's `LoRARequest` load on the base model."""
    source = adapter_of(checkpoint)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        shutil.copy2(item, out / item.name)
    return out


def _write_json(path: Path, data: dict | list) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _config_for_transformers4(config: dict) -> dict:
    """Transformers 5 keeps the RoPE base in `rope_parameters`; transformers 4 reads `rope_theta` and, when
    it is missing, silently uses 10,000 (SmolLM2's is 100,000)."""
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config = {**config, "rope_theta": rope["rope_theta"]}
    return config


def _fix_tokenizer_config(path: Path) -> None:
    """A tokenizer class transformers 4 knows, extra special tokens where it looks for them (a list in
    transformers 5's `extra_special_tokens`, which 4 reads as a dict of named tokens and fails on), and the
    chat template in chat_template.jinja only."""
    if not path.is_file():
        return
    tok = json.loads(path.read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = TOKENIZER_CLASS_V4
    if isinstance(tok.get("extra_special_tokens"), list):
        tok["additional_special_tokens"] = tok.pop("extra_special_tokens")
    tok.pop("chat_template", None)
    _write_json(path, tok)


def _answer_ids(folder: Path) -> tuple[int, int]:

    return answer_token_ids(load_tokenizer(str(folder)))


def _write_sentence_transformers_files(out: Path, true_id: int, false_id: int) -> None:
    """A CrossEncoder of the causal LM (logits at the last token, left-padded) and LogitScore, identity
    activation: `CrossEncoder(folder).predict(pairs)` returns our scores."""
    _write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_LogitScore",
                "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore",
            },
        ],
    )
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "model_type": "CrossEncoder",
            "activation_fn": "torch.nn.modules.linear.Identity",
            "prompts": {},
            "default_prompt_name": None,
        },
    )
    _write_json(
        out / "sentence_bert_config.json",
        {
            "transformer_task": "text-generation",
            "modality_config": {
                "text": {"method": "forward", "method_output_name": "logits"},
                "message": {"method": "forward", "method_output_name": "logits", "format": "flat"},
            },
            "module_output_name": "causal_logits",
        },
    )
    (out / "1_LogitScore").mkdir(exist_ok=True)
    _write_json(
        out / "1_LogitScore" / "config.json",
        {"true_token_id": true_id, "false_token_id": false_id, "module_input_name": "causal_logits"},
    )


def _find_summary(model_dir: Path) -> dict | None:
    """summary.json of the run the model came from: model/ -> step-N/ -> checkpoints/ -> run dir."""
    for parent in list(model_dir.parents)[:3]:
        if (parent / "summary.json").is_file():
            return json.loads((parent / "summary.json").read_text())
    return None
