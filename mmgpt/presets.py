"""Model presets as registry entries of kind ``model``."""

from __future__ import annotations

from mmgpt.config import GPT_PRESETS, gpt_config
from mmgpt.registry import register

for _name in GPT_PRESETS:
    register("model", _name, lambda _n=_name, **overrides: gpt_config(_n, **overrides))
