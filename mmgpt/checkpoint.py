"""Training checkpoints: resumable trainer state without pickle.

A training checkpoint is a directory ``step_{N:08d}/`` holding safetensors files for tensors
and JSON files for everything else, plus ``manifest.json`` (every file's size and sha256)
written last. The directory is assembled under a temporary name and renamed into place
(:mod:`mmgpt.files`), so a killed process leaves either a complete checkpoint or none; the
manifest then catches damage that happens afterwards (a truncated or edited file).

Model directories (``config.json`` + ``model.safetensors``) are :mod:`mmgpt.weights` and
:mod:`mmgpt.pretrained`; this module is only the trainer's own state.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmgpt.config import FORMAT_VERSION
from mmgpt.files import (
    TMP_PREFIX,
    CorruptCheckpointError,
    atomic_directory,
    atomic_write_bytes,
    fsync_dir,
    replace_dir,
    save_json,
    save_tensors,
)

MANIFEST_NAME = "manifest.json"
CHECKPOINT_PREFIX = "step_"
CORRUPT_SUFFIX = ".corrupt"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint_dir(
    directory: str | os.PathLike,
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
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        for name, tensor_dict in tensors.items():
            save_tensors(tensor_dict, staging / name, metadata={"format": "pt"})
        for name, obj in json_files.items():
            save_json(obj, staging / name)
        write_manifest(staging, step)
    return directory


def write_manifest(staging: str | os.PathLike, step: int) -> None:
    """Write ``manifest.json`` over every file under ``staging`` (subdirectories included,
    e.g. the shards of a distributed checkpoint) and fsync the tree."""
    staging = Path(staging)
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        files[path.relative_to(staging).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
        }
    manifest = {"format_version": FORMAT_VERSION, "step": int(step), "files": files}
    atomic_write_bytes(staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    for sub in [p for p in staging.rglob("*") if p.is_dir()]:
        fsync_dir(sub)
    fsync_dir(staging)


def finalize_checkpoint_dir(
    staging: str | os.PathLike, directory: str | os.PathLike, step: int
) -> Path:
    """Complete a checkpoint written into ``staging`` (a directory every rank of a distributed
    run wrote into): write its manifest and swap it into place as ``directory``."""
    write_manifest(staging, step)
    return replace_dir(staging, directory)


def staging_dir(directory: str | os.PathLike) -> Path:
    """The fixed staging name for ``directory`` that every rank can compute (swept by
    :func:`mmgpt.files.remove_stale_temp_dirs` after a crash)."""
    directory = Path(directory)
    return directory.with_name(f"{TMP_PREFIX}{directory.name}.staging")


def verify_checkpoint_dir(directory: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; raise ``CorruptCheckpointError`` naming the file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = [
            (str(name), int(info["size"]), str(info["sha256"])) for name, info in files.items()
        ]
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{manifest_path}: missing (the checkpoint was never completed)"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # also a wrong shape
        raise CorruptCheckpointError(f"{manifest_path}: unreadable manifest ({exc!r})") from None
    for name, expected_size, expected_sha in entries:
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != expected_size:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes, the manifest says {expected_size} (truncated or damaged)"
            )
        if _sha256(path) != expected_sha:
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
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and re.fullmatch("[0-9]+", suffix):
            found.append((int(suffix), p))
    return sorted(found)


def latest_valid_checkpoint(root: str | Path, *, quarantine: bool = True) -> Path | None:
    """The newest checkpoint whose manifest verifies, or None when ``root`` holds none at all.

    A damaged checkpoint is reported with a warning naming the bad file and, with
    ``quarantine``, renamed to ``step_N.corrupt`` so later runs (and pruning) skip it. When
    every checkpoint is damaged (now or in an earlier attempt), this raises
    :class:`CorruptCheckpointError` naming them: resuming must never quietly start over.
    """
    root = Path(root)
    damaged: list[str] = []
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
            damaged.append(f"{path.name} ({exc})")
    quarantined = sorted(p.name for p in root.glob(f"*{CORRUPT_SUFFIX}*")) if root.is_dir() else []
    if damaged or quarantined:
        listed = "; ".join(damaged) if damaged else ", ".join(quarantined)
        raise CorruptCheckpointError(
            f"{root}: no checkpoint to resume from, every one is damaged: {listed}. No training "
            "was done and nothing was deleted: the damaged checkpoints are kept as "
            "step_N.corrupt for inspection. To start over explicitly, move the checkpoints "
            "folder aside or train into another --out"
        )
    return None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; return the deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the newest checkpoint), got {keep_last}")
    root = Path(root)
    removed = []
    checkpoints = list_checkpoints(root)
    for _, path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


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
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        states = [v for _, v in cuda]
        if len(states) != torch.cuda.device_count():
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(states)} device(s), this machine has "
                f"{torch.cuda.device_count()}; restoring the common ones",
                RuntimeWarning,
                stacklevel=2,
            )
        for i, state in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
