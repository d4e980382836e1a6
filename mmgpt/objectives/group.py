"""GRPO (objective ``"grpo"``) and RLOO (objective ``"rloo"``): group-relative RLHF.

Each prompt of a rollout is answered ``samples_per_prompt`` (k ≥ 2) times and the reward
model scores every answer; an answer's advantage is measured against the other answers to the
same prompt, so unlike PPO no value model is trained:

* GRPO: ``A = (r − mean_group) / (std_group + eps)``; loss = PPO's clipped surrogate on every
  answer token + ``beta`` · k3 KL(π ‖ π_ref), over ``epochs`` passes of the rollout.
* RLOO: ``A = r − mean of the other k − 1 rewards`` with ``r = score − kl_coef · (log π −
  log π_ref)`` summed over the answer; loss = ``−A · log π(answer)`` (REINFORCE).

The mathematics is :mod:`mmgpt.rlhf.group`; the rollouts, scoring and optimisation loop are
:class:`~mmgpt.rlhf.group_trainer.GroupTrainer` (PPO's trainer without the value head). This
module registers the losses with the trainer they build.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mmgpt.registry import register
from mmgpt.rlhf import prompts as _prompts  # noqa: F401  (registers the "prompts" dataset)
from mmgpt.rlhf.group_trainer import GroupTrainer, GRPOConfig, GRPOLoss, RLOOConfig, RLOOLoss
from mmgpt.rlhf.reward_model import RewardModel

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.trainer import TrainConfig

__all__ = ["GRPOConfig", "GRPOObjective", "RLOOConfig", "RLOOObjective"]


def _build(
    objective: GRPOLoss | RLOOLoss,
    model: MultimodalGPT,
    train_data: Dataset,
    config: TrainConfig | dict[str, Any],
    eval_data: Dataset | None,
    out_dir: str | os.PathLike,
) -> GroupTrainer:
    if not objective.config.reward_model:
        raise ValueError(
            f"{objective.name} objective: no reward model; set objective.reward_model=DIR (or "
            "pass --reward-model DIR) to a directory written by `mmgpt train reward`"
        )
    reward_model = RewardModel.from_pretrained(objective.config.reward_model)
    return GroupTrainer(
        model, reward_model, train_data, config, objective, eval_prompts=eval_data, out_dir=out_dir
    )


@register("objective", "grpo")
class GRPOObjective(GRPOLoss):
    """GRPO's minibatch loss with its settings (:class:`GRPOConfig`), and the
    :class:`~mmgpt.rlhf.group_trainer.GroupTrainer` that runs it."""

    def build_trainer(
        self,
        model: MultimodalGPT,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> GroupTrainer:
        """A GroupTrainer for ``model`` on prompts ``train_data``, against ``reward_model``."""
        return _build(self, model, train_data, config, eval_data, out_dir)


@register("objective", "rloo")
class RLOOObjective(RLOOLoss):
    """RLOO's minibatch loss with its settings (:class:`RLOOConfig`), and the
    :class:`~mmgpt.rlhf.group_trainer.GroupTrainer` that runs it."""

    def build_trainer(
        self,
        model: MultimodalGPT,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> GroupTrainer:
        """A GroupTrainer for ``model`` on prompts ``train_data``, against ``reward_model``."""
        return _build(self, model, train_data, config, eval_data, out_dir)
