"""Adapters inside model directories: save, find, load, merge for deployment.

A model directory of a model with adapters holds the BASE weights under their original names
(``model.safetensors``: what the model was before any adapter; it loads with or without the
adapters) and each adapter in peft's own format::

    config.json          ... + "adapters": {"names": ["default"], "active": "default"}
    model.safetensors    base weights (adapters stripped, unmerged)
    adapters/<name>/adapter_model.safetensors, adapter_config.json, mmgpt_adapter.json

The ``"adapters"`` record lists the adapters saved WITH the model: ``from_pretrained(dir)``
loads those by default (``adapter="auto"``) and activates the recorded one, so a LoRA
fine-tune evaluates, generates and serves as the fine-tuned model. Adapters dropped into
``adapters/`` by other means are found by :func:`adapter_dirs` and loaded on request
(``adapter="all"`` or by name). :func:`mmgpt.pretrained.merge_and_save` writes a plain
directory with one adapter folded into the weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mmgpt.adapters.lora import (
    ADAPTER_CONFIG,
    active_adapter,
    adapter_names,
    load_adapter,
    save_adapter,
    set_active_adapter,
)
from mmgpt.config import read_model_config

__all__ = [
    "ADAPTERS_DIR",
    "CONFIG_KEY",
    "adapter_dirs",
    "has_adapters",
    "load_adapters",
    "save_model_adapters",
]

ADAPTERS_DIR = "adapters"
CONFIG_KEY = "adapters"  # the record in config.json
# What ``adapter=`` of from_pretrained / load_adapters accepts besides names.
AUTO, ALL = "auto", "all"
AdapterChoice = str | Sequence[str] | None


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries adapter layers (cheap: no peft import)."""
    return bool(getattr(model, "peft_config", None))


def adapter_dirs(model_dir: str | os.PathLike) -> dict[str, Path]:
    """``{name: directory}`` of the adapters under ``model_dir/adapters/``, sorted by name."""
    root = Path(model_dir) / ADAPTERS_DIR
    if not root.is_dir():
        return {}
    return {
        p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / ADAPTER_CONFIG).is_file()
    }


def save_model_adapters(model: nn.Module, model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Write every adapter of ``model`` to ``model_dir/adapters/<name>/``; return the
    config.json record (``None`` when the model has no adapters).

    The caller writes the base weights (:func:`mmgpt.adapters.base_state_dict`) and the
    record; :func:`mmgpt.weights.save_model_files` does both.
    """
    if not has_adapters(model):
        return None
    names = adapter_names(model)
    root = Path(model_dir) / ADAPTERS_DIR
    for name in names:
        save_adapter(model, root / name, name)
    return {"names": names, "active": active_adapter(model)}


def load_adapters(
    model: nn.Module,
    model_dir: str | os.PathLike,
    adapter: AdapterChoice = AUTO,
    *,
    record: dict[str, Any] | None = None,
    check_base: bool = True,
) -> list[str]:
    """Load adapters of ``model_dir`` onto ``model`` (its base); returns the loaded names.

    ``adapter``: ``"auto"`` (the adapters config.json records, its active one active; none
    when there is no record), ``"all"`` (every ``adapters/<name>/``), a name, a list of names
    (the first active), or ``None`` (no adapter: the base model).
    ``record``: the config.json ``"adapters"`` record when the caller has read it already.
    """
    if adapter is None:
        return []
    model_dir = Path(model_dir)
    if record is None:
        record = read_model_config(model_dir).get(CONFIG_KEY)
    record = record or {}
    found = adapter_dirs(model_dir)
    if adapter == AUTO:
        names = list(record.get("names") or [])
        active = record.get("active")
    elif adapter == ALL:
        names = list(found)
        active = record.get("active") if record.get("active") in found else None
    elif isinstance(adapter, str):
        names, active = [adapter], adapter
    else:
        names = list(adapter)
        active = names[0] if names else None
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(
            f"{model_dir / ADAPTERS_DIR / missing[0]}: no such adapter "
            f"(adapters in {model_dir}: {', '.join(found) or 'none'})"
        )
    for name in names:
        load_adapter(model, found[name], name, check_base=check_base)
    if names:
        set_active_adapter(model, active or names[0])
    return names
