"""Lazy access to the optional ``diffusers`` dependency.

``import mmgpt_diffusion`` only needs torch, so that the registry can list the decoder (and
mmgpt keeps working) on an install without the ``diffusion`` extra. diffusers is imported
the first time a decoder is built.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install "mmgpt[diffusion]"'


def require_diffusers() -> ModuleType:
    """Import and return ``diffusers``; a missing install says which extra to add."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as exc:
        raise ImportError(
            f"the diffusion image decoder needs the 'diffusers' package, which is not "
            f"installed ({exc}); install it with: {INSTALL_HINT}"
        ) from exc
