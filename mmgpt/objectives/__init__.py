"""Training objectives: each module registers one entry of kind ``objective``."""

from mmgpt.objectives import (  # noqa: F401  (RLHF)
    contrastive,
    diffusion,
    dpo,
    group,
    lm,
    ppo,
    reward,
    sft,
    tagging,
)
