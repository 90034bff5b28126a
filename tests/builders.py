"""What the learner and LoRA tests build from the real SciFact and the tiny model: scored GRPO groups, and
the tiny model with a LoRA adapter made as a learner rank makes it."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from prorank.learner.forward import naive_group_logprobs
from prorank.model.lora import add_adapter
from prorank.model.prompt import PromptBuilder
from prorank.run.rollout import ScoredGroup
from prorank.settings.config import LoraSettings, StageLearnerConfig

LORA = LoraSettings(r=8, alpha=16)


def learner_config(zero_stage: int, **settings) -> StageLearnerConfig:
    """2 DeepSpeed ranks stepping 4 groups (`scifact_groups`) one per micro-batch, a 10-step linear schedule;
    `settings` (validated) replace or add to these: the learner and LoRA tests' one config."""
    base = dict(
        num_ranks=2,
        zero_stage=zero_stage,
        groups_per_step=4,
        micro_batch_groups=1,
        lr=2e-3,
        warmup_steps=1,
        lr_schedule="linear",
        total_steps=10,
        beta=0.05,
        grad_clip=1.0,
    )
    return StageLearnerConfig(**{**base, **settings})


def scifact_groups(dataset, tok, model, n: int) -> list[ScoredGroup]:
    """On-policy groups from real SciFact prompts: G=4 answers "1"/"0", rewarded like the reward service
    (format 1 + relevance 1), half the prompts with a relevant document, half with a non-relevant one."""
    builder = PromptBuilder(tok, max_length=176)
    zero, one = builder.answer_ids
    eos = tok.eos_token_id
    completions = [[one, eos], [zero, eos], [one, eos], [zero, eos]]
    groups = []
    docs = list(dataset.corpus.values())
    for i, qid in enumerate(dataset.query_ids[:n]):
        relevant = i % 2 == 0
        doc = dataset.corpus[next(iter(dataset.qrels[qid]))] if relevant else docs[i * 7]
        prompt = builder.encode(dataset.queries[qid], f"{doc.title} {doc.text}")
        with torch.no_grad():
            behaviour = naive_group_logprobs(model, prompt, completions, tok.pad_token_id)
        rewards = [1.0 + float((c[0] == one) == relevant) for c in completions]
        groups.append(
            ScoredGroup(
                prompt,
                completions,
                [row[: len(c)].tolist() for row, c in zip(behaviour.logprobs, completions)],
                rewards,
            )
        )
    return groups


def peft_model(model_dir, lora: LoraSettings = LORA, seed: int = 0):
    """The base with a fresh adapter, made as a learner rank makes it (same seed: the same A)."""
    torch.manual_seed(seed)
    return add_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)


def moved(model, seed: int = 1):
    """Give every adapter's B (zero when fresh) some values: the adapter then changes the model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model
