"""Model directories and atomic, pickle-free weight files.

A model is a directory: ``config.json`` (the full config, plugin names included),
``model.safetensors``, tokenizer files, and optionally ``adapters/<name>/`` and
``trainer_state/``. Every write goes to a temporary file that is renamed into place, so a
killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mmgpt.model import GPT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically. Shared storage is cloned (safetensors refuses it)."""
    from safetensors.torch import save

    seen: dict[int, str] = {}
    clean = {}
    for k, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen and ptr != -1:
            t = t.clone()
        seen.setdefault(ptr, k)
        clean[k] = t.contiguous().cpu()
    atomic_write_bytes(Path(path), save(clean, metadata=metadata))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file raises naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises several types for a damaged header/body
        raise CorruptCheckpointError(
            f"{path}: unreadable or truncated safetensors file ({exc})"
        ) from exc


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read back."""


def load_torch_file(path: Path) -> Any:
    """Read a ``.bin``/``.pt`` file without unpickling arbitrary objects."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{path}: cannot be loaded with weights_only=True ({type(exc).__name__}: {exc}); "
            "mmgpt never unpickles arbitrary objects"
        ) from exc


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied aliases (stored once, re-tied on load)."""
    tied = set(getattr(model, "tied_weight_keys", []))
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
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


def read_model_config(path: Path) -> dict[str, Any]:
    from mmgpt.config import load_json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory")
    return load_json(path / CONFIG_NAME)


def save_gpt(model: GPT, path: str | Path, extra_config: dict[str, Any] | None = None) -> None:
    from mmgpt.config import save_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(model_state_dict(model), path / WEIGHTS_NAME, metadata={"format": "pt"})
    config = {
        "architecture": "gpt",
        "format_version": FORMAT_VERSION,
        "gpt": model.config.to_dict(),
        **(extra_config or {}),
    }
    save_json(config, path / CONFIG_NAME)


def load_gpt(path: str | Path, *, map_location: str | torch.device = "cpu") -> GPT:
    from mmgpt.config import GPTConfig
    from mmgpt.model import GPT

    path = Path(path)
    config = read_model_config(path)
    if config.get("model_type") == "gpt2":
        from mmgpt.interop.gpt2 import load_hf_gpt2

        return load_hf_gpt2(path, map_location=map_location)
    if "gpt" not in config:
        raise ValueError(
            f"{path / CONFIG_NAME}: expected an mmgpt model (a 'gpt' section) or a Hugging Face "
            f"GPT-2 config (model_type 'gpt2'); found keys {sorted(config)}"
        )
    model = GPT(GPTConfig.from_dict(config["gpt"]))
    load_model_state(model, load_tensors(path / WEIGHTS_NAME, map_location), path / WEIGHTS_NAME)
    return model.to(map_location)
