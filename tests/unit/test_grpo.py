"""GRPO pure functions against values computed by hand."""

import math

import pytest
import torch

from prorank.learner.grpo import batch_normalizer, group_advantages, grpo_loss, k3_kl, token_weights

L = math.log


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([1, -1, 1, -1]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))  # no variance, no signal
    assert torch.allclose(group_advantages(rewards, scale_by_std=False)[0], torch.tensor([0.5, -0.5, 0.5, -0.5]))


def test_k3_kl():
    kl = k3_kl(torch.tensor([[L(0.5)]]), torch.tensor([[L(0.25)]]))
    assert kl.item() == pytest.approx(0.5 + L(2) - 1)  # exp(-ln 2) - (-ln 2) - 1
    assert k3_kl(torch.tensor([[-1.0]]), torch.tensor([[-1.0]])).item() == 0


def _loss(lp_values, adv, **kw):
    lp = torch.tensor([lp_values], requires_grad=True)
    behaviour = torch.full_like(lp, L(0.5))
    loss, stats = grpo_loss(lp, behaviour, torch.tensor([adv]), torch.ones_like(lp), normalizer=2.0, **kw)
    loss.backward()
    return loss.item(), lp.grad[0].tolist(), stats


def test_clipped_surrogate_positive_advantage():
    # ratios 1.1 (inside the clip range) and 0.6 (below it): min picks the unclipped 0.6 * A.
    loss, grad, stats = _loss([L(0.55), L(0.3)], 1.0)
    assert loss == pytest.approx(-(1.1 + 0.6) / 2)
    assert grad == pytest.approx([-1.1 / 2, -0.6 / 2])  # d(-ratio*A)/dlp = -ratio*A, over the normaliser
    assert stats["clipped"].item() == 0


def test_clipped_surrogate_negative_advantage():
    # A = -1: for ratio 0.6 the clipped term (-0.8) is smaller, so it is used and carries no gradient.
    loss, grad, stats = _loss([L(0.55), L(0.3)], -1.0)
    assert loss == pytest.approx((1.1 + 0.8) / 2)
    assert grad == pytest.approx([1.1 / 2, 0.0])
    assert stats["clipped"].item() == 1


def test_kl_term_and_its_gradient():
    lp = torch.tensor([[L(0.5)]], requires_grad=True)
    ref = torch.tensor([[L(0.25)]])
    loss, stats = grpo_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones_like(lp), 1.0, ref_logprobs=ref, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * (0.5 + L(2) - 1))
    assert lp.grad.item() == pytest.approx(0.1 * (1 - 0.5))  # d k3/d lp = 1 - exp(ref - lp)
    assert stats["kl"].item() == pytest.approx(0.5 + L(2) - 1)


def test_padding_is_ignored_and_aggregations():
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert token_weights(mask, "token_mean").tolist() == [[1, 0], [1, 1]]
    assert token_weights(mask, "sequence_mean").tolist() == [[1, 0], [0.5, 0.5]]
    assert batch_normalizer([mask], "token_mean") == 3 and batch_normalizer([mask], "sequence_mean") == 2
    lp = torch.tensor([[L(0.5), 123.0], [L(0.5), L(0.5)]])  # the padded 123 must not count
    behaviour = torch.full_like(lp, L(0.5))
    loss, _ = grpo_loss(lp, behaviour, torch.tensor([1.0, -1.0]), mask, 2.0, aggregation="sequence_mean")
    assert loss.item() == pytest.approx((-1 + 1) / 2)
    loss, _ = grpo_loss(lp, behaviour, torch.tensor([1.0, 3.0]), mask, 3.0)
    assert loss.item() == pytest.approx(-(1 + 3 + 3) / 3)
    with pytest.raises(ValueError, match="unknown aggregation"):
        token_weights(mask, "mean")


def test_truncated_importance_sampling():
    # Learner probs 0.5 and 0.4; the sampler gave 0.25 and 0.5: weights 2 (capped at 1.5) and 0.8.
    lp = torch.tensor([[L(0.5), L(0.4)]], requires_grad=True)
    behaviour = torch.tensor([[L(0.25), L(0.5)]])
    loss, stats = grpo_loss(lp, behaviour, torch.tensor([1.0]), torch.ones_like(lp), 2.0, tis_cap=1.5)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.5 + 0.8) / 2)  # the ratio to the learner itself is 1
    assert lp.grad[0].tolist() == pytest.approx([-1.5 / 2, -0.8 / 2])
    assert stats["truncated"].item() == 1 and stats["clipped"].item() == 0
