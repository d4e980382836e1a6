"""mmgpt: multimodal GPT models with plugin modalities.

``import mmgpt`` is light: torch and the heavy extras are imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmgpt.registry import create, get, names, register

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mmgpt.config import GPTConfig
    from mmgpt.model import GPT

_LAZY = {
    "GPT": "mmgpt.model",
    "GPTConfig": "mmgpt.config",
    "KVCache": "mmgpt.model",
    "MultimodalGPT": "mmgpt.multimodal",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmgpt' has no attribute {name!r}")


__all__ = ["GPT", "GPTConfig", "__version__", "create", "get", "names", "register"]
