"""GRPO and RLOO: RLHF against a reward model with group-relative advantages, no value model.

One trainer *step* is one iteration:

1. **Rollout** — take ``train.batch_size × train.grad_accum_steps`` prompts, sample
   ``samples_per_prompt`` (k ≥ 2) answers to each with the KV-cache generator (the rollout
   code of PPO, :mod:`mmgpt.rlhf.rollout`), score them with the reward model (normalised with
   its training statistics, as PPO does) and compute per answer token the policy's and the
   frozen reference's log-probabilities of the tempered distribution sampled from.
2. **Advantages** — one per answer, relative to the other answers to the same prompt
   (:mod:`mmgpt.rlhf.group`): GRPO ``(r − mean) / (std + eps)``; RLOO ``r − mean of the other
   k − 1`` where ``r`` is the score minus ``kl_coef`` times the answer's log-ratio to the
   reference (PPO's per-token KL penalty, summed over the answer).
3. **Optimisation** — ``epochs`` passes over the rollout in shuffled minibatches, one optimizer
   step each: GRPO's clipped ratio plus ``beta`` times the k3 KL to the reference; RLOO's
   REINFORCE loss on the answer's log-probability. With ``target_kl`` GRPO's ``beta`` is
   adaptive: PPO's proportional controller (:class:`~mmgpt.rlhf.losses.AdaptiveKLController`)
   moves it after each rollout toward the target KL (nats per answer), since a fixed k3 weight
   that holds one reward model's policy near the reference lets another drift far.

:class:`GroupTrainer` is a :class:`~mmgpt.rlhf.ppo_trainer.PPOTrainer` without the value head
(and, but for GRPO with ``target_kl``, the KL controller): sampling settings, scoring, greedy evaluation, the reference policy (LoRA
adapters disabled, or a frozen copy) and everything of :class:`~mmgpt.trainer.Trainer`
(checkpoints, resume, metrics) are PPO's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mmgpt.data.sample import Sample
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.rlhf.data import collate_prompts
from mmgpt.rlhf.group import (
    GRPO_SCALES,
    as_groups,
    grpo_advantages,
    grpo_loss,
    rloo_advantages,
    rloo_loss,
)
from mmgpt.rlhf.guards import GuardConfig
from mmgpt.rlhf.losses import AdaptiveKLController, masked_mean
from mmgpt.rlhf.policy import ReferencePolicy, save_policy
from mmgpt.rlhf.ppo_trainer import EvalFn, FormatFn, PPOTrainer
from mmgpt.rlhf.reward_model import RewardModel
from mmgpt.rlhf.rollout import ResponseBatch, generate_responses, response_forward
from mmgpt.trainer import TrainConfig, Trainer

__all__ = [
    "GRPOConfig",
    "GRPOLoss",
    "GroupBatch",
    "GroupConfig",
    "GroupLoss",
    "GroupTrainer",
    "PolicyLogprobs",
    "RLOOConfig",
    "RLOOLoss",
]


@dataclass
class GroupConfig(GuardConfig):
    """Settings shared by GRPO and RLOO: sampling, reward shaping, optimisation epochs.

    The prompts of one rollout are ``train.batch_size × train.grad_accum_steps``, each answered
    ``samples_per_prompt`` times (the group); each rollout is one trainer step.
    """

    reward_model: str | None = None  # directory of a reward model (`mmgpt train reward`)
    # sampling
    samples_per_prompt: int = 4  # k: answers per prompt, the group (at least 2)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # optimisation over each rollout
    epochs: int = 1
    minibatch_size: int = 16
    # rewards
    normalize_reward: bool = True  # (score − mean) / std with the reward model's statistics
    reward_clip: float | None = None  # clip the (normalised) score to ±reward_clip
    missing_eos_penalty: float = 0.0  # subtracted from the score of answers cut off unfinished

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        k = self.samples_per_prompt
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(
                f"{name}.samples_per_prompt: group-relative advantages compare the answers to "
                f"one prompt, so at least 2 are needed; got {k!r}"
            )
        for field in ("max_new_tokens", "epochs", "minibatch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field}: expected a positive integer, got {value!r}")
        self._number("temperature", strict=True)
        self._number("missing_eos_penalty")
        if self.reward_clip is not None:
            self._number("reward_clip", strict=True)
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"{name}.top_k: expected an integer >= 1 or null, got {self.top_k!r}")
        if self.top_p is not None:
            self._number("top_p", strict=True)
        if not isinstance(self.normalize_reward, bool):
            raise ValueError(f"{name}.normalize_reward: expected true or false")

    def _number(self, field: str, *, strict: bool = False) -> None:
        value = getattr(self, field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0 or (strict and value == 0):
            bound = "> 0" if strict else ">= 0"
            raise ValueError(
                f"{type(self).__name__}.{field}: expected a number {bound}, got {value!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO: the clipped ratio over a few epochs, k3 KL penalty ``beta`` to the reference."""

    epochs: int = 2
    clip_range: float = 0.2
    clip_range_high: float | None = None  # DAPO's clip-higher upper bound; None: clip_range
    entropy_coef: float = 0.0  # subtracted entropy bonus (per token), against entropy collapse
    beta: float = 0.04  # coefficient of the k3 KL(π ‖ π_ref) in the loss (the start, adaptive)
    eps: float = 1e-4  # added to the reward std
    # the std advantages are divided by: "group" (each group's, the paper's), "batch" (the
    # rollout's: equally wrong answers that differ by reward-model noise keep small
    # advantages), "none"
    scale_rewards: str = "group"
    # adaptive beta: the KL (nats per answer) it steers to, as PPO's target_kl; None: fixed
    target_kl: float | None = None
    kl_horizon: int = 10000  # the controller's horizon (in answers)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._number("clip_range", strict=True)
        if self.clip_range_high is not None:
            self._number("clip_range_high", strict=True)
        self._number("entropy_coef")
        self._number("beta")
        self._number("eps", strict=True)
        if self.scale_rewards not in GRPO_SCALES:
            raise ValueError(
                f"GRPOConfig.scale_rewards: expected one of {', '.join(GRPO_SCALES)}, got "
                f"{self.scale_rewards!r}"
            )
        if self.target_kl is not None:
            self._number("target_kl", strict=True)
            if self.beta == 0:
                raise ValueError(
                    "GRPOConfig.beta: an adaptive beta (target_kl set) scales the starting "
                    "beta, so it must be > 0"
                )
        h = self.kl_horizon
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"GRPOConfig.kl_horizon: expected a positive integer, got {h!r}")


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO: REINFORCE with the leave-one-out baseline; ``kl_coef`` · log-ratio in the reward."""

    minibatch_size: int = 64
    kl_coef: float = 0.05  # the answer's reward: score − kl_coef · Σ_t (log π − log π_ref)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._number("kl_coef")


@dataclass
class GroupBatch(ResponseBatch):
    """A rollout of answer groups: PPO's :class:`~mmgpt.rlhf.rollout.ResponseBatch` with the
    reference's log-probabilities ``(B, R)``; ``advantages`` are one per answer, ``(B,)``."""

    ref_logprobs: Tensor | None = None

    def select(self, rows: Sequence[int] | Tensor) -> GroupBatch:
        rows = torch.as_tensor(rows, dtype=torch.long)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ResponseBatch)}
        base = ResponseBatch(**fields).select(rows)
        ref = self.ref_logprobs
        ref = None if ref is None else ref[rows.to(ref.device)]
        picked = {name: getattr(base, name) for name in fields}
        return GroupBatch(**picked, ref_logprobs=ref)


class PolicyLogprobs(nn.Module):
    """The policy as the trainer's model: ``forward(batch) → (logprobs, entropy)``, ``(B, R)``
    each, of the tempered distribution the rollouts sampled from. The policy stays in eval mode
    (no dropout), so the ratio π/π_old compares the function that produced the rollout."""

    def __init__(self, policy: nn.Module, *, temperature: float = 1.0) -> None:
        super().__init__()
        self.policy = policy
        self.temperature = temperature

    @property
    def device(self) -> torch.device:
        return self.policy.device

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def tied_weight_keys(self) -> list[str]:
        return [f"policy.{k}" for k in getattr(self.policy, "tied_weight_keys", [])]

    def train(self, mode: bool = True) -> PolicyLogprobs:
        super().train(mode)
        self.policy.eval()
        return self

    def forward(self, batch: ResponseBatch, *, with_entropy: bool = True) -> tuple[Tensor, ...]:
        scores = response_forward(
            self.policy, batch, with_entropy=with_entropy, temperature=self.temperature
        )
        return scores.logprobs, scores.entropy


class GroupLoss:
    """A group-relative objective's minibatch loss; ``config`` also drives its trainer."""

    name: ClassVar[str]
    config_class: ClassVar[type[GroupConfig]]

    def __init__(self, **settings: Any) -> None:
        known = sorted(f.name for f in dataclasses.fields(self.config_class))
        unknown = set(settings) - set(known)
        if unknown:
            close = [difflib.get_close_matches(k, known, n=1) for k in sorted(unknown)]
            hint = "".join(f" (did you mean {c[0]!r}?)" for c in close if c)
            raise ValueError(
                f"{self.name} objective: unknown setting(s) {sorted(unknown)}{hint}; known: "
                f"{', '.join(known)}"
            )
        self.config = self.config_class(**settings)

    def _forward(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, GroupBatch) or batch.advantages is None:
            raise ValueError(
                f"{self.name} objective: the batch carries no rollout statistics (advantages); "
                f"its batches come from GroupTrainer's rollouts"
            )
        logprobs, entropy = model(batch, with_entropy=True)
        return logprobs, entropy


class GRPOLoss(GroupLoss):
    """GRPO's minibatch loss (:func:`~mmgpt.rlhf.group.grpo_loss`). Metrics: ``loss``,
    ``clip_fraction``, ``k3_kl`` (per token, to the reference), ``entropy`` (per token)."""

    name = "grpo"
    config_class = GRPOConfig

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        # the k3 weight in use: config.beta, or the adaptive controller's latest (GroupTrainer)
        self.beta = self.config.beta

    def __call__(self, model: nn.Module, batch: GroupBatch) -> ObjectiveOutput:
        cfg = self.config
        logprobs, entropy = self._forward(model, batch)
        if batch.old_logprobs is None or batch.ref_logprobs is None:
            raise ValueError("grpo objective: the batch has no rollout or reference log-probs")
        mask = batch.response_mask
        loss, clip_fraction, kl = grpo_loss(
            logprobs,
            batch.old_logprobs,
            batch.ref_logprobs,
            batch.advantages,
            mask,
            cfg.clip_range,
            self.beta,
            cfg.clip_range_high,
        )
        mean_entropy = masked_mean(entropy, mask)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * mean_entropy
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "clip_fraction": float(clip_fraction),
                "k3_kl": float(kl),
                "entropy": float(mean_entropy.detach()),
            },
        )


class RLOOLoss(GroupLoss):
    """RLOO's minibatch loss (:func:`~mmgpt.rlhf.group.rloo_loss`). Metrics: ``loss``,
    ``entropy`` (per token)."""

    name = "rloo"
    config_class = RLOOConfig

    def __call__(self, model: nn.Module, batch: GroupBatch) -> ObjectiveOutput:
        logprobs, entropy = self._forward(model, batch)
        mask = batch.response_mask
        loss = rloo_loss(logprobs, batch.advantages, mask)
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "entropy": float(masked_mean(entropy, mask).detach()),
            },
        )


class GroupTrainer(PPOTrainer):
    """GRPO or RLOO on ``policy`` (a MultimodalGPT, optionally with LoRA) against
    ``reward_model``.

    Args:
        policy: the model to improve (usually an SFT model); saved to ``out_dir/model``.
        reward_model: a :class:`~mmgpt.rlhf.reward_model.RewardModel` (frozen here).
        prompts: a map-style dataset of prompts, as for :class:`PPOTrainer`.
        config: :class:`~mmgpt.trainer.TrainConfig`; ``max_steps`` counts rollouts.
        objective: the ``"grpo"`` or ``"rloo"`` objective (a :class:`GRPOLoss` or
            :class:`RLOOLoss`), or a :class:`GRPOConfig` / :class:`RLOOConfig`.
        eval_prompts: held-out prompts; ``evaluate`` reports the greedy answers' mean reward.
        eval_fn: ``(prompts, answers) -> metrics`` added to each evaluation.
        format_fn: ``(prompt, answer) -> bool``; answers it rejects lose ``format_penalty``.

    The reward-hacking guards (KL stop, format penalty, early stopping, the hacking detector)
    are PPO's: see :mod:`mmgpt.rlhf.ppo_trainer`.
    """

    def __init__(
        self,
        policy: nn.Module,
        reward_model: RewardModel,
        prompts: Any,
        config: TrainConfig | dict[str, Any],
        objective: GroupLoss | GroupConfig,
        *,
        eval_prompts: Any = None,
        out_dir: str | os.PathLike,
        eval_fn: EvalFn | None = None,
        format_fn: FormatFn | None = None,
    ) -> None:
        if isinstance(objective, GRPOConfig):
            objective = GRPOLoss(**objective.to_dict())
        elif isinstance(objective, RLOOConfig):
            objective = RLOOLoss(**objective.to_dict())
        if not isinstance(objective, GroupLoss):
            raise TypeError(f"objective: expected the grpo or rloo objective, got {objective!r}")
        self.group: GroupConfig = objective.config
        self.ppo = self.group  # the sampling settings PPOTrainer.generation_config reads
        # the reference is taken from the starting weights, before any step (or resume) changes them
        self.reference = ReferencePolicy(policy)
        Trainer.__init__(
            self,
            PolicyLogprobs(policy, temperature=self.group.temperature),
            objective,
            prompts,
            config,
            eval_data=eval_prompts,
            collate_fn=collate_prompts,
            out_dir=out_dir,
            save_model_fn=save_policy,
        )
        self.policy = policy
        self.reference.to(self.device)
        self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        self.eval_fn = eval_fn
        self._init_guards(format_fn)
        cfg = self.group
        self.kl_controller: AdaptiveKLController | None = None
        if isinstance(cfg, GRPOConfig) and cfg.target_kl is not None:
            self.kl_controller = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon)

    # the guards' state and GRPO's adaptive beta beyond the Trainer's own
    def _extra_state(self) -> dict[str, Any]:
        state = self._guard_state()
        if self.kl_controller is not None:
            state["kl_controller"] = self.kl_controller.state_dict()
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._load_guard_state(state)
        if self.kl_controller is not None and "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.objective.beta = self.kl_controller.beta

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sample]) -> tuple[GroupBatch, dict[str, float]]:
        """Sample and score groups of answers; ``prompts`` holds each prompt ``k`` times in a
        row. Attaches old and reference log-probs and one advantage per answer."""
        cfg = self.group
        k = cfg.samples_per_prompt
        sampled, answers, ended = generate_responses(self.policy, prompts, self.generation_config())
        batch = GroupBatch(sampled.prompt, sampled.response_ids, sampled.response_mask)
        batch = batch.to(self.device)
        raw, scores, guard_stats = self.shaped_scores(prompts, answers, ended)  # (B,) each

        self.wrapped_model.eval()
        logprobs, _ = self.wrapped_model(batch, with_entropy=False)  # (B, R)
        with self.reference.active() as reference:
            ref_logprobs = response_forward(
                reference, batch, temperature=cfg.temperature
            ).logprobs  # (B, R)
        mask = batch.response_mask
        sequence_kl = ((logprobs - ref_logprobs) * mask).sum(-1)  # (B,) log π(y) − log π_ref(y)
        if isinstance(cfg, RLOOConfig):
            rewards = scores - cfg.kl_coef * sequence_kl
            advantages = rloo_advantages(as_groups(rewards, k)).flatten()  # (B,)
        else:
            assert isinstance(cfg, GRPOConfig)
            rewards = scores
            advantages = grpo_advantages(
                as_groups(rewards, k), cfg.eps, cfg.scale_rewards
            ).flatten()  # (B,)
        batch.old_logprobs, batch.ref_logprobs, batch.advantages = (
            logprobs,
            ref_logprobs,
            advantages,
        )
        groups = as_groups(raw.float(), k)  # (G, k)
        stats = {
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()),
            "group_reward_std": float(groups.std(dim=1).mean()),  # spread within a prompt
            "score": float(scores.mean()),
            "kl": float(sequence_kl.mean()),
            "response_length": float(batch.lengths.mean()),
            "ended_with_eos": float(torch.tensor(ended, dtype=torch.float).mean()),
            "ref_logp": float(masked_mean(ref_logprobs, mask)),
            **guard_stats,
        }
        if isinstance(self.objective, GRPOLoss):
            stats["beta"] = self.objective.beta  # the k3 weight of this rollout's updates
        return batch, stats

    @property
    def update_epochs(self) -> int:
        return self.group.epochs

    def _after_update(self, batch: Any, stats: dict[str, float], epochs: int) -> None:
        """GRPO with ``target_kl``: the next rollout's beta from this one's KL (per answer)."""
        if self.kl_controller is not None:
            self.objective.beta = self.kl_controller.update(stats["kl"], len(batch))
