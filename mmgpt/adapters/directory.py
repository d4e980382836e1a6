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
(``adapter="all"`` or by name). :func:`merge_and_save` writes a plain directory with one
adapter folded into the weights.
"""

from __future__ import annotations

import os
import shutil
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

__all__ = [
    "ADAPTERS_DIR",
    "CONFIG_KEY",
    "adapter_dirs",
    "has_adapters",
    "load_adapters",
    "merge_and_save",
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
    record; ``GPT.save_pretrained`` and ``MultimodalGPT.save_pretrained`` do both.
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
        from mmgpt.checkpoint import read_model_config

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


def merge_and_save(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter: str | None = None,
) -> Path:
    """Write ``out_dir``: the model of ``model_dir`` with ``adapter`` (default: the active one
    its config.json records, else its only adapter) folded into the weights: a plain model
    directory, no ``adapters/``, for deployment (faster: no adapter matmuls at inference).
    """
    from mmgpt.adapters.lora import fold_adapters
    from mmgpt.checkpoint import read_model_config

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_model_config(model_dir)
    if adapter is None:
        record = config.get(CONFIG_KEY) or {}
        found = adapter_dirs(model_dir)
        adapter = record.get("active") or (next(iter(found)) if len(found) == 1 else None)
        if adapter is None:
            raise ValueError(
                f"{model_dir}: name the adapter to merge (adapters: {', '.join(found) or 'none'})"
            )
    model = load_model_dir(model_dir, adapter=adapter, config=config)
    fold_adapters(model, [adapter])
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: write the merged model to another directory")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model_dir(model, tmp, model_dir=model_dir, config=config)
        if out_dir.exists():
            old = out_dir.with_name(f".tmp-{out_dir.name}.old.{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_model_dir(
    model_dir: str | os.PathLike,
    *,
    adapter: AdapterChoice = AUTO,
    config: dict[str, Any] | None = None,
    map_location: str = "cpu",
) -> nn.Module:
    """A GPT or MultimodalGPT (by config.json's ``architecture``) with ``adapter`` loaded."""
    from mmgpt.checkpoint import load_gpt, read_model_config

    model_dir = Path(model_dir)
    config = read_model_config(model_dir) if config is None else config
    if config.get("architecture") == "multimodal":
        from mmgpt.multimodal import MultimodalGPT

        return MultimodalGPT.from_pretrained(model_dir, map_location=map_location, adapter=adapter)
    return load_gpt(model_dir, map_location=map_location, adapter=adapter)


def save_model_dir(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` like its class does; a text GPT keeps the tokenizer of ``model_dir``."""
    from mmgpt.checkpoint import save_gpt
    from mmgpt.model import GPT

    directory = Path(directory)
    if not isinstance(model, GPT):
        model.save_pretrained(directory)
        return
    section = (config or {}).get("tokenizer")
    save_gpt(model, directory, extra_config={"tokenizer": section} if section else None)
    if section and model_dir is not None:
        from mmgpt.registry import create

        args = {k: v for k, v in section.items() if k != "name"}
        create("tokenizer", section["name"], path=str(model_dir), **args).save(directory)
