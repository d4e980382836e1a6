"""The files of a model directory, for any model class: weights, adapters, ``config.json``.

Both model classes (``GPT`` and ``MultimodalGPT``) save and load through these two functions,
so a model directory is written and read one way::

    config.json          the model's config (+ an "adapters" record when it has adapters)
    model.safetensors    the weights; with adapters, the BASE weights (adapters stripped)
    adapters/<name>/     each adapter in peft's format (see mmgpt.adapters.directory)

A weight-only quantised model (mmgpt.quantization) stores its quantised tensors and records
them in config.json's "quantization"; a quantised base under LoRA saves its FLOAT base.

Before any weight is allocated, :func:`check_weights_file` compares the tensor shapes a config
implies with the safetensors header, so a damaged or mismatched ``config.json`` is reported by
name instead of allocating a huge model first. Which class a directory holds is decided by
:mod:`mmgpt.pretrained`, the only module that dispatches on ``architecture``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgpt.adapters.directory import CONFIG_KEY, AdapterChoice, load_adapters, save_model_adapters
from mmgpt.adapters.lora import base_state_dict
from mmgpt.adapters.quantize import copy_float_base
from mmgpt.adapters.quantized import is_quantized
from mmgpt.config import CONFIG_NAME, WEIGHTS_NAME
from mmgpt.files import load_tensors, read_safetensors_header, save_json, save_tensors
from mmgpt.quantization import QUANTIZATION_KEY, prepare_quantized, quantization_record

__all__ = [
    "check_weights_file",
    "load_model_files",
    "load_model_state",
    "model_state_dict",
    "save_model_files",
]


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied aliases (stored once, re-tied on load)."""
    tied = set(getattr(model, "tied_weight_keys", []))
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load that names missing/unexpected keys and the file they came from."""
    tied = set(getattr(model, "tied_weight_keys", []))
    expected = set(model.state_dict()) - tied
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - tied)
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model: missing {missing[:8]}"
            f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'…' if len(unexpected) > 8 else ''}"
        )
    for k, v in state.items():
        target = model.state_dict()[k]
        if target.shape != v.shape:
            raise ValueError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(target.shape)}"
            )
    model.load_state_dict(state, strict=False)


def check_weights_file(
    expected: dict[str, tuple[int, ...]], path: str | os.PathLike, config_path: str | os.PathLike
) -> None:
    """Compare the shapes a config implies (``expected``: name → shape) with the header of the
    safetensors file ``path``, before any tensor is allocated; a mismatch names the tensor,
    both shapes and the config file to check."""
    path = Path(path)
    header = read_safetensors_header(path)
    for name, shape in expected.items():
        info = header.get(name)
        if not isinstance(info, dict):
            continue  # a missing tensor is named by load_model_state, with every other one
        stored = tuple(info.get("shape", ()))
        if stored != tuple(shape):
            raise ValueError(
                f"{config_path}: describes a model whose {name!r} has shape {tuple(shape)}, "
                f"but {path} stores {stored}; the config does not belong to these weights"
            )


def save_model_files(model: nn.Module, path: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``config.json`` and the weights of ``model`` into ``path``; a model with adapters
    writes its base weights and ``adapters/<name>/``, recorded in ``config["adapters"]``.

    Each file is written atomically; ``config.json`` comes last, so a directory whose config
    exists has its weights. Use :func:`mmgpt.pretrained.save_model` to replace a whole
    directory atomically.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    record = save_model_adapters(model, path)
    if record is not None:
        config[CONFIG_KEY] = record
    if record is not None and is_quantized(model):
        # a quantised base under LoRA (QLoRA): its float weights were written to a file
        # before quantising (mmgpt.adapters.quantize); they are the directory's base
        copy_float_base(model, path / WEIGHTS_NAME)
    elif record is not None:
        save_tensors(base_state_dict(model), path / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        quantized = quantization_record(model)  # a quantised model records how (its loader)
        if quantized is not None:
            config[QUANTIZATION_KEY] = quantized
        save_tensors(model_state_dict(model), path / WEIGHTS_NAME, metadata={"format": "pt"})
    save_json(config, path / CONFIG_NAME)


def load_model_files(
    model: nn.Module,
    path: str | os.PathLike,
    config: dict[str, Any],
    *,
    adapter: AdapterChoice = "auto",
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load ``path``'s weights (and adapters, see :func:`mmgpt.adapters.load_adapters`) into
    ``model``, built from ``config``; return it on ``map_location`` in eval mode.

    Every loader of mmgpt returns models in eval mode, like transformers: dropout is off
    until a trainer switches it on.
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if config.get(QUANTIZATION_KEY) is not None:  # quantised layers take the recorded places
        prepare_quantized(model, config[QUANTIZATION_KEY], path / CONFIG_NAME)
    load_model_state(model, load_tensors(weights, map_location), weights)
    if adapter is not None and (adapter != "auto" or config.get(CONFIG_KEY)):
        load_adapters(model, path, adapter, record=config.get(CONFIG_KEY))
    return model.to(map_location).eval()
