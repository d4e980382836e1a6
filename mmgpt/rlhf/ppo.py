"""PPO's settings (:class:`PPOConfig`) and its minibatch loss (:class:`PPOLoss`).

The loss of one minibatch of sampled answers (a :class:`~mmgpt.rlhf.rollout.ResponseBatch`
carrying the rollout's log-probabilities, values, advantages and returns) is

    L = clip-surrogate(π/π_old, A) + vf_coef · ½ max((V − R)², (clip(V) − R)²) − ent_coef · H

with the per-token math of :mod:`mmgpt.rlhf.losses`. Everything else of PPO — sampling the
rollouts, the per-token KL penalty, GAE, the minibatch epochs — is the loop of
:class:`~mmgpt.rlhf.ppo_trainer.PPOTrainer`, which reads its settings from the loss's
:class:`PPOConfig`. The registry entry ``objective: ppo`` (:mod:`mmgpt.objectives.ppo`) is this
loss plus the trainer it builds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from mmgpt.interfaces import ObjectiveOutput
from mmgpt.rlhf.guards import GuardConfig
from mmgpt.rlhf.losses import clipped_policy_loss, clipped_value_loss, masked_mean
from mmgpt.rlhf.rollout import ResponseBatch

__all__ = ["PPOConfig", "PPOLoss"]


@dataclass
class PPOConfig(GuardConfig):
    """Settings of PPO: sampling, KL control, advantages and the optimisation epochs.

    The prompts of one rollout are ``train.batch_size × train.grad_accum_steps``, each answered
    ``samples_per_prompt`` times; each rollout is one trainer step (``train.max_steps``
    rollouts in all).
    """

    reward_model: str | None = None  # directory of a reward model (`mmgpt train reward`)
    # sampling
    samples_per_prompt: int = 1  # answers sampled for each prompt of a rollout
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # optimisation over each rollout
    ppo_epochs: int = 4
    minibatch_size: int = 16
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    # rewards and advantages
    init_kl_coef: float = 0.05  # β: per-token penalty −β (log π − log π_ref)
    target_kl: float | None = 6.0  # nats per answer the adaptive β steers to; None: fixed β
    kl_horizon: int = 10000  # the controller's horizon (in answers)
    normalize_reward: bool = True  # (score − mean) / std with the reward model's statistics
    reward_clip: float | None = None  # clip the (normalised) score to ±reward_clip
    # whiten the scores over each rollout (zero mean, unit variance) before the KL penalty is
    # added: the penalty then weighs the same against every reward model's scale
    whiten_rewards: bool = False
    missing_eos_penalty: float = 0.0  # subtracted from the score of answers cut off unfinished
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int = (
            "samples_per_prompt",
            "max_new_tokens",
            "ppo_epochs",
            "minibatch_size",
            "kl_horizon",
        )
        for name in positive_int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name}: expected a positive integer, got {value!r}")
        for name in ("clip_range", "value_clip", "temperature"):
            _number(name, getattr(self, name), minimum=0.0, strict=True)
        for name in ("vf_coef", "entropy_coef", "init_kl_coef", "missing_eos_penalty"):
            _number(name, getattr(self, name), minimum=0.0)
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            _number(name, value, minimum=0.0)
            if value > 1:
                raise ValueError(f"PPOConfig.{name}: expected a number in [0, 1], got {value!r}")
        if self.target_kl is not None:
            _number("target_kl", self.target_kl, minimum=0.0, strict=True)
        if self.reward_clip is not None:
            _number("reward_clip", self.reward_clip, minimum=0.0, strict=True)
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(
                f"PPOConfig.top_k: expected an integer >= 1 or null, got {self.top_k!r}"
            )
        if self.top_p is not None:
            _number("top_p", self.top_p, minimum=0.0, strict=True)
        for name in ("normalize_reward", "whiten_advantages", "whiten_rewards"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PPOConfig.{name}: expected true or false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"PPOConfig.{name}: expected a number {bound}, got {value!r}")


class PPOLoss:
    """PPO's minibatch loss; ``config`` (a :class:`PPOConfig`) also drives the PPO loop.

    ``model``: a :class:`~mmgpt.rlhf.rollout.PolicyWithValueHead` (or its DDP wrapper); ``batch``: a
    :class:`~mmgpt.rlhf.rollout.ResponseBatch` with old log-probs, values, advantages and
    returns. Metrics: ``policy_loss``, ``value_loss``, ``clip_fraction``, ``approx_kl``
    (between π and π_old), ``entropy`` (per answer token).
    """

    def __init__(self, **settings: Any) -> None:
        unknown = set(settings) - {f.name for f in dataclasses.fields(PPOConfig)}
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(PPOConfig))
            close = [difflib.get_close_matches(k, known, n=1) for k in sorted(unknown)]
            hint = "".join(f" (did you mean {c[0]!r}?)" for c in close if c)
            raise ValueError(
                f"ppo objective: unknown setting(s) {sorted(unknown)}{hint}; known: "
                f"{', '.join(known)}"
            )
        self.config = PPOConfig(**settings)

    def __call__(self, model: nn.Module, batch: ResponseBatch) -> ObjectiveOutput:
        cfg = self.config
        if batch.advantages is None or batch.old_logprobs is None:
            raise ValueError(
                "ppo objective: the batch carries no rollout statistics (old log-probs, "
                "advantages); PPO batches come from PPOTrainer's rollouts"
            )
        logprobs, values, entropy = model(batch, with_entropy=True)
        mask = batch.response_mask
        pg_loss, clip_fraction, approx_kl = clipped_policy_loss(
            logprobs, batch.old_logprobs, batch.advantages, mask, cfg.clip_range
        )
        vf_loss = clipped_value_loss(values, batch.old_values, batch.returns, mask, cfg.value_clip)
        mean_entropy = masked_mean(entropy, mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "policy_loss": float(pg_loss.detach()),
                "value_loss": float(vf_loss.detach()),
                "clip_fraction": float(clip_fraction),
                "approx_kl": float(approx_kl),
                "entropy": float(mean_entropy.detach()),
            },
            weight=1.0,
        )
