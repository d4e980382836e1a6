"""Guards against reward hacking in RL from a learned reward (PPO, GRPO, RLOO).

A learned reward model is right only near the answers it was trained on; a policy that climbs
its score can leave that region and find answers the reward model overrates ("a small blue
right" scoring above the right caption). The guards here keep an RL run honest:

- :class:`GuardConfig` — settings shared by the PPO and group configs: ``kl_stop`` (a hard
  stop when a rollout's KL to the reference exceeds it), ``format_penalty`` (subtracted from
  the score of answers the trainer's ``format_fn`` rejects), early stopping on a held-out
  metric (``early_stop_metric``, ``early_stop_patience``, ``restore_best``) and the
  thresholds of the hacking detector;
- :class:`RewardHackingDetector` — at each evaluation, compares the held-out reward, quality
  metric and reference log-likelihood with the evaluation where quality was best (or the
  first one): the reward rising while quality or the reference's log-likelihood of the
  answers falls is the signature of hacking;
- :class:`EarlyStopping` — tracks the best value of the held-out metric and how many
  evaluations passed without improving it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["EarlyStopping", "GuardConfig", "RewardHackingDetector"]


def _check_number(owner: str, name: str, value: Any, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (strict and value == 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{owner}.{name}: expected a number {bound}, got {value!r}")


@dataclass
class GuardConfig:
    """Reward-hacking guards (a base of :class:`~mmgpt.rlhf.ppo.PPOConfig` and
    :class:`~mmgpt.rlhf.group_trainer.GroupConfig`)."""

    # hard KL stop: a rollout whose KL(π ‖ π_ref) (nats per answer) exceeds it is not trained
    # on and ends the run; null: no stop
    kl_stop: float | None = None
    # subtracted from the score of answers the trainer's format_fn rejects (0: no check)
    format_penalty: float = 0.0
    # early stopping on a held-out metric (a key of the evaluation, higher is better, e.g. an
    # eval_fn's "exact_match" or "ref_logp"); null: none
    early_stop_metric: str | None = None
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0: never
    restore_best: bool = True  # save the policy of the best evaluation, not the last
    # hacking detector: the reward rose while the quality metric fell by more than
    # hack_quality_drop, or the reference's per-token log-likelihood of the greedy answers by
    # more than hack_ref_logp_drop nats
    hack_quality_drop: float = 0.02
    hack_ref_logp_drop: float = 0.5

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.kl_stop is not None:
            _check_number(owner, "kl_stop", self.kl_stop, strict=True)
        for name in ("format_penalty", "hack_quality_drop", "hack_ref_logp_drop"):
            _check_number(owner, name, getattr(self, name))
        if self.early_stop_metric is not None and (
            not isinstance(self.early_stop_metric, str) or not self.early_stop_metric
        ):
            raise ValueError(
                f"{owner}.early_stop_metric: expected the name of an evaluation metric or "
                f"null, got {self.early_stop_metric!r}"
            )
        patience = self.early_stop_patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(
                f"{owner}.early_stop_patience: expected an integer >= 0, got {patience!r}"
            )
        if not isinstance(self.restore_best, bool):
            raise ValueError(f"{owner}.restore_best: expected true or false")


@dataclass
class _Point:
    step: int
    reward: float
    quality: float | None
    ref_logp: float | None


class RewardHackingDetector:
    """Flags evaluations where the reward rose while quality or plausibility fell.

    The reference point is the evaluation with the best ``quality`` so far (the first
    evaluation when there is no quality metric, or while quality has not improved). An
    evaluation is flagged when its reward is above the reference point's and its quality is
    more than ``quality_drop`` below it, or the reference model's mean per-token
    log-probability of its answers more than ``ref_logp_drop`` nats below it — answers the
    starting policy finds implausible that the reward model nonetheless likes better.
    """

    def __init__(self, quality_drop: float = 0.02, ref_logp_drop: float = 0.5) -> None:
        self.quality_drop = quality_drop
        self.ref_logp_drop = ref_logp_drop
        self.reference: _Point | None = None
        self.warnings = 0

    def update(
        self, step: int, reward: float, quality: float | None = None, ref_logp: float | None = None
    ) -> list[str]:
        """Record one evaluation; returns the reasons it looks like hacking (empty: fine)."""
        point = _Point(step, reward, quality, ref_logp)
        ref = self.reference
        if ref is None:
            self.reference = point
            return []
        reasons: list[str] = []
        if reward > ref.reward:
            if (
                quality is not None
                and ref.quality is not None
                and quality < ref.quality - self.quality_drop
            ):
                reasons.append(
                    f"reward {ref.reward:.2f} -> {reward:.2f} while quality "
                    f"{ref.quality:.3f} -> {quality:.3f} (since step {ref.step})"
                )
            if (
                ref_logp is not None
                and ref.ref_logp is not None
                and ref_logp < ref.ref_logp - self.ref_logp_drop
            ):
                reasons.append(
                    f"reward {ref.reward:.2f} -> {reward:.2f} while the reference's "
                    f"log-likelihood {ref.ref_logp:.2f} -> {ref_logp:.2f} nats/token "
                    f"(since step {ref.step})"
                )
        if quality is not None and (ref.quality is None or quality > ref.quality):
            self.reference = point
        self.warnings += bool(reasons)
        return reasons

    def state_dict(self) -> dict[str, Any]:
        ref = self.reference
        return {"reference": None if ref is None else vars(ref).copy(), "warnings": self.warnings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ref = state.get("reference")
        self.reference = None if ref is None else _Point(**ref)
        self.warnings = int(state.get("warnings", 0))


class EarlyStopping:
    """The best value of a held-out metric (higher is better) and the evaluations since."""

    def __init__(self, metric: str, patience: int = 0) -> None:
        self.metric = metric
        self.patience = patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.metric not in metrics:
            known = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
            raise ValueError(
                f"early_stop_metric {self.metric!r} is not among the evaluation's metrics "
                f"({known}); name one of them, or add it with eval_fn"
            )
        value = float(metrics[self.metric])
        if self.best is None or value > self.best:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
            return True
        self.bad_evaluations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_evaluations = int(state.get("bad", 0))
