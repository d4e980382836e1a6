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
      quantize: none        # int8 | int4 | nf4: a quantised frozen base under the adapter
                            # (QLoRA; nf4 is the QLoRA paper's 4-bit NormalFloat)
      group_size: 128       # int4 and nf4: input features per scale (32, 64, 128, 256;
                            # default 128 for int4, 64 for nf4)

``mmgpt train RECIPE --adapter lora`` is ``adapter.method=lora``; ``adapter=lora`` works too.
The recipe builds (or loads) the base model, then :func:`apply_adapter` injects the adapter
and freezes everything else, then the Trainer optimises what still requires gradients.

With ``quantize``, the adapted layers' frozen weights are then quantised
(:func:`mmgpt.adapters.quantize.quantize_base`); their float values are first written to
``OUT/float_base.safetensors``, which becomes the base weights of the final model directory
(``OUT/model``: the float base plus the adapter, as a float LoRA run writes it), so the run
never holds the float base in memory again.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from mmgpt.adapters.directory import has_adapters
from mmgpt.adapters.lora import AdapterConfig, add_adapter, fold_adapters
from mmgpt.adapters.quantize import check_quantization, quantize_base
from mmgpt.adapters.quantized import is_quantized

__all__ = [
    "ADAPTER_KEYS",
    "FLOAT_BASE_NAME",
    "adapter_section",
    "apply_adapter",
    "fold_loaded_adapters",
]

ADAPTER_KEYS = (
    "method",
    "r",
    "alpha",
    "dropout",
    "targets",
    "train_extra",
    "name",
    "quantize",
    "group_size",
)
FLOAT_BASE_NAME = "float_base.safetensors"  # in the run's folder, with adapter.quantize
METHODS = ("lora", "dora")
NO_ADAPTER = ("none", "full")  # method values that mean: no adapter, train in full
NO_QUANTIZATION = (None, "none", False)


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


def apply_adapter(
    model: nn.Module, section: Any, *, out_dir: str | os.PathLike | None = None
) -> str | None:
    """Inject the adapter ``section`` describes; return its name (``None``: no adapter).

    Only the adapter's weights and ``train_extra`` modules require gradients afterwards.
    ``adapter.quantize`` then quantises the frozen base, keeping its float weights in
    ``out_dir/float_base.safetensors`` (the final model directory's base).
    """
    section = adapter_section(section)
    if is_quantized(model):  # its quantised layers have no parameters: nothing would train
        raise ValueError(
            "model.from is a quantised model (mmgpt quantize); train from its float original "
            "(for a quantised base under an adapter: adapter.quantize=int8|int4|nf4)"
        )
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
    quantize = section.get("quantize")
    quantize = None if quantize in NO_QUANTIZATION else quantize
    if quantize is None and section.get("group_size") is not None:
        raise ValueError("recipe key 'adapter.group_size' needs adapter.quantize=int4 or nf4")
    if quantize is not None:
        try:
            check_quantization(quantize, section.get("group_size"))
        except ValueError as exc:
            raise ValueError(f"recipe key 'adapter.quantize': {exc}") from None
        if out_dir is None:
            raise ValueError("adapter.quantize needs the run's folder for the float base weights")
    args = {k: v for k, v in section.items() if k not in ("name", "quantize", "group_size")}
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
    if quantize is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        try:
            quantize_base(
                model,
                quantize,
                section.get("group_size"),
                float_base=Path(out_dir) / FLOAT_BASE_NAME,
            )
        except ValueError as exc:  # e.g. a group size that does not divide a layer's width
            raise ValueError(f"recipe section 'adapter': {exc}") from exc
    return name


def fold_loaded_adapters(model: nn.Module) -> nn.Module:
    """A model loaded from a directory with adapters (``model.from`` of a LoRA run), with its
    active adapter folded into the weights: the base the new run starts from."""
    if has_adapters(model):
        fold_adapters(model)
    return model
