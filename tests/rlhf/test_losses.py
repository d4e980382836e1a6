"""RLHF losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mmgpt.rlhf import (
    AdaptiveKLController,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    dpo_loss,
    gae,
    masked_whiten,
    sequence_logprobs,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_matches_hand_value():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5]))
    expected = -(math.log(sigmoid(1.0)) + math.log(sigmoid(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gae_matches_hand_recursion():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # last position is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    gamma, lam = 0.9, 0.8
    # δ2 = 1 + 0 − 0.4 = 0.6; δ1 = 0 + 0.9·0.4 − 0.2 = 0.16; δ0 = 0 + 0.9·0.2 − 0.5 = −0.32
    a2 = 0.6
    a1 = 0.16 + gamma * lam * a2
    a0 = -0.32 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))


def test_clipped_surrogate_hand_values():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, clip_frac, _ = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    # per token: max(−A·r, −A·clip(r)) → max(−1.5, −1.2) = −1.2; max(0.5, 0.8) = 0.8;
    # max(−2.2, −2.2) = −2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, rel=1e-5)
    assert clip_frac.item() == pytest.approx(2 / 3)


def test_clipped_value_loss_hand_value():
    loss = clipped_value_loss(
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[2.0, 1.0]]),
        torch.ones(1, 2),
        clip=0.2,
    )
    # token 0: max((1−2)², (0.2−2)²) = 3.24; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def test_dpo_and_ipo_hand_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    logits = (-1.0 + 2.0) - (-3.0 + 2.5)  # 1.5
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(sigmoid(0.5 * logits)), rel=1e-6)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.25)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((logits - 1.0) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto2")


def test_sequence_logprobs_against_manual_sum():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 2, 4, -100]])
    logp = torch.log_softmax(logits, -1)
    expected = logp[0, 0, 2] + logp[0, 1, 4]
    assert sequence_logprobs(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_controller_direction():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, n_steps=10) > 0.1  # too much KL → stronger penalty
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(1.0, n_steps=10) < 0.1
    fixed = AdaptiveKLController(0.1, target=None)
    assert fixed.update(100.0, 10) == 0.1


def test_whiten_zero_mean_unit_var_on_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, mask)
    assert w[0, :3].mean().abs() < 1e-6 and w[0, 3] == 0
    assert w[0, :3].pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)
