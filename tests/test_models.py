import json

import pytest
import torch

from prorank.config import ModelConfig
from prorank.models import ModelError, checkpoint_model_dir, find_smollm2_gguf, load_causal_lm, resolve_model
from prorank.prompt import PromptBuilder, answer_token_ids, relevance_score
from prorank.scoring import answer_logits


def test_tiny_model_shape(tiny_model_dir, tiny_model):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM CPU head sizes
    assert (tiny_model_dir / "model.safetensors").is_file()
    model, tok = tiny_model
    assert tok.chat_template and tok.pad_token_id is not None
    answer_token_ids(tok)


def test_resolve_model_prefers_local_folder(tmp_path):
    with pytest.raises(ModelError, match="not a model folder \\(no config.json\\)"):
        resolve_model(ModelConfig(path=str(tmp_path), hub_id="org/m"))  # a folder, but not a model's
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: not a model config"):
        resolve_model(ModelConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="no weights"):
        resolve_model(ModelConfig(path=str(tmp_path)))
    (tmp_path / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # a header of no tensors
    assert resolve_model(ModelConfig(path=str(tmp_path), hub_id="org/m")) == str(tmp_path)
    assert resolve_model(ModelConfig(path=str(tmp_path / "no"), hub_id="org/m")) == "org/m"
    with pytest.raises(ModelError, match="is not a folder and no model.hub_id"):
        resolve_model(ModelConfig(path=str(tmp_path / "no")))
    with pytest.raises(ModelError, match="no model given"):
        resolve_model(ModelConfig())


@pytest.mark.slow
def test_smollm2_from_gguf_matches_the_gguf_model(smollm2_dir):
    """The converted folder holds the GGUF model's (dequantized) weights, scored the ProRank way."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    gguf = find_smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model, tok = load_causal_lm(ModelConfig(path=str(smollm2_dir)))
    builder = PromptBuilder(tok, max_length=176)
    row = builder.encode("Vitamin D lowers fracture risk.", "Vitamin D trial. Supplementation reduced fractures.")
    with torch.no_grad():
        ours = relevance_score(answer_logits(model, [row], builder.answer_ids, tok.pad_token_id))[0]
        logits = reference(torch.tensor([row])).logits[0, -1]
    expected = logits[builder.answer_ids[1]] - logits[builder.answer_ids[0]]
    assert ours.item() == pytest.approx(expected.item(), abs=1e-4)
    assert model.config.num_hidden_layers == 30 and sum(p.numel() for p in model.parameters()) > 1.3e8


def test_checkpoint_model_dir_resolves_steps_roots_and_folders(tmp_path):

    root = tmp_path / "checkpoints"
    model = root / "step-4" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (root / "LATEST").write_text("step-4")
    assert checkpoint_model_dir(str(model)) == str(model)
    assert checkpoint_model_dir(str(root / "step-4")) == str(model)
    assert checkpoint_model_dir(str(root)) == str(model)
    assert checkpoint_model_dir(str(root / "LATEST")) == str(model)
    assert checkpoint_model_dir("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no model"):
        checkpoint_model_dir(str(tmp_path / "empty"))
