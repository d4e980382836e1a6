"""The ``adapter`` section of a recipe: which adapter a training run puts on its model.

::

    adapter:
      method: lora          # lora | dora | none (default: none, full training)
      r: 8
      alpha: 16
      dropout: 0.0
      targets: decoder      # components (decoder, decoder_attention, decoder_mlp, vit,
                            # projector, output_projector, unet) or regexes; list or a,b,c
      train_extra: []       # modules trained in full beside the adapter (e.g. projector)
      name: default         # the adapter's name: model_dir/adapters/<name>/

``mmgpt train RECIPE --adapter lora`` is ``adapter.method=lora``; ``adapter=lora`` works too.
The recipe builds (or loads) the base model, then :func:`apply_adapter` injects the adapter
and freezes everything else, then the Trainer optimises what still requires gradients.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from mmgpt.adapters.directory import has_adapters
from mmgpt.adapters.lora import AdapterConfig, add_adapter, fold_adapters

__all__ = ["ADAPTER_KEYS", "adapter_section", "apply_adapter", "fold_loaded_adapters"]

ADAPTER_KEYS = ("method", "r", "alpha", "dropout", "targets", "train_extra", "name")
METHODS = ("lora", "dora")
NO_ADAPTER = ("none", "full")  # method values that mean: no adapter, train in full


def adapter_section(value: Any) -> dict[str, Any]:
    """The section as a mapping: ``"lora"`` → ``{"method": "lora"}``, ``None`` → ``{}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"method": value}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"recipe section 'adapter' must be a method name (lora, dora) or a mapping of "
            f"{', '.join(ADAPTER_KEYS)}; got {value!r}"
        )
    unknown = sorted(set(value) - set(ADAPTER_KEYS))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), ADAPTER_KEYS, n=1)
        hint = f" (did you mean adapter.{close[0]}?)" if close else ""
        raise ValueError(
            f"unknown recipe key 'adapter.{unknown[0]}'{hint}; valid keys of 'adapter': "
            f"{', '.join(ADAPTER_KEYS)}"
        )
    return dict(value)


def apply_adapter(model: nn.Module, section: Any) -> str | None:
    """Inject the adapter ``section`` describes; return its name (``None``: no adapter).

    Only the adapter's weights and ``train_extra`` modules require gradients afterwards.
    """
    section = adapter_section(section)
    method = section.get("method")
    if method is None or method in NO_ADAPTER:
        extra = sorted(k for k in section if k != "method")
        if extra:
            raise ValueError(
                f"recipe keys {', '.join('adapter.' + k for k in extra)} need an adapter: "
                "set adapter.method=lora (or --adapter lora)"
            )
        return None
    if method not in METHODS:
        raise ValueError(
            f"recipe key 'adapter.method' must be one of {', '.join(METHODS + NO_ADAPTER)}, "
            f"got {method!r}"
        )
    args = {k: v for k, v in section.items() if k != "name"}
    name = section.get("name") or "default"
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(
            f"recipe key 'adapter.name' must be a plain name (letters, digits, - and _), "
            f"got {name!r}"
        )
    try:
        config = AdapterConfig(**args)
        add_adapter(model, config, name)
    except ValueError as exc:
        raise ValueError(f"recipe section 'adapter': {exc}") from exc
    return name


def fold_loaded_adapters(model: nn.Module) -> nn.Module:
    """A model loaded from a directory with adapters (``model.from`` of a LoRA run), with its
    active adapter folded into the weights: the base the new run starts from."""
    if has_adapters(model):
        fold_adapters(model)
    return model
