"""The RLHF objectives' mathematics, as small pure functions checked against hand computations.

Shapes: B = batch of sequences, T = response positions. ``mask`` is 1 on response tokens
that count and 0 on prompt/padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise to zero mean and unit variance over the masked entries (advantage whitening)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label_t | prefix) for each position: logits (B, T, V), labels (B, T) → (B, T).

    ``logits[:, t]`` must already predict ``labels[:, t]`` (shift before calling). Labels of
    -100 give 0.
    """
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    return logp * (labels != -100)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of next-token log-probabilities of the labelled tokens: (B, T, V), (B, T) → (B,).

    Applies the causal shift: logits at t predict labels at t + 1.
    """
    return token_logprobs(logits[:, :-1], labels[:, 1:]).sum(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None
) -> Tensor:
    """−log σ(r(x, y_w) − r(x, y_l) [− margin]), averaged over pairs."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al.) or IPO (Azar et al.) on sequence log-probabilities.

    Returns (loss, chosen_rewards, rejected_rewards) where the implicit rewards are
    β·(log π − log π_ref), detached.
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "ipo":
        # IPO regresses the log-ratio gap to 1/(2β) instead of pushing it to infinity.
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss_type: expected 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens: returns (advantages, returns).

    δ_t = r_t + γ V_{t+1} − V_t;  A_t = δ_t + γλ A_{t+1}; the value after the last response
    token is 0. Masked positions contribute nothing and get advantage 0.
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    T = rewards.size(-1)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[..., 0])
    next_adv = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(T)):
        m = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        adv = delta + gamma * lam * next_adv
        advantages[..., t] = adv * m
        # padding after the response must not leak into earlier positions
        next_value = torch.where(m > 0, values[..., t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    returns = advantages + values
    return advantages, returns


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate: returns (loss, clip_fraction, approx_kl)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> Tensor:
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²), averaged over response tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: β grows when KL exceeds the target.

    β ← β · (1 + clip((KL − target) / target, −0.2, 0.2) · n_steps / horizon)
    """

    def __init__(self, init_beta: float, target: float | None, horizon: int = 10000) -> None:
        if init_beta < 0:
            raise ValueError(f"init_beta: expected >= 0, got {init_beta}")
        if target is not None and target <= 0:
            raise ValueError(f"target KL: expected > 0 or None (fixed β), got {target}")
        self.beta = init_beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None and math.isfinite(current_kl):
            error = max(-0.2, min(0.2, current_kl / self.target - 1))
            self.beta *= 1 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, float | None]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = state["beta"], state["target"], state["horizon"]
