"""Leaf I/O: atomic files and directories, JSON, safetensors, torch files and directory locks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mmgpt.files
from mmgpt.files import (
    LOCK_NAME,
    TMP_PREFIX,
    CorruptCheckpointError,
    DirectoryLockedError,
    atomic_directory,
    atomic_write_bytes,
    exclusive_lock,
    load_json,
    load_tensors,
    load_torch_file,
    read_safetensors_header,
    remove_stale_temp_dirs,
    replace_dir,
    save_json,
    save_tensors,
)

# Subprocesses import the same mmgpt as this test does.
SRC = Path(mmgpt.files.__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative posix path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _make_dir(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


# --- atomic_write_bytes -------------------------------------------------------------------


def test_atomic_write_bytes_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "data.bin"  # parents are created
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write_bytes(path, b"\x00second\xff" * 1000)
    assert path.read_bytes() == b"\x00second\xff" * 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_atomic_write_bytes_failure_keeps_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old content")
    calls = []

    def boom(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_bytes(path, b"new content that must not appear")
    monkeypatch.undo()
    assert calls, f"os.{failing} was never reached"
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_bytes_mode_follows_umask_like_open(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "atomic", b"x")
    with open(tmp_path / "plain", "wb") as f:
        f.write(b"x")
    mode = (tmp_path / "atomic").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777
    # The temp file mkstemp creates is 0600; the rename must not keep that.
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- atomic_directory / replace_dir / remove_stale_temp_dirs ------------------------------


def test_atomic_directory_success_replaces_target_entirely(tmp_path: Path) -> None:
    target = _make_dir(tmp_path / "out", {"old.txt": b"old", "nested/old.bin": b"\x01\x02"})
    with atomic_directory(target) as staging:
        assert staging.is_dir()
        assert staging.parent == tmp_path
        assert staging.name.startswith(TMP_PREFIX)
        assert list(staging.iterdir()) == []
        (staging / "new.txt").write_bytes(b"new")
        (staging / "deep" / "er").mkdir(parents=True)
        (staging / "deep" / "er" / "file").write_bytes(b"leaf")
        assert _tree(target) == {"old.txt": b"old", "nested/old.bin": b"\x01\x02"}
    assert _tree(target) == {"new.txt": b"new", "deep/er/file": b"leaf"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_creates_missing_target(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"
    with atomic_directory(target) as staging:
        (staging / "f").write_bytes(b"1")
    assert _tree(target) == {"f": b"1"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_atomic_directory_exception_leaves_old_target_untouched(
    tmp_path: Path, exc_type: type[BaseException]
) -> None:
    files = {"weights.bin": bytes(range(256)) * 4, "sub/config.json": b'{"a": 1}\n'}
    target = _make_dir(tmp_path / "out", files)
    staging_seen = []
    with pytest.raises(exc_type), atomic_directory(target) as staging:
        staging_seen.append(staging)
        (staging / "weights.bin").write_bytes(b"partial")
        raise exc_type("interrupted")
    assert _tree(target) == files
    assert not staging_seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_exception_without_target_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_directory(tmp_path / "out") as staging:
        (staging / "f").write_bytes(b"1")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_replace_dir(tmp_path: Path) -> None:
    staging = _make_dir(tmp_path / "staging", {"b": b"new"})
    target = _make_dir(tmp_path / "target", {"a": b"old", "sub/c": b"old too"})
    assert replace_dir(staging, target) == target
    assert _tree(target) == {"b": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no .tmp-*.old left

    staging2 = _make_dir(tmp_path / "staging2", {"x": b"x"})
    fresh = tmp_path / "fresh"
    replace_dir(staging2, fresh)
    assert _tree(fresh) == {"x": b"x"}
    assert not staging2.exists()


def test_remove_stale_temp_dirs_removes_only_tmp_dirs(tmp_path: Path) -> None:
    _make_dir(tmp_path / f"{TMP_PREFIX}step_00000002.abc", {"model.safetensors": b"half"})
    _make_dir(tmp_path / f"{TMP_PREFIX}step_00000001.old.77", {"stale": b"x"})  # has a successor
    _make_dir(tmp_path / f"{TMP_PREFIX}out.old.123", {"deep/file": b"x"})  # lost its successor
    _make_dir(tmp_path / "step_00000001", {"manifest.json": b"{}"})
    _make_dir(tmp_path / "keep.tmp-", {"f": b"x"})
    (tmp_path / f"{TMP_PREFIX}a-file").write_bytes(b"a file, not a staging dir")
    (tmp_path / "plain.txt").write_bytes(b"p")
    remove_stale_temp_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["step_00000001", "out", "keep.tmp-", f"{TMP_PREFIX}a-file", "plain.txt"]
    )
    assert (tmp_path / "step_00000001" / "manifest.json").read_bytes() == b"{}"
    assert (tmp_path / "out" / "deep" / "file").read_bytes() == b"x"  # put back, not deleted
    remove_stale_temp_dirs(tmp_path / "missing")  # a missing root is not an error


def test_a_kill_between_the_two_renames_of_a_replacement_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_dir(tmp_path / "model", {"weights": b"old"})
    real_replace, calls = os.replace, []

    def killed_after_the_first(src, dst):  # the process dies once the old one is set aside
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "model") as staging:
        (staging / "weights").write_bytes(b"new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "model").exists()  # the moment the kill left behind
    remove_stale_temp_dirs(tmp_path)  # what the next run does first
    assert (tmp_path / "model" / "weights").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- JSON ----------------------------------------------------------------------------------


def test_save_json_load_json_round_trip(tmp_path: Path) -> None:
    obj = {"b": [1, 2.5, None, True], "a": {"nested": "ünïcødé ✓"}, "c": 10**20}
    path = tmp_path / "x" / "obj.json"
    save_json(obj, path)
    assert load_json(path) == obj
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert list(json.loads(text)) == ["a", "b", "c"]  # keys sorted
    assert [p.name for p in path.parent.iterdir()] == ["obj.json"]


def test_load_json_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_json(path)


@pytest.mark.parametrize("data", [b'{"a": 1,', b"not json", b"\xff\xfe\x00garbage"])
def test_load_json_invalid_names_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"bad\.json.*invalid JSON"):
        load_json(path)


# --- safetensors ---------------------------------------------------------------------------


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_save_load_tensors_round_trip(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    path = tmp_path / "t.safetensors"
    save_tensors(tensors, path, metadata={"format": "pt", "note": "x"})
    loaded = load_tensors(path)
    assert sorted(loaded) == sorted(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype, k
        assert loaded[k].shape == t.shape, k
        assert torch.equal(loaded[k], t), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def test_save_tensors_tied_and_view_tensors_are_cloned(tmp_path: Path) -> None:
    base = torch.randn(4, 3, requires_grad=True)
    tensors = {
        "wte": base,
        "lm_head": base,  # tied weights: the same tensor twice
        "rows": base[1:3],  # a view into the same storage
        "transposed": base.t(),  # non-contiguous view
    }
    path = tmp_path / "tied.safetensors"
    save_tensors(tensors, path)
    loaded = load_tensors(path)
    assert torch.equal(loaded["wte"], base.detach())
    assert torch.equal(loaded["lm_head"], base.detach())
    assert torch.equal(loaded["rows"], base.detach()[1:3])
    assert torch.equal(loaded["transposed"], base.detach().t())
    ptrs = {k: v.untyped_storage().data_ptr() for k, v in loaded.items()}
    assert len(set(ptrs.values())) == len(ptrs)  # independent tensors after loading
    assert base.requires_grad and base.grad is None  # the inputs are not modified


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_load_tensors_truncated_raises_corrupt(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(_sample_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        load_tensors(path)


def test_load_tensors_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        load_tensors(tmp_path / "absent.safetensors")


def test_read_safetensors_header_without_loading_data(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(_sample_tensors(), path, metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert "__metadata__" not in header
    assert sorted(header) == sorted(_sample_tensors())
    assert header["f32"]["shape"] == [3, 4] and header["f32"]["dtype"] == "F32"
    assert header["bf16"]["shape"] == [5] and header["bf16"]["dtype"] == "BF16"
    assert header["i64"]["dtype"] == "I64"
    assert header["flags"]["dtype"] == "BOOL"
    assert header["scalar"]["shape"] == []
    assert header["empty"]["shape"] == [0, 4]

    # Cut off the tensor data but keep the header: the header still reads (the data is not
    # touched) while a full load refuses the file.
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    path.write_bytes(path.read_bytes()[: 8 + header_len + 4])
    assert read_safetensors_header(path) == header
    with pytest.raises(CorruptCheckpointError):
        load_tensors(path)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05\x00\x00",  # shorter than the 8-byte length
        b"\xff" * 64,  # garbage: absurd header length
        (12).to_bytes(8, "little") + b"not json!!!!",
        (7).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9",  # not UTF-8
        (2).to_bytes(8, "little") + b"[]",  # JSON, but not an object
    ],
    ids=["empty", "short", "garbage", "not-json", "not-utf8", "not-object"],
)
def test_read_safetensors_header_damaged_raises_corrupt(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError, match=r"weights\.safetensors"):
        read_safetensors_header(path)


def test_read_safetensors_header_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(_sample_tensors(), path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    path.write_bytes(data[: 8 + header_len - 1])  # the header itself is cut
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*exceeds the file"):
        read_safetensors_header(path)


def test_read_safetensors_header_length_bound_is_the_file_size(tmp_path: Path) -> None:
    body = json.dumps({"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body)  # exactly fits: accepted
    assert read_safetensors_header(path) == {
        "x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    }
    path.write_bytes((len(body) + 1).to_bytes(8, "little") + body)  # one byte too long
    with pytest.raises(CorruptCheckpointError, match="exceeds the file"):
        read_safetensors_header(path)


def test_read_safetensors_header_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gone\.safetensors"):
        read_safetensors_header(tmp_path / "gone.safetensors")


# --- load_torch_file -----------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_load_torch_file_reads_plain_tensors(tmp_path: Path) -> None:
    state = {"w": torch.randn(2, 3), "b": torch.arange(3), "n": 5}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    loaded = load_torch_file(path)
    assert torch.equal(loaded["w"], state["w"])
    assert torch.equal(loaded["b"], state["b"])
    assert loaded["n"] == 5


def test_load_torch_file_refuses_pickled_objects_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "payload": _TouchOnUnpickle(marker)}, path)
    assert not marker.exists()

    with pytest.raises(CorruptCheckpointError, match=r"evil\.bin.*weights_only"):
        load_torch_file(path)
    assert not marker.exists(), "the pickled object's __reduce__ side effect ran"

    # The payload is live: an unrestricted load does run it (so the check above is meaningful).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_torch_file_garbage_raises_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00\x01 definitely not a torch file")
    with pytest.raises(CorruptCheckpointError, match=r"junk\.pt"):
        load_torch_file(path)


# --- exclusive_lock ------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from mmgpt.files import exclusive_lock
    with exclusive_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold until told to go (or killed)
    """
)

_TRY = textwrap.dedent(
    """
    import sys
    from mmgpt.files import DirectoryLockedError, exclusive_lock
    try:
        with exclusive_lock(sys.argv[1], purpose="an evaluation"):
            print("acquired", flush=True)
    except DirectoryLockedError as exc:
        print("locked:", exc, flush=True)
    """
)


def _python(code: str, *args: str, **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=SRC,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def _try_lock_in_subprocess(directory: Path) -> str:
    proc = _python(_TRY, str(directory))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def _start_holder(directory: Path) -> subprocess.Popen:
    proc = _python(_HOLDER, str(directory))
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def test_exclusive_lock_second_process_fails_at_once(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    with exclusive_lock(directory) as lock:
        assert lock == directory / LOCK_NAME
        assert lock.read_text().strip() == str(os.getpid())
        start = time.monotonic()
        out = _try_lock_in_subprocess(directory)
        assert time.monotonic() - start < 30  # no waiting for the holder
        assert out.startswith("locked:"), out
        assert str(directory) in out
        assert f"pid {os.getpid()}" in out
        assert "an evaluation" in out
    # Released: another process gets it now.
    assert _try_lock_in_subprocess(directory) == "acquired"


def test_exclusive_lock_in_process_error_names_holder(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    holder = _start_holder(directory)
    try:
        with pytest.raises(DirectoryLockedError) as info, exclusive_lock(directory):
            pass
        assert str(directory) in str(info.value)
        assert f"pid {holder.pid}" in str(info.value)
    finally:
        holder.communicate(input="\n", timeout=60)
    assert holder.returncode == 0
    # The holder exited normally: the lock is free again, repeatedly.
    for _ in range(2):
        with exclusive_lock(directory) as lock:
            assert lock.read_text().strip() == str(os.getpid())


def test_exclusive_lock_released_when_holder_is_killed(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    holder = _start_holder(directory)
    try:
        assert _try_lock_in_subprocess(directory).startswith("locked:")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    # The stale lock file (with the dead pid) is still there, but the lock is free.
    assert (directory / LOCK_NAME).read_text().strip() == str(holder.pid)
    with exclusive_lock(directory):
        assert (directory / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert _try_lock_in_subprocess(directory) == "acquired"


def test_directories_and_files_follow_the_umask_of_the_moment(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "shared") as staging:
            (staging / "f").write_bytes(b"x")
        assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755  # as mkdir gives
        os.umask(0o077)  # changed after import: a private file stays private
        atomic_write_bytes(tmp_path / "private", b"secret")
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_load_torch_file_on_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        load_torch_file(tmp_path / "nothing.bin")
