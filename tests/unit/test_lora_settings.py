"""`learner.lora` in one process: settings refused together, a saved adapter of other settings refused by
file and key, the merged state equal to peft's merge, and GRPO's reference of a LoRA policy its base. The
DeepSpeed ranks, live vLLM actors and checkpoints with an adapter: tests/integration/test_lora.py."""

from __future__ import annotations

import pytest
import torch

from prorank.settings.config import (
    LoraSettings,
    ProRankConfig,
    StageLearnerConfig,
)
from tests.builders import LORA, moved, peft_model, scifact_groups

TOKEN = "lora-token"


def test_lora_and_trainable_layers_are_refused_together():
    with pytest.raises(ValueError, match="learner.lora and learner.trainable_layers cannot be used together"):
        StageLearnerConfig(lora={"r": 8}, trainable_layers=1)
    with pytest.raises(ValueError, match="r"):
        ProRankConfig.model_validate({"learner": {"lora": {"r": 1024}}})
    with pytest.raises(ValueError, match="rank"):
        ProRankConfig.model_validate({"learner": {"lora": {"rank": 8}}})  # a wrong key is named


def test_a_saved_adapter_of_other_settings_is_refused_naming_file_and_key(tiny_model_dir, tmp_path):
    """The score stage continues the warmup's adapter: one saved with another r or alpha is named, not loaded."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.model.lora import adapter_state, add_adapter, write_adapter  # noqa: PLC0415 pulls torch, which importing this module does not

    other = LoraSettings(r=4, alpha=8)
    folder = write_adapter(
        tmp_path / "adapter", other, str(tiny_model_dir), adapter_state(peft_model(tiny_model_dir, other))
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"adapter_config.json: r is 4, learner.lora says 8"):
        add_adapter(base, LORA, str(folder))
    with pytest.raises(ValueError, match=r"lora_alpha is 8.0, learner.lora says 16.0"):
        add_adapter(base, LoraSettings(r=4, alpha=16), str(folder))
    with pytest.raises(FileNotFoundError, match="no LoRA adapter here"):
        add_adapter(base, LORA, str(tmp_path))
    assert add_adapter(base, other, str(folder)).peft_config["default"].r == 4


def test_merged_state_is_peft_merge_and_the_model_is_left_as_it_was(tiny_model_dir, tmp_path):
    from peft import PeftModel  # noqa: PLC0415 peft: heavy (imports transformers), only with learner.lora
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.model.lora import (  # noqa: PLC0415 pulls torch, which importing this module does not
        adapter_specs_model,
        adapter_state,
        base_weights,
        merge_into,
        merged_state,
        vllm_rank,
        write_adapter,
    )

    model = moved(peft_model(tiny_model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    expected = moved(peft_model(tiny_model_dir)).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    # An actor serving merged weights adds a version (peft's names) to the model folder's weights alike.
    base = base_weights(str(tiny_model_dir), "float32")
    by_actor = {**base, **merge_into(base, adapter_state(model), LORA)}
    assert all(torch.allclose(by_actor[k], expected[k], atol=1e-6) for k in base)
    assert sum(not torch.equal(by_actor[k], base[k]) for k in base) == len(adapter_state(model)) // 2
    # What a version must hold, from the meta device: the adapter's names and shapes exactly.
    specs = adapter_specs_model(str(tiny_model_dir), LORA, "float32")
    state = adapter_state(model)
    assert {k: tuple(v.shape) for k, v in specs.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    # The adapter folder peft loads gives the merged model's outputs.
    folder = write_adapter(tmp_path / "adapter", LORA, str(tiny_model_dir), state)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
    ids = torch.tensor([[1, 5, 9, 20, 3]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, plain(ids).logits, atol=1e-5)
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 16, 200)] == [1, 8, 8, 16, 16, 256]


def test_grpo_reference_of_a_lora_policy_is_its_base(tiny_model_dir, scifact_test, tiny_model):
    """With LoRA the KL reference is the policy with its adapter off: the same loss as a separate copy of the
    start model, without holding one."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.learner.step import micro_batch_loss  # noqa: PLC0415 pulls torch, which importing this module does not

    groups = scifact_groups(scifact_test, tiny_model[1], tiny_model[0], 2)
    cfg = StageLearnerConfig(num_ranks=1, groups_per_step=2, micro_batch_groups=2, beta=0.5, lora=LORA)
    model = moved(peft_model(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    own, stats = micro_batch_loss(model, None, groups, 8.0, cfg, tiny_model[1].pad_token_id)
    copy, copy_stats = micro_batch_loss(model, base, groups, 8.0, cfg, tiny_model[1].pad_token_id)
    assert stats["kl"] > 0 and own.item() == pytest.approx(copy.item(), abs=1e-6)
    assert stats["kl"] == pytest.approx(copy_stats["kl"], abs=1e-7)
