"""RLHF building blocks shared by the reward, PPO and DPO objectives.

These are written here rather than taken from a library because the widely used RLHF
libraries assume a text-only causal LM with a Hugging Face interface; mmgpt's policies take
images and text through MultimodalGPT, so the objectives work on our own log-probabilities.
"""

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

__all__ = [
    "AdaptiveKLController",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "masked_mean",
    "masked_whiten",
    "sequence_logprobs",
    "token_logprobs",
]
