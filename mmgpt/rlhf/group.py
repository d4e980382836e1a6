"""Group-relative policy gradients: GRPO's and RLOO's advantages and losses, as pure functions.

Both methods answer each prompt ``k`` times and use the other answers to the same prompt as the
baseline, so no value model is trained:

* **GRPO** (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i − mean(r)) / (std(r) + eps)`` over
  the group (``scale="group"``); ``scale="batch"`` divides by the std of the whole rollout
  instead and ``scale="none"`` not at all (Liu et al. 2025, "Dr. GRPO"): with a learned reward,
  a group of answers that are all equally wrong differs only by the reward model's noise, and
  the group std blows that noise up to advantages of ±1. The loss is PPO's clipped surrogate
  with that advantage on every answer token, plus ``β`` times the k3 estimate of
  KL(π ‖ π_ref), averaged over each answer's tokens and then over the answers.
* **RLOO** (Ahmadian et al. 2024): ``A_i = r_i − mean_{j≠i} r_j`` (leave-one-out baseline);
  the loss is REINFORCE on the answer's log-probability, ``−A_i · log π(y_i | x)``.

Shapes: G = prompts (groups), k = answers per prompt, B = G·k answers (the ``k`` answers of a
prompt in consecutive rows), T = answer positions. ``mask`` is 1 on answer tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmgpt.rlhf.losses import masked_mean

__all__ = [
    "GRPO_SCALES",
    "as_groups",
    "grpo_advantages",
    "grpo_loss",
    "k3_kl",
    "rloo_advantages",
    "rloo_loss",
]


def as_groups(rewards: Tensor, group_size: int) -> Tensor:
    """The ``(B,)`` rewards of consecutive groups as ``(G, k)``; ``B`` must be a multiple of k."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size: group-relative advantages need at least 2 answers per prompt, "
            f"got {group_size!r}"
        )
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards: expected a 1-D tensor whose length is a multiple of the group size "
            f"{group_size}, got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, group_size)  # (G, k)


def _check_groups(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected (groups, group_size), got {tuple(rewards.shape)}")
    if rewards.size(1) < 2:
        raise ValueError(
            "rewards: group-relative advantages need at least 2 answers per prompt, got a "
            f"group size of {rewards.size(1)}"
        )


GRPO_SCALES = ("group", "batch", "none")


def grpo_advantages(rewards: Tensor, eps: float = 1e-4, scale: str = "group") -> Tensor:
    """GRPO's advantages: ``(r − mean_group) / (std + eps)``: ``(G, k) → (G, k)``.

    ``scale`` picks the std: ``"group"`` each group's own (the paper's), ``"batch"`` the std of
    all ``G·k`` rewards (one scale for the rollout, so a group's tiny spread stays tiny),
    ``"none"`` no division (``eps`` unused). ``std`` is the sample standard deviation
    (Bessel-corrected). A group whose answers all scored the same gets advantage 0 everywhere.
    """
    _check_groups(rewards)
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale: expected one of {', '.join(GRPO_SCALES)}, got {scale!r}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (G, k)
    if scale == "none":
        return centred
    std = rewards.std(dim=1, keepdim=True) if scale == "group" else rewards.std()  # (G, 1) | ()
    return centred / (std + eps)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO's advantages: ``r_i − mean_{j≠i} r_j`` (leave-one-out baseline): ``(G, k) → (G, k)``.

    Equal to ``k / (k − 1) · (r_i − mean_group)``.
    """
    _check_groups(rewards)
    k = rewards.size(1)
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)  # (G, k)
    return rewards - others


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) on tokens sampled from π:
    ``exp(log π_ref − log π) − (log π_ref − log π) − 1`` (≥ 0, unbiased): ``(B, T) → (B, T)``."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    beta: float = 0.04,
    clip_range_high: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GRPO's loss: returns ``(loss, clip_fraction, kl)``.

    ``logprobs``, ``old_logprobs`` (the rollout's), ``ref_logprobs``, ``mask``: ``(B, T)``;
    ``advantages``: ``(B,)``, one per answer, applied to each of its tokens. Per token,
    ``ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε_high) A) + β · k3_t`` with ``ρ_t = π / π_old``
    and ``ε_high = clip_range_high`` (DAPO's "clip-higher", Yu et al. 2025: a wider upper bound
    lets unlikely tokens with a positive advantage grow, against entropy collapse; ``None``:
    ``ε``); the loss is the mean over answers of each answer's mean ``ℓ_t``. ``kl``
    (detached) is the mean k3 per token, averaged the same way; ``clip_fraction`` the share of
    tokens whose ratio was clipped.
    """
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]  # (B, 1)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = ratio * adv
    high = clip_range if clip_range_high is None else clip_range_high
    clipped = ratio.clamp(1 - clip_range, 1 + high) * adv
    kl = k3_kl(logprobs, ref_logprobs)  # (B, T)
    per_token = -torch.minimum(unclipped, clipped) + beta * kl  # (B, T)
    loss = masked_mean(per_token, mask, dim=-1).mean()
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    mean_kl = masked_mean(kl, mask, dim=-1).mean()
    return loss, clip_fraction.detach(), mean_kl.detach()


def rloo_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """RLOO's REINFORCE loss ``−mean_i A_i · Σ_t log π(y_i,t)``: ``(B, T), (B,), (B, T) → ()``."""
    sequence_logprobs = (logprobs * mask.to(logprobs.dtype)).sum(-1)  # (B,)
    return -(advantages.to(logprobs.dtype) * sequence_logprobs).mean()
