"""Training objectives: each module registers one entry of kind ``objective``."""

from mmgpt.objectives import (
    diffusion,  # noqa: F401
    lm,  # noqa: F401
    sft,  # noqa: F401
)
from mmgpt.objectives import dpo, ppo, reward  # noqa: F401  (RLHF)
