"""PPO (objective ``"ppo"``): clipped policy and value losses on a minibatch of a rollout.

The loss of one minibatch of sampled answers (a :class:`~mmgpt.rlhf.rollout.ResponseBatch`
carrying the rollout's log-probabilities, values, advantages and returns) is

    L = clip-surrogate(π/π_old, A) + vf_coef · ½ max((V − R)², (clip(V) − R)²) − ent_coef · H

with the per-token math of :mod:`mmgpt.rlhf.losses`. Everything else of PPO — sampling the
rollouts, the per-token KL penalty ``−β (log π − log π_ref)`` plus the reward model's score on
the last token, the adaptive β, GAE, advantage whitening and the minibatch epochs — is the
loop of :class:`~mmgpt.rlhf.ppo_trainer.PPOTrainer`, which reads its settings from this
objective's :class:`~mmgpt.rlhf.ppo.PPOConfig` (one recipe section holds them all). The loss
and its settings live in :mod:`mmgpt.rlhf.ppo`; this module registers them with the trainer
they build.

The policy reads images (a :class:`~mmgpt.multimodal.MultimodalGPT`); RLHF libraries such as
TRL assume text-only causal LMs, so mmgpt computes PPO on its own log-probabilities.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mmgpt.registry import register
from mmgpt.rlhf import prompts as _prompts  # noqa: F401  (registers the "prompts" dataset)
from mmgpt.rlhf.ppo import PPOConfig, PPOLoss
from mmgpt.rlhf.ppo_trainer import PPOTrainer
from mmgpt.rlhf.reward_model import RewardModel

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.trainer import TrainConfig

__all__ = ["PPOConfig", "PPOObjective"]


@register("objective", "ppo")
class PPOObjective(PPOLoss):
    """PPO's minibatch loss (:class:`~mmgpt.rlhf.ppo.PPOLoss`) with its settings
    (:class:`PPOConfig`), and the :class:`~mmgpt.rlhf.ppo_trainer.PPOTrainer` that runs it."""

    def build_trainer(
        self,
        model: MultimodalGPT,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> PPOTrainer:
        """A :class:`~mmgpt.rlhf.ppo_trainer.PPOTrainer` for ``model`` on prompts ``train_data``,
        against the reward model at ``reward_model``."""
        if not self.config.reward_model:
            raise ValueError(
                "ppo objective: no reward model; set objective.reward_model=DIR (or pass "
                "--reward-model DIR) to a directory written by `mmgpt train reward`"
            )
        reward_model = RewardModel.from_pretrained(self.config.reward_model)
        return PPOTrainer(
            model, reward_model, train_data, config, self, eval_prompts=eval_data, out_dir=out_dir
        )
