"""The files of a Hugging Face checkpoint directory, shared by every family mmgpt converts.

Weights are read as transformers reads them: ``model.safetensors``, a sharded safetensors set
(``model.safetensors.index.json``), then ``pytorch_model.bin`` (single or sharded) through
``torch.load(weights_only=True)``, so nothing is ever unpickled. Writing produces
``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.config import CONFIG_NAME
from mmgpt.files import load_json, load_tensors, load_torch_file, save_json, save_tensors

if TYPE_CHECKING:
    import torch

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"


def read_hf_weights(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a HF checkpoint directory and the file (or index) they came from."""
    single = path / SAFETENSORS_NAME
    if single.is_file():
        return load_tensors(single), single
    index = path / SAFETENSORS_INDEX_NAME
    if index.is_file():
        return _read_sharded(index, load_tensors), index
    single = path / PYTORCH_NAME
    if single.is_file():
        return _load_bin(single), single
    index = path / PYTORCH_INDEX_NAME
    if index.is_file():
        return _read_sharded(index, _load_bin), index
    raise FileNotFoundError(
        f"{path}: no weights found; expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
        f"{PYTORCH_NAME} or {PYTORCH_INDEX_NAME}"
    )


def write_hf_checkpoint(
    hf_config: dict[str, Any], hf_state: dict[str, torch.Tensor], path: str | Path
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` (each atomically; the
    config last, so a directory whose config exists has its weights)."""
    path = Path(path)
    # transformers reads the stored dtype to pick the one it loads into
    dtype = next(iter(hf_state.values())).dtype
    hf_config = {**hf_config, "dtype": str(dtype).removeprefix("torch.")}
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(hf_state, path / SAFETENSORS_NAME, metadata={"format": "pt"})
    save_json(hf_config, path / CONFIG_NAME)


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    import torch

    obj = load_torch_file(file)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _read_sharded(
    index_path: Path, load: Callable[[Path], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    index = load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: expected a non-empty 'weight_map' object")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(
                f"{index_path}: shard {shard!r} not found in {index_path.parent}"
            )
        state.update(load(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(
            f"{index_path}: tensors listed in the index are absent from their shards: {missing[:8]}"
        )
    return state


__all__ = [
    "PYTORCH_INDEX_NAME",
    "PYTORCH_NAME",
    "SAFETENSORS_INDEX_NAME",
    "SAFETENSORS_NAME",
    "read_hf_weights",
    "write_hf_checkpoint",
]
