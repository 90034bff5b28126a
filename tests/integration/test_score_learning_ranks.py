"""Stage 2 on real DeepSpeed ranks (ZeRO-2/3, top layers only, mixed precision): their score steps match a
plain torch loop on the same ranking groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.optim.lr_scheduler import LambdaLR

from prorank.corpus.batches import RankingGroup
from prorank.corpus.data import load_local
from prorank.learner.objectives import RankingObjective
from prorank.learner.rank import freeze_below
from prorank.learner.score_step import score_micro_batch_loss
from prorank.learner.step import lr_lambda
from prorank.model.models import load_tokenizer
from prorank.model.prompt import PromptBuilder, document_text
from prorank.settings.config import ProRankConfig, StageLearnerConfig
from prorank.settings.stage_config import RankingLoss

ROOT = Path(__file__).resolve().parents[2]

T = torch.tensor


def ranking_groups(scifact_dir, tokenizer, n: int = 4):

    builder = PromptBuilder(tokenizer, 144)
    data = load_local(scifact_dir, "train")
    docs = list(data.corpus)
    groups = []
    for i, qid in enumerate(data.query_ids[:n]):
        ids = [next(iter(data.qrels[qid]))] + [d for d in docs[i * 3 : i * 3 + 3] if d not in data.qrels[qid]]
        pairs = [(data.queries[qid], document_text(data.corpus[d].title, data.corpus[d].text)) for d in ids]
        groups.append(RankingGroup(qid, ids, [1] + [0] * (len(ids) - 1), builder.encode_batch(pairs)))
    return groups, builder


def torch_steps(model, groups, builder, mix: RankingLoss, lc, steps: int = 3) -> list[float]:
    """The losses of `steps` plain torch AdamW steps over `groups` (one query per micro-batch, summed over
    the step's rows), with lc's lr schedule and clipping: what the DeepSpeed ranks are compared against."""

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lc.lr, weight_decay=lc.weight_decay)
    schedule = LambdaLR(opt, lr_lambda(lc))
    losses = []
    for _ in range(steps):
        total = 0.0
        for g in groups:
            loss, stats = score_micro_batch_loss(
                model, [g], len(groups), mix, builder.answer_ids, builder.tokenizer.pad_token_id
            )
            loss.backward()
            total += stats["loss"]
        torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad()
        losses.append(total)
    return losses


@pytest.mark.parametrize("stage,trainable", [(2, None), (3, None), (2, 1)])
def test_deepspeed_score_steps_match_single_process(ray_local, tiny_model_dir, scifact_dir, tmp_path, stage, trainable):
    """The stage-2 step on 2 DeepSpeed ranks gives the losses of the same step in one torch process, and
    its checkpoint carries a model folder with the trained weights. With `learner.trainable_layers`, only
    the top layers (and the final norm) move, on both sides."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    tokenizer = load_tokenizer(str(tiny_model_dir))
    groups, builder = ranking_groups(scifact_dir, tokenizer)
    cfg = ProRankConfig.model_validate(
        {
            "learner": {"num_ranks": 2, "zero_stage": stage},
            "train": {"stages": ["score"]},
            "score": {
                "queries_per_step": 4,
                "micro_batch_queries": 1,
                "lr": 2e-3,
                "warmup_steps": 1,
                "steps": 10,
                "pairwise_weight": 0.5,
                "pointwise_weight": 0.5,
            },
        }
    )
    lc = cfg.score_learner().model_copy(update={"lr_schedule": "linear", "trainable_layers": trainable})
    objective = RankingObjective.of(cfg.score)
    learner = LearnerGroup(str(tiny_model_dir), lc, objective)
    try:
        metrics = [learner.step(groups) for _ in range(3)]
        weights, _ = learner.full_weights()
        folder = learner.save(tmp_path)
    finally:
        learner.shutdown()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if trainable:
        freeze_below(model, trainable)
    losses = torch_steps(model, groups, builder, objective.ranking_loss, lc)
    assert [m["loss"] for m in metrics] == pytest.approx(losses, rel=1e-3, abs=1e-5)
    assert metrics[-1]["margin"] > metrics[0]["margin"]
    assert metrics[0]["lr"] > 0 and metrics[0]["grad_norm"] > 0

    saved = AutoModelForCausalLM.from_pretrained(folder / "model")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    top = f"layers.{model.config.num_hidden_layers - 1}."
    moved = {name for name in weights if not torch.equal(weights[name], initial[name])}
    if trainable:  # the top layer and the final norm moved; the embeddings and the layers below did not
        assert moved and all(top in name or name == "model.norm.weight" for name in moved), sorted(moved)
        assert any(top in name for name in moved)
    else:
        assert "model.embed_tokens.weight" in moved


def test_mixed_precision_score_steps_stay_close_to_float32(ray_local, tiny_model_dir, scifact_dir, tmp_path):
    """The quality recipe's learner (configs/scifact-cpu.yaml: 2 ranks of 1 thread, bf16 mixed precision,
    the CPU's attention kernel, fused AdamW), on the tiny model: the losses of 3 steps within 3% of the
    float32 single-process steps (plain torch: sdpa attention, AdamW unfused); trained weights and optimizer
    stay float32, the frozen bottom is held in bf16, each step reports where its seconds went, and the
    checkpoint's model folder loads."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    tokenizer = load_tokenizer(str(tiny_model_dir))
    groups, builder = ranking_groups(scifact_dir, tokenizer)
    recipe = yaml.safe_load((ROOT / "configs" / "scifact-cpu.yaml").read_text())["learner"]
    assert recipe["num_ranks"] == 2 and recipe["mixed_precision"] == "auto"
    learner_section = {**recipe, "mixed_precision": "bf16", "trainable_layers": 1}  # bf16 even without bf16 units
    cfg = StageLearnerConfig(**learner_section, lr=2e-3, beta=0.0)
    mix = RankingLoss(weights={"contrastive": 1.0, "pairwise": 0.0, "pointwise": 0.0}, temperature=1.0)
    learner = LearnerGroup(str(tiny_model_dir), cfg, RankingObjective(mix, 4, 1))
    try:
        steps = [learner.step(groups) for _ in range(3)]
        mixed = [m["loss"] for m in steps]
        for m in steps:
            phases = m["forward_seconds"] + m["backward_seconds"] + m["optimizer_seconds"]
            assert 0 < phases <= m["step_seconds"]
        weights, _ = learner.full_weights()
        folder = learner.save(tmp_path)
    finally:
        learner.shutdown()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    freeze_below(model, 1)
    exact = torch_steps(model, groups, builder, mix, cfg)
    assert mixed == pytest.approx(exact, rel=3e-2)
    assert mixed[-1] < mixed[0]
    assert weights["model.layers.1.mlp.up_proj.weight"].dtype == torch.float32  # trained: float32 master
    assert weights["model.norm.weight"].dtype == torch.float32
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # frozen: bf16
    saved = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    assert torch.equal(
        saved.state_dict()["model.layers.1.mlp.up_proj.weight"], weights["model.layers.1.mlp.up_proj.weight"]
    )
