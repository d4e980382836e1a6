"""Leaf I/O: atomic files and directories, JSON and YAML, pickle-free tensor files, locks.

Every writer in mmgpt goes through this module, so a killed process never leaves a
half-written file or directory under its final name: a file is written to a temporary name in
the same directory and renamed; a directory is assembled under a temporary name
(:data:`TMP_PREFIX`) and swapped into place. This module imports nothing from mmgpt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

# Staging directories start with this; remove_stale_temp_dirs sweeps them after a crash.
TMP_PREFIX = ".tmp-"
OLD_SUFFIX = ".old."  # a replaced directory, set aside until its successor is in place


class CorruptCheckpointError(RuntimeError):
    """A checkpoint or weights file exists but cannot be read back."""


def _current_umask() -> int:
    # read per call (setting it back at once): a program may change its umask after import
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be fsynced)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished directory ``staging`` to ``target``, replacing what was there.

    The old ``target`` is first renamed aside, so at every instant ``target`` is either the
    old complete directory or the new one.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        # aside first, the new one in, and only then delete the old: a process killed between
        # the two renames leaves the old directory under the ``.old`` name, which
        # remove_stale_temp_dirs puts back instead of deleting
        old = target.with_name(f"{TMP_PREFIX}{target.name}{OLD_SUFFIX}{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    On any exception the staging directory is removed and ``target`` is left untouched::

        with atomic_directory(out) as tmp:
            write_everything_into(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}."))
    os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes 0700; give what mkdir would
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_temp_dirs(root: str | os.PathLike) -> None:
    """Clean up after a process killed while writing under ``root``: a directory it had set
    aside while replacing it (``.tmp-NAME.old.PID``) goes back to ``NAME`` when ``NAME`` is
    missing; every other staging directory is removed."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.startswith(TMP_PREFIX) and OLD_SUFFIX in p.name:
            name = p.name[len(TMP_PREFIX) :].rpartition(OLD_SUFFIX)[0]
            if name and not (root / name).exists():
                os.replace(p, root / name)
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file + rename), keys sorted."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
    atomic_write_bytes(Path(path), text.encode())


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None


def save_tensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Save tensors as safetensors, atomically. Shared storage is cloned (safetensors refuses it)."""
    from safetensors.torch import save  # deferred: `import mmgpt` stays free of torch

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


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file raises naming the file.

    ``prefix``: only the tensors whose names start with it (the others are never read)."""
    from safetensors import safe_open  # deferred: `import mmgpt` stays free of torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        if prefix is None:
            return load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (not a dict)
            return {k: f.get_tensor(k) for k in names}
    except Exception as exc:  # safetensors raises several types for a damaged header/body
        raise CorruptCheckpointError(
            f"{path}: unreadable or truncated safetensors file ({exc})"
        ) from exc


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes) without reading tensors.

    Lets a loader check a config against the weights before allocating a model.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise ValueError("shorter than the 8-byte header length")
            size = int.from_bytes(size_bytes, "little")
            if size > min(100 << 20, path.stat().st_size - 8):
                raise ValueError(f"header length {size} exceeds the file")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: weights file not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: unreadable safetensors header (not an object)")
    header.pop("__metadata__", None)
    return header


def load_torch_file(path: str | os.PathLike) -> Any:
    """Read a ``.bin``/``.pt`` file without unpickling arbitrary objects."""
    import torch  # deferred: `import mmgpt` stays free of torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{path}: cannot be loaded with weights_only=True ({type(exc).__name__}: {exc}); "
            "mmgpt never unpickles arbitrary objects"
        ) from exc


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """A YAML scalar (or flow list/map): ``"1e-3"`` → 0.001, ``"true"`` → True, ``"[1, 2]"``;
    how every ``key=value`` option of mmgpt reads its value. Anything that is not such a value
    (a broken flow list, a date that does not exist, a number too long to convert, nesting too
    deep for the parser) is a ``ValueError``."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, RecursionError):
            detail = "nested too deeply"
        raise ValueError(f"cannot parse value {text[:60]!r} as YAML ({detail})") from None


class DirectoryLockedError(OSError):
    """Another process holds the lock of a directory (e.g. a training run's output folder).

    An ``OSError``, so the command line reports it in one line like other file errors."""


LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}  # locks this process holds → depth (a lock is re-entrant)


@contextmanager
def exclusive_lock(directory: str | os.PathLike, purpose: str = "a training run") -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (``directory/.lock``) or fail at once.

    The lock is an OS file lock (``flock``): the kernel releases it when the holder exits,
    even when killed, so a crash never leaves a stale lock. The lock file records the
    holder's pid for the error message. Re-entrant within one process (a recipe runner and
    the trainer it starts both take it).
    """
    import fcntl  # POSIX only; deferred so that importing this module works everywhere

    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    key = path.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryLockedError(
                f"{directory}: in use by {purpose} (pid {holder}; lock file {path}); wait for "
                "it to finish, or choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
            if created and [p.name for p in directory.iterdir()] == [LOCK_NAME]:
                # a run that failed before writing anything leaves no folder behind (unless
                # another process started writing there meanwhile: then the folder stays)
                with suppress(OSError):
                    path.unlink()
                    directory.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
