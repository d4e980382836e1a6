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


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
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
    """Write a GPT model directory; with adapters: base weights + ``adapters/<name>/``."""
    from mmgpt.config import save_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": "gpt",
        "format_version": FORMAT_VERSION,
        "gpt": model.config.to_dict(),
        **(extra_config or {}),
    }
    weights = save_weights_and_adapters(model, path, config)
    save_tensors(weights, path / WEIGHTS_NAME, metadata={"format": "pt"})
    save_json(config, path / CONFIG_NAME)


def save_weights_and_adapters(
    model: torch.nn.Module, path: Path, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The weights ``model.safetensors`` holds; a model with adapters also writes them to
    ``path/adapters/<name>/`` and records them in ``config`` (see mmgpt/adapters/directory.py).
    """
    if not getattr(model, "peft_config", None):
        return model_state_dict(model)
    from mmgpt.adapters import base_state_dict
    from mmgpt.adapters.directory import CONFIG_KEY, save_model_adapters

    config[CONFIG_KEY] = save_model_adapters(model, path)
    return base_state_dict(model)


def load_gpt(
    path: str | Path, *, map_location: str | torch.device = "cpu", adapter: Any = "auto"
) -> GPT:
    """Load a GPT model directory (or a Hugging Face GPT-2 one) with its adapters: ``adapter``
    is ``"auto"`` (those saved with the model), ``"all"``, a name, names, or ``None``."""
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
    if adapter is not None and (adapter != "auto" or config.get("adapters")):
        from mmgpt.adapters.directory import load_adapters

        load_adapters(model, path, adapter, record=config.get("adapters"))
    return model.to(map_location).eval()  # like transformers: loaded models start in eval mode


# --------------------------------------------------------------------------------------
# Training checkpoints: trainer state without pickle
# --------------------------------------------------------------------------------------
# A training checkpoint is a directory ``step_{N:08d}/`` holding safetensors files for
# tensors and JSON files for everything else, plus ``manifest.json`` (every file's size and
# sha256) written last. The directory is assembled under a temporary name and renamed into
# place, so a killed process leaves either a complete checkpoint or none; the manifest then
# catches damage that happens afterwards (a truncated or edited file).

MANIFEST_NAME = "manifest.json"
CHECKPOINT_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint_dir(
    directory: str | Path,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    json_files: dict[str, Any],
    step: int,
) -> Path:
    """Write a checkpoint directory atomically; ``manifest.json`` is written last.

    ``tensors`` maps file names (``"model.safetensors"``) to tensor dicts, ``json_files`` maps
    file names (``"trainer_state.json"``) to JSON-serializable objects. An existing directory
    of the same name is replaced.
    """
    import json
    import shutil

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{_TMP_PREFIX}{directory.name}."))
    try:
        for name, tensor_dict in tensors.items():
            save_tensors(tensor_dict, tmp / name, metadata={"format": "pt"})
        for name, obj in json_files.items():
            text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
            atomic_write_bytes(tmp / name, text.encode())
        finalize_checkpoint_dir(tmp, directory, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def finalize_checkpoint_dir(tmp: str | Path, directory: str | Path, step: int) -> Path:
    """Complete a checkpoint written into the staging directory ``tmp``: write
    ``manifest.json`` over every file under it (subdirectories included, e.g. the shards of a
    distributed checkpoint), fsync, and rename ``tmp`` to ``directory`` (replacing it)."""
    import json
    import shutil

    tmp, directory = Path(tmp), Path(directory)
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
        }
    manifest = {"format_version": FORMAT_VERSION, "step": int(step), "files": files}
    atomic_write_bytes(tmp / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    for sub in [p for p in tmp.rglob("*") if p.is_dir()]:
        _fsync_dir(sub)
    _fsync_dir(tmp)
    if directory.exists():  # e.g. a step recomputed after falling back past it
        old = directory.with_name(f"{_TMP_PREFIX}{directory.name}.old.{os.getpid()}")
        os.replace(directory, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    return directory


def verify_checkpoint_dir(directory: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; raise ``CorruptCheckpointError`` naming the file."""
    import json

    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{manifest_path}: missing (the checkpoint was never completed)"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes, the manifest says {info['size']} (truncated or damaged)"
            )
        if _sha256(path) != info["sha256"]:
            raise CorruptCheckpointError(f"{path}: sha256 differs from the manifest (damaged)")
    return manifest


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_N`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), p))
    return sorted(found)


def latest_valid_checkpoint(root: str | Path, *, quarantine: bool = True) -> Path | None:
    """The newest checkpoint whose manifest verifies, or None.

    A damaged checkpoint is reported with a warning naming the bad file and, with
    ``quarantine``, renamed to ``step_N.corrupt`` so later runs (and pruning) skip it.
    """
    import warnings

    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint_dir(path)
            return path
        except CorruptCheckpointError as exc:
            action = "falling back to an earlier checkpoint"
            if quarantine:
                target = path.with_name(path.name + CORRUPT_SUFFIX)
                n = 1
                while target.exists():
                    target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{n}")
                    n += 1
                os.replace(path, target)
                action += f"; moved it to {target.name}"
            warnings.warn(
                f"checkpoint {path.name} is damaged and was skipped: {exc}; {action}",
                RuntimeWarning,
                stacklevel=2,
            )
    return None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temp dirs); return the deleted."""
    import shutil

    root = Path(root)
    removed = []
    checkpoints = list_checkpoints(root)
    for _, path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_stale_temp_dirs(root: str | Path) -> None:
    """Remove half-written checkpoint directories left by a killed process."""
    import shutil

    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} {value!r} as JSON in a checkpoint")


def optimizer_state_to_files(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.{param}.{name}``) and JSON."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for idx, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                values.setdefault(str(idx), {})[name] = _jsonable(value)
    meta = {"param_groups": _jsonable(state_dict["param_groups"]), "state_values": values}
    return tensors, meta


def optimizer_state_from_files(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_files`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = tensor
    for idx, entries in meta.get("state_values", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, numpy, torch CPU and CUDA generator states as (tensors, JSON)."""
    import random

    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        states = [v for _, v in cuda]
        if len(states) != torch.cuda.device_count():
            import warnings

            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(states)} device(s), this machine has "
                f"{torch.cuda.device_count()}; restoring the common ones",
                RuntimeWarning,
                stacklevel=2,
            )
        for i, state in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
