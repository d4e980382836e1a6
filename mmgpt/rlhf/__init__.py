"""RLHF for multimodal models: reward models, PPO with KL control, DPO/IPO.

These are written here rather than taken from a library because the widely used RLHF
libraries assume a text-only causal LM with a Hugging Face interface; mmgpt's policies take
images and text through MultimodalGPT, so the objectives work on our own log-probabilities.

- :mod:`mmgpt.rlhf.losses` — the mathematics (Bradley-Terry, GAE, clipped losses, DPO/IPO,
  the adaptive KL controller), checked against hand computations.
- :mod:`mmgpt.rlhf.data` — preference batches (chosen + rejected, with images) and prompts.
- :mod:`mmgpt.rlhf.reward_model` — :class:`RewardModel`.
- :mod:`mmgpt.rlhf.policy` — answer log-probabilities and the reference policy.
- :mod:`mmgpt.rlhf.reference` — DPO's cached reference log-probabilities.
- :mod:`mmgpt.rlhf.ppo` — PPO's settings and minibatch loss (:class:`PPOConfig`,
  :class:`PPOLoss`); :mod:`mmgpt.rlhf.rollout` / :mod:`mmgpt.rlhf.ppo_trainer` — its loop
  (:class:`PPOTrainer`).
- :mod:`mmgpt.rlhf.guards` — guards against reward hacking shared by PPO, GRPO and RLOO: the
  hard KL stop, format penalty, early stopping and :class:`RewardHackingDetector`.
- :mod:`mmgpt.rlhf.prompts` — the ``"prompts"`` dataset; :mod:`mmgpt.rlhf.shapes` — shapes-world
  preference pairs and ranked reward-model data (with a policy's own samples).
"""

from mmgpt.rlhf.data import ImageOutputPair, PreferenceBatch, PreferenceCollator, as_prompt
from mmgpt.rlhf.guards import EarlyStopping, GuardConfig, RewardHackingDetector
from mmgpt.rlhf.losses import (
    AdaptiveKLController,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_whiten,
    sequence_logprobs,
    token_logprobs,
)
from mmgpt.rlhf.policy import ReferencePolicy, save_policy, sequence_logps
from mmgpt.rlhf.ppo import PPOConfig, PPOLoss
from mmgpt.rlhf.ppo_trainer import PPOTrainer
from mmgpt.rlhf.reward_model import RewardModel, reward_statistics

__all__ = [
    "AdaptiveKLController",
    "EarlyStopping",
    "GuardConfig",
    "ImageOutputPair",
    "PPOConfig",
    "PPOLoss",
    "PPOTrainer",
    "PreferenceBatch",
    "PreferenceCollator",
    "ReferencePolicy",
    "RewardHackingDetector",
    "RewardModel",
    "as_prompt",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "masked_mean",
    "masked_whiten",
    "reward_statistics",
    "save_policy",
    "sequence_logprobs",
    "sequence_logps",
    "token_logprobs",
]
