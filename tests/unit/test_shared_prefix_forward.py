"""The learner's shared-prefix forward: a group's completions scored on one pass over the prompt equal
each (prompt, completion) scored alone (tiny model). The DeepSpeed ranks: tests/integration/test_learner.py."""

from __future__ import annotations

import torch

from prorank.learner.forward import naive_group_logprobs, shared_prefix_group_logprobs
from prorank.model.prompt import PromptBuilder


def test_shared_prefix_equals_naive_forward(tiny_model):
    model, tok = tiny_model
    builder = PromptBuilder(tok, max_length=176)
    prompt = builder.encode("does the drug lower blood pressure?", "Patients had a lower risk after the trial.")
    zero, one = builder.answer_ids
    for completions in ([[one, tok.eos_token_id], [zero], [one, 40, tok.eos_token_id]], [[one], [zero]]):
        grads = []
        outs = []
        for fn in (naive_group_logprobs, shared_prefix_group_logprobs):
            model.zero_grad(set_to_none=True)
            out = fn(model, prompt, completions, tok.pad_token_id, temperature=0.7)
            (out.logprobs.sum() + out.logprobs[:, 0].mean()).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            outs.append(out)
        assert torch.equal(outs[0].mask, outs[1].mask)
        assert torch.allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
        assert torch.allclose(outs[0].entropy, outs[1].entropy, atol=1e-4)
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-5)
    model.zero_grad(set_to_none=True)
