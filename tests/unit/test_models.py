"""Models: the tiny random model's shape, local folders before the hub, checkpoint folders resolved.
(The real SmolLM2 from its GGUF file: tests/integration/test_smollm2_gguf.py.)"""

import json

import pytest

from prorank.model.models import ModelError, checkpoint_model_dir, resolve_model
from prorank.model.prompt import answer_token_ids
from prorank.settings.config import ModelConfig


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
