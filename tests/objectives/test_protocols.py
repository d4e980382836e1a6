"""Objectives honour the contracts in mmgpt.interfaces."""

from __future__ import annotations

from mmgpt.interfaces import BuildsTrainer, Objective
from mmgpt.registry import create, names


def test_exactly_the_rlhf_contrastive_and_tagging_objectives_build_their_own_trainer() -> None:
    # `mmgpt train` falls back to the standard Trainer for an objective without
    # build_trainer: a renamed method would silently skip the reward head, DPO's cached
    # reference, the PPO, GRPO and RLOO loops, the contrastive towers, the tagging heads or
    # the autoencoder's image batches
    built = {name: create("objective", name) for name in names("objective")}
    assert all(isinstance(objective, Objective) for objective in built.values())
    own = {n for n, o in built.items() if isinstance(o, BuildsTrainer)}
    assert own == {"autoencoder", "contrastive", "dpo", "grpo", "ppo", "reward", "rloo", "tagging"}
