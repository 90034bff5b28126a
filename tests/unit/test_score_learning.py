"""Stage 2: the ranking losses against hand-computed values, the candidate forward, the sampler, and a
short torch training loop in which the score learns to put positives above negatives. (DeepSpeed ranks:
tests/integration/test_score_learning_ranks.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from prorank.corpus.batches import PromptSampler, RankingGroup, RankingSampler, policy_negatives
from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import load_local
from prorank.learner.objectives import RankingObjective
from prorank.learner.rank import freeze_below
from prorank.learner.score_losses import (
    listwise_contrastive,
    pairs_ordered,
    pairwise_preference,
    pointwise_bce,
    ranking_losses,
    score_margin,
)
from prorank.learner.score_step import score_micro_batch_loss
from prorank.model.models import load_tokenizer
from prorank.model.prompt import PromptBuilder, document_text
from prorank.model.scoring import answer_logits
from prorank.settings.config import BM25Config, TrainConfig
from prorank.settings.stage_config import RankingLoss, ScoreConfig, WarmupConfig

T = torch.tensor


def _mask(labels):
    return torch.ones_like(labels, dtype=torch.bool)


def test_the_loss_mix_names_every_loss_and_no_other():
    """A loss left out of the mix, or one no function computes, is an error, never a silent zero."""
    scores, labels = T([[2.0, 0.0, 1.0]]), T([[1, 0, 0]])
    full = RankingLoss(weights={"contrastive": 1.0, "pairwise": 0.5, "pointwise": 0.0}, temperature=1.0)
    total, parts = ranking_losses(scores, labels, _mask(labels), full)
    assert set(parts) == {"contrastive", "pairwise"}  # a zero weight is not computed
    assert total.item() == pytest.approx(parts["contrastive"].item() + 0.5 * parts["pairwise"].item())
    for weights in ({"contrastive": 1.0}, {"contrastive": 1.0, "pairwise": 0.0, "pointwise": 0.0, "listmle": 1.0}):
        with pytest.raises(ValueError, match="every loss of"):
            ranking_losses(scores, labels, _mask(labels), RankingLoss(weights=weights, temperature=1.0))
    with pytest.raises(ValueError, match="one > 0"):
        RankingLoss(weights={"contrastive": 0.0, "pairwise": 0.0, "pointwise": 0.0}, temperature=1.0)

    with pytest.raises(ValueError, match="every loss of"):  # in the driver, before any learner rank starts
        RankingObjective(RankingLoss(weights={"contrastive": 1.0}, temperature=1.0), 4, 1)


def test_contrastive_hand_computed():
    scores, labels = T([[2.0, 0.0, 1.0]]), T([[1, 0, 0]])
    # -log(e^2 / (e^2 + e^0 + e^1)) = log(1 + e^-2 + e^-1)
    assert listwise_contrastive(scores, labels, _mask(labels)).item() == pytest.approx(0.407606, abs=1e-5)
    # temperature 0.5 doubles the logits: log(1 + e^-4 + e^-2)
    assert listwise_contrastive(scores, labels, _mask(labels), 0.5).item() == pytest.approx(0.142932, abs=1e-5)


def test_contrastive_several_positives_and_padding():
    scores, labels = T([[1.0, 0.0, 0.0, 50.0]]), T([[1, 1, 0, 0]])
    mask = T([[True, True, True, False]])  # the padded 50 must not count as a negative
    # positive 1: log(1 + e^(0-1)); positive 2: log(1 + e^0); the other positive is not a negative
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert listwise_contrastive(scores, labels, mask).item() == pytest.approx(expected, abs=1e-5)
    # a row without negatives contributes nothing
    assert listwise_contrastive(T([[1.0, 2.0]]), T([[1, 1]]), _mask(T([[1, 1]]))).item() == 0.0


def test_pairwise_respects_grades():
    scores, labels = T([[1.0, 0.0, 2.0]]), T([[2, 1, 0]])
    # pairs (0>1), (0>2), (1>2): softplus(-1), softplus(1), softplus(2)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log1p(math.exp(2))) / 3
    assert pairwise_preference(scores, labels, _mask(labels)).item() == pytest.approx(expected, abs=1e-5)
    assert pairs_ordered(scores, labels, _mask(labels)).item() == pytest.approx(1 / 3)
    same = T([[1, 1]])
    assert pairwise_preference(T([[0.0, 3.0]]), same, _mask(same)).item() == 0.0  # equal grades: no pair


def test_pointwise_and_margin():
    scores, labels = T([[0.0, 2.0]]), T([[1, 0]])
    expected = (math.log(2) + math.log1p(math.exp(2))) / 2
    assert pointwise_bce(scores, labels, _mask(labels)).item() == pytest.approx(expected, abs=1e-5)
    labels = T([[1, 0, 0]])
    assert score_margin(T([[3.0, 1.0, 0.0]]), labels, _mask(labels)).item() == pytest.approx(2.5)


def test_losses_are_per_row():
    scores, labels = T([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), T([[1, 0, 0], [0, 0, 1]])
    out = listwise_contrastive(scores, labels, _mask(labels))
    assert out.shape == (2,)
    assert out[1].item() == pytest.approx(math.log(3), abs=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_one_querys_candidates_score_as_each_prompt_alone(tiny_model, scifact_test, shared):

    model, tokenizer = tiny_model
    builder = PromptBuilder(tokenizer, 144)
    qid = scifact_test.query_ids[0]
    docs = list(scifact_test.corpus.values())[:5]
    texts = [d.title if i % 2 else document_text(d.title, d.text) for i, d in enumerate(docs)]  # short, long
    prompts = builder.encode_batch([(scifact_test.queries[qid], t) for t in texts])
    assert len(set(map(len, prompts))) > 1  # padding is exercised
    with torch.no_grad():
        expected = torch.stack([model(torch.tensor([p])).logits[0, -1, list(builder.answer_ids)] for p in prompts])
        got = answer_logits(model, prompts, builder.answer_ids, tokenizer.pad_token_id, shared)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_ranking_sampler(scifact_dir, tiny_model):

    data = load_local(scifact_dir, "train")
    tc = TrainConfig(max_train_queries=30, dev_queries=5)
    ranking = bm25_search(data, data.query_ids[:40], BM25Config(top_k=30))
    prompts = PromptSampler(data, ranking, tc, WarmupConfig())
    sc = ScoreConfig(negatives=3, hard_negative_depth=20)
    sampler = RankingSampler(prompts, ranking, sc, PromptBuilder(tiny_model[1], 144))
    groups = sampler.batch(0, 6)
    assert len(groups) == 6 and groups == sampler.batch(0, 6)  # a pure function of the step
    for g in groups:
        assert g.query_id not in prompts.dev_query_ids
        assert g.labels[0] >= 1 and g.labels[1:] == [0] * (len(g.labels) - 1) and len(g.labels) == 4
        assert all(data.qrels[g.query_id].get(d, 0) == 0 for d in g.doc_ids[1:])  # negatives exclude positives
        top = [d for d, _ in ranking[g.query_id][:20]]
        assert all(d in top for d in g.doc_ids[1:])
        assert len(g.prompt_ids) == 4
    # Epochs: every training query once before any comes again, across step boundaries.
    n = len(sampler.query_ids)
    seen = [g.query_id for step in range(n) for g in sampler.batch(step, 2)]
    assert sorted(seen[:n]) == sorted(sampler.query_ids) == sorted(seen[n : 2 * n])
    assert seen[:n] != seen[n : 2 * n]  # each epoch in its own order
    # Mined negatives replace BM25's for their query only, hardest first, `negatives` of them.
    qid = sampler.queries(0, 1)[0]
    sampler.mined[qid] = list(reversed(sampler.negatives[qid]))
    mined = next(g for g in sampler.batch(0, 6) if g.query_id == qid)
    assert mined.doc_ids[1:] == list(reversed(sampler.negatives[qid]))[:3]
    others = [g for g in sampler.batch(0, 6) if g.query_id != qid]
    assert others == [g for g in groups if g.query_id != qid]


def test_policy_negatives_hand_computed():

    scores = {"p1": 2.0, "p2": 0.5, "a": 4.0, "b": 3.4, "c": 1.0, "d": -1.0, "e": 3.6}
    # Lowest positive 0.5, guard 3: "a" (4.0) and "e" (3.6) lie above 3.5 and are skipped.
    assert policy_negatives(scores, ["p1", "p2"], 2, 3.0) == (["b", "c"], 2)
    assert policy_negatives(scores, ["p1", "p2"], 9, 10.0) == (["a", "e", "b", "c", "d"], 0)
    assert policy_negatives({"x": 1.0, "y": 2.0}, ["p"], 1, 0.0) == (["y"], 0)  # positive not scored: no guard


def test_score_training_orders_positives_first(tiny_model_dir, scifact_dir):
    """A few AdamW steps of the mixed loss on fixed queries raise the positive-minus-negative margin."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    builder = PromptBuilder(tokenizer, 144)
    data = load_local(scifact_dir, "train")
    docs = list(data.corpus)
    groups = []
    for i, qid in enumerate(data.query_ids[:4]):
        pos = next(iter(data.qrels[qid]))
        negs = [d for d in docs[i * 3 : i * 3 + 3] if d not in data.qrels[qid]]
        ids = [pos, *negs]
        pairs = [(data.queries[qid], document_text(data.corpus[d].title, data.corpus[d].text)) for d in ids]
        groups.append(RankingGroup(qid, ids, [1] + [0] * len(negs), builder.encode_batch(pairs)))
    mix = RankingLoss(weights={"contrastive": 1.0, "pairwise": 0.5, "pointwise": 0.5}, temperature=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    margins, losses = [], []
    for _ in range(8):
        loss, stats = score_micro_batch_loss(
            model, groups, len(groups), mix, builder.answer_ids, tokenizer.pad_token_id
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        margins.append(stats["margin"])
        losses.append(stats["loss"])
        assert stats["loss"] == pytest.approx(
            stats["loss_contrastive"] + 0.5 * stats["loss_pairwise"] + 0.5 * stats["loss_pointwise"], rel=1e-4
        )
    assert losses[-1] < losses[0]
    assert margins[-1] > margins[0] + 0.5


def test_freeze_below_keeps_only_the_top_layers_trainable(tiny_model_dir):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    freeze_below(model, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("model.layers.1.") or name == "model.norm.weight" for name in trainable)
    assert "model.norm.weight" in trainable
    with pytest.raises(ValueError, match="trainable_layers 3: the model has 2 layers"):
        freeze_below(model, 3)
