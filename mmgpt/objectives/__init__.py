"""Training objectives: each module registers one entry of kind ``objective``."""

from mmgpt.objectives import lm  # noqa: F401
