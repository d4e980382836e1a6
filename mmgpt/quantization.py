"""Weight-only quantised models: int8 (one scale per output row) or int4 (a scale and a
minimum per group of input features, packed two per byte), for inference.

:func:`quantize_model` replaces the Linear layers of a GPT's blocks, and its LM head when
by :class:`~mmgpt.adapters.int8.Int8Linear` or :class:`~mmgpt.adapters.int4.Int4Linear`; in
a multimodal model only the GPT inside it is quantised (encoders, projectors and decoders stay
float: they are a small share of the weights and the image paths are sensitive to them).
Embeddings and norms stay float.

An LM head tied to the token embeddings is quantised too: the head becomes a quantised copy
of the shared table, and the embedding keeps its float table. The head's matmul streams the
whole table every decoded token, where the embedding looks up one row, so only the head gains
from fewer bytes; a float lookup also keeps the input embeddings exact. The copy costs one
byte (int8) or half a byte (int4) per table entry beside the float table. The tie is not lost
on disk: ``model.safetensors`` holds the float table once (``transformer.wte.weight``) and the
head's ``qweight`` and scales under ``lm_head``, and the loader rebuilds the tied model before
swapping the head (``config.json`` still says ``tie_embeddings``). A quantised model is for
inference only (training refuses it, :mod:`mmgpt.adapters.training`), so the copy cannot
drift from the table.

A quantised model saves as an ordinary model directory (:mod:`mmgpt.weights`): its
``model.safetensors`` holds each quantised layer's ``qweight`` and scales under the layer's
name, and ``config.json`` records the quantisation::

    "quantization": {"method": "int4", "group_size": 128, "modules": ["transformer.h.0.attn.c_attn", ...]}

The loaders build the float model, swap the recorded modules for empty quantised layers
(:func:`prepare_quantized`) and load the file into them: ``GPT.from_pretrained``,
``mmgpt.pretrained.load_model``, and through them ``mmgpt generate``, ``eval`` and ``demo``.
``mmgpt quantize`` (:func:`mmgpt.pretrained.quantize_directory`) writes such a directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from mmgpt.adapters.quantized import (
    QUANTIZED_LINEARS,
    check_method,
    empty_quantized_linear,
    is_quantized,
    quantize_linear,
)

__all__ = [
    "QUANTIZATION_KEY",
    "is_quantized",
    "prepare_quantized",
    "quantization_record",
    "quantize_model",
    "quantized_modules",
]

QUANTIZATION_KEY = "quantization"  # the record in config.json
# The decoder's Linears (a bare GPT's, or "gpt." inside a multimodal model) and its LM head.
_DECODER_LINEAR = re.compile(r"(gpt\.)?(transformer\.h\.\d+\..+|lm_head)")


def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears :func:`quantize_model` replaces: the decoder's and its LM head (a tied
    head too: module docstring)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and _DECODER_LINEAR.fullmatch(name)
    ]


def quantize_model(model: nn.Module, method: str, group_size: int | None = None) -> dict[str, Any]:
    """Quantise ``model`` (a GPT, or a multimodal model's GPT) in place; returns the
    ``config.json`` record (:data:`QUANTIZATION_KEY`).

    ``method``: ``"int8"`` or ``"int4"``; ``group_size``: int4 only, one of 32, 64, 128, 256
    dividing every quantised layer's input width (default 128).
    """
    group_size = check_method(method, group_size)
    if is_quantized(model):
        raise ValueError("model (--model) is already quantised; quantise its float original")
    if getattr(model, "peft_config", None):
        raise ValueError(
            "model (--model) has adapters: fold them into the weights first "
            "(mmgpt.adapters.fold_adapters; mmgpt quantize does it)"
        )
    targets = _targets(model)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no decoder Linear layers to quantise "
            "(expected a GPT or a multimodal model holding one)"
        )
    layers = {name: quantize_linear(linear, method, group_size, name) for name, linear in targets}
    for name, layer in layers.items():  # swapped only once every layer quantised cleanly
        _replace(model, name, layer)
    return quantization_record(model)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the quantised Linears of ``model`` outside LoRA layers."""
    kinds = tuple(QUANTIZED_LINEARS.values())
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, kinds) and not name.endswith("base_layer")
    }


def quantization_record(model: nn.Module) -> dict[str, Any] | None:
    """What ``config.json`` records of ``model``'s quantisation; ``None`` when it has none."""
    layers = quantized_modules(model)
    if not layers:
        return None
    methods = {layer.method for layer in layers.values()}
    groups = {getattr(layer, "group_size", None) for layer in layers.values()}
    if len(methods) > 1 or len(groups) > 1:
        raise ValueError(
            f"cannot record a model quantised several ways ({sorted(methods)}, group sizes "
            f"{sorted(groups, key=str)}); quantise it with one method"
        )
    return {"method": methods.pop(), "group_size": groups.pop(), "modules": sorted(layers)}


def prepare_quantized(
    model: nn.Module, record: Mapping[str, Any], source: str | os.PathLike
) -> nn.Module:
    """Swap the modules ``record`` names (a ``config.json`` record, read from ``source``) for
    empty quantised layers of the same shapes, ready for the quantised state dict."""
    if not isinstance(record, Mapping) or not isinstance(record.get("modules"), list):
        raise ValueError(
            f"{source}: '{QUANTIZATION_KEY}' must be an object with 'method', 'group_size' and "
            f"a list of 'modules', got {record!r}"
        )
    try:
        group_size = check_method(record.get("method"), record.get("group_size"))
    except ValueError as exc:
        raise ValueError(f"{source}: '{QUANTIZATION_KEY}': {exc}") from None
    for name in record["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if type(linear) is not nn.Linear:
            raise ValueError(
                f"{source}: '{QUANTIZATION_KEY}' names {name!r}, which is not a Linear layer "
                "of this model; the config does not belong to these weights"
            )
        try:
            layer = empty_quantized_linear(
                record["method"],
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                linear.weight.dtype,
                group_size,
            )
        except ValueError as exc:
            raise ValueError(f"{source}: '{QUANTIZATION_KEY}' of {name!r}: {exc}") from None
        _replace(model, name, layer)
    return model


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
