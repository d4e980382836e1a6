"""Training checkpoints: manifest verification, recovery from damage, optimizer and RNG state."""

from __future__ import annotations

import errno
import json
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

import mmgpt.checkpoint as checkpoint_module
from mmgpt.checkpoint import (
    CORRUPT_SUFFIX,
    MANIFEST_NAME,
    capture_rng_state,
    checkpoint_name,
    finalize_checkpoint_dir,
    latest_valid_checkpoint,
    list_checkpoints,
    optimizer_state_from_files,
    optimizer_state_to_files,
    prune_checkpoints,
    restore_rng_state,
    staging_dir,
    verify_checkpoint_dir,
    write_checkpoint_dir,
)
from mmgpt.files import (
    TMP_PREFIX,
    CorruptCheckpointError,
    load_json,
    load_tensors,
    remove_stale_temp_dirs,
    save_json,
    save_tensors,
)


def _write(root: Path, step: int, **extra_json: object) -> Path:
    g = torch.Generator().manual_seed(step)
    return write_checkpoint_dir(
        root / checkpoint_name(step),
        tensors={
            "model.safetensors": {
                "wte.weight": torch.randn(16, 8, generator=g),
                "ln.bias": torch.zeros(8),
            },
            "rng.safetensors": {"torch_cpu": torch.get_rng_state()},
        },
        json_files={"trainer_state.json": {"step": step, "data": {"epoch": 0}, **extra_json}},
        step=step,
    )


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# --- write / verify ------------------------------------------------------------------------


def test_write_and_verify_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path, 7)
    assert path == tmp_path / "step_00000007"
    manifest = verify_checkpoint_dir(path)
    assert manifest["step"] == 7
    assert sorted(manifest["files"]) == [
        "model.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    ]
    for name, info in manifest["files"].items():
        assert info["size"] == (path / name).stat().st_size
        assert len(info["sha256"]) == 64
    assert load_json(path / "trainer_state.json") == {"step": 7, "data": {"epoch": 0}}
    g = torch.Generator().manual_seed(7)
    assert torch.equal(
        load_tensors(path / "model.safetensors")["wte.weight"], torch.randn(16, 8, generator=g)
    )
    assert _names(tmp_path) == ["step_00000007"]  # no staging directory left


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("model.safetensors", _truncate, "truncated or damaged"),
        ("model.safetensors", _flip_byte, "sha256 differs"),
        ("trainer_state.json", _flip_byte, "sha256 differs"),
        ("rng.safetensors", Path.unlink, "listed in the manifest but missing"),
        (MANIFEST_NAME, Path.unlink, "missing"),
        (MANIFEST_NAME, lambda p: p.write_text("{not json"), "unreadable manifest"),
    ],
    ids=["truncated", "edited-byte", "edited-json", "missing-file", "no-manifest", "bad-manifest"],
)
def test_verify_catches_damage(tmp_path: Path, name: str, damage, message: str) -> None:
    path = _write(tmp_path, 3)
    target = path / name
    size = target.stat().st_size
    damage(target)
    if damage is _flip_byte:
        assert target.stat().st_size == size  # same size: only the hash can tell
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        verify_checkpoint_dir(path)
    assert str(target) in str(info.value)


def test_finalize_checkpoint_dir_covers_nested_files(tmp_path: Path) -> None:
    final = tmp_path / checkpoint_name(4)
    staging = staging_dir(final)
    assert staging.parent == tmp_path and staging.name.startswith(TMP_PREFIX)
    staging.mkdir()
    save_tensors({"a": torch.ones(3)}, staging / "dcp" / "__0_0.distcp")
    (staging / "dcp" / ".metadata").write_bytes(b"meta")
    (staging / "model_config" / "deep").mkdir(parents=True)
    (staging / "model_config" / "deep" / "config.json").write_text("{}")
    save_json({"step": 4}, staging / "trainer_state.json")

    assert finalize_checkpoint_dir(staging, final, 4) == final
    assert not staging.exists()
    manifest = verify_checkpoint_dir(final)
    assert manifest["step"] == 4
    assert sorted(manifest["files"]) == [
        "dcp/.metadata",
        "dcp/__0_0.distcp",
        "model_config/deep/config.json",
        "trainer_state.json",
    ]
    (final / "dcp" / ".metadata").write_bytes(b"META")  # same size, different content
    with pytest.raises(CorruptCheckpointError, match=r"dcp/\.metadata"):
        verify_checkpoint_dir(final)


def test_staging_dir_is_swept_after_a_crash(tmp_path: Path) -> None:
    staging = staging_dir(tmp_path / checkpoint_name(9))
    staging.mkdir()
    (staging / "rng_rank1.json").write_text("{}")
    remove_stale_temp_dirs(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_writing_over_an_existing_step_replaces_it(tmp_path: Path) -> None:
    path = _write(tmp_path, 5)
    (path / "stray.txt").write_text("left by someone")  # not in the manifest
    write_checkpoint_dir(
        path, tensors={}, json_files={"trainer_state.json": {"step": 5, "again": True}}, step=5
    )
    assert _names(path) == [MANIFEST_NAME, "trainer_state.json"]
    assert verify_checkpoint_dir(path)["files"].keys() == {"trainer_state.json"}
    assert load_json(path / "trainer_state.json") == {"step": 5, "again": True}
    assert _names(tmp_path) == ["step_00000005"]


# --- listing, choosing, pruning ------------------------------------------------------------


def test_list_checkpoints_ignores_non_matching_names(tmp_path: Path) -> None:
    for name in ["step_00000010", "step_00000001", "step_2"]:
        (tmp_path / name).mkdir()
    for name in ["step_", "step_x", "step_00000003.corrupt", "steps_4", "other", ".tmp-step_5.a"]:
        (tmp_path / name).mkdir()
    (tmp_path / "step_00000006").write_text("a file, not a directory")
    assert list_checkpoints(tmp_path) == [
        (1, tmp_path / "step_00000001"),
        (2, tmp_path / "step_2"),
        (10, tmp_path / "step_00000010"),
    ]
    assert list_checkpoints(tmp_path / "missing") == []


def test_latest_valid_checkpoint_picks_newest(tmp_path: Path) -> None:
    for step in (30, 10, 20):
        _write(tmp_path, step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "step_00000030"
    assert _names(tmp_path) == ["step_00000010", "step_00000020", "step_00000030"]


def test_latest_valid_checkpoint_quarantines_damaged_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _write(tmp_path, step)
    bad = tmp_path / "step_00000003" / "model.safetensors"
    _truncate(bad)
    with pytest.warns(RuntimeWarning, match=r"step_00000003.*model\.safetensors"):
        chosen = latest_valid_checkpoint(tmp_path)
    assert chosen == tmp_path / "step_00000002"
    assert _names(tmp_path) == ["step_00000001", "step_00000002", f"step_00000003{CORRUPT_SUFFIX}"]
    kept = tmp_path / f"step_00000003{CORRUPT_SUFFIX}"
    assert (kept / "model.safetensors").stat().st_size > 0  # kept for inspection
    # Pruning and later runs no longer see it.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_latest_valid_checkpoint_never_overwrites_an_earlier_quarantine(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    earlier = tmp_path / f"step_00000002{CORRUPT_SUFFIX}"
    earlier.mkdir()
    (earlier / "evidence").write_text("from an earlier attempt")
    path = _write(tmp_path, 2)
    (path / MANIFEST_NAME).unlink()
    with pytest.warns(RuntimeWarning, match="step_00000002"):
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert (earlier / "evidence").read_text() == "from an earlier attempt"
    assert (tmp_path / f"step_00000002{CORRUPT_SUFFIX}1" / "trainer_state.json").is_file()


def test_latest_valid_checkpoint_without_quarantine_leaves_names(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    _flip_byte(_write(tmp_path, 2) / "trainer_state.json")
    with pytest.warns(RuntimeWarning, match=r"trainer_state\.json"):
        assert latest_valid_checkpoint(tmp_path, quarantine=False) == tmp_path / "step_00000001"
    assert _names(tmp_path) == ["step_00000001", "step_00000002"]


def test_latest_valid_checkpoint_all_damaged_raises_and_keeps_them(tmp_path: Path) -> None:
    _truncate(_write(tmp_path, 1) / "model.safetensors")
    (_write(tmp_path, 2) / MANIFEST_NAME).unlink()
    with (
        pytest.warns(RuntimeWarning) as caught,
        pytest.raises(CorruptCheckpointError) as info,
    ):
        latest_valid_checkpoint(tmp_path)
    assert len(caught) == 2
    message = str(info.value)
    assert "step_00000001" in message and "step_00000002" in message
    assert "model.safetensors" in message and MANIFEST_NAME in message
    assert "start over" in message
    # Nothing is deleted: both are still on disk, quarantined, with their files.
    assert _names(tmp_path) == [f"step_00000001{CORRUPT_SUFFIX}", f"step_00000002{CORRUPT_SUFFIX}"]
    for name in _names(tmp_path):
        assert (tmp_path / name / "trainer_state.json").is_file()

    # A later attempt sees only the quarantined ones and still refuses to start over.
    with pytest.raises(CorruptCheckpointError, match="step_00000001.corrupt") as info:
        latest_valid_checkpoint(tmp_path)
    assert "step_00000002.corrupt" in str(info.value)
    assert "start over" in str(info.value)


def test_latest_valid_checkpoint_only_quarantined_raises(tmp_path: Path) -> None:
    (tmp_path / f"step_00000004{CORRUPT_SUFFIX}").mkdir()
    with pytest.raises(CorruptCheckpointError, match=r"step_00000004\.corrupt"):
        latest_valid_checkpoint(tmp_path)
    assert _names(tmp_path) == [f"step_00000004{CORRUPT_SUFFIX}"]


def test_latest_valid_checkpoint_none_when_nothing_there(tmp_path: Path) -> None:
    assert latest_valid_checkpoint(tmp_path / "missing") is None
    assert latest_valid_checkpoint(tmp_path) is None
    (tmp_path / "other").mkdir()
    (tmp_path / f"{TMP_PREFIX}step_00000001.x").mkdir()
    assert latest_valid_checkpoint(tmp_path) is None


def test_prune_checkpoints_keeps_newest(tmp_path: Path) -> None:
    for step in (5, 1, 4, 2, 3):
        (tmp_path / checkpoint_name(step)).mkdir()
        (tmp_path / checkpoint_name(step) / "f").write_text("x")
    (tmp_path / f"step_00000000{CORRUPT_SUFFIX}").mkdir()
    (tmp_path / "other").mkdir()
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert removed == [tmp_path / checkpoint_name(s) for s in (1, 2, 3)]
    assert _names(tmp_path) == [
        "other",
        "step_00000000.corrupt",
        "step_00000004",
        "step_00000005",
    ]
    assert prune_checkpoints(tmp_path, keep_last=2) == []
    assert prune_checkpoints(tmp_path, keep_last=10) == []
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]


# --- optimizer and RNG state ---------------------------------------------------------------


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "weight_decay": 0.1},
            {"params": model[2].parameters(), "weight_decay": 0.0, "lr": 3e-3},
        ],
        lr=1e-2,
        betas=(0.8, 0.95),
    )
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_optimizer_state_round_trip_through_checkpoint(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer()
    _step(model, opt, 1)
    _step(model, opt, 2)
    opt_tensors, opt_meta = optimizer_state_to_files(opt.state_dict())
    assert opt_tensors and all(k.startswith("state.") for k in opt_tensors)
    path = write_checkpoint_dir(
        tmp_path / checkpoint_name(2),
        tensors={"model.safetensors": model.state_dict(), "optimizer.safetensors": opt_tensors},
        json_files={"optimizer.json": opt_meta},
        step=2,
    )

    fresh_model, fresh_opt = _model_and_optimizer()
    fresh_model.load_state_dict(load_tensors(path / "model.safetensors"))
    baseline = [p.detach().clone() for p in fresh_model.parameters()]
    restored = optimizer_state_from_files(
        load_tensors(path / "optimizer.safetensors"), load_json(path / "optimizer.json")
    )
    fresh_opt.load_state_dict(restored)
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.95)

    _step(model, opt, 3)
    _step(fresh_model, fresh_opt, 3)
    for a, b in zip(_params(model), _params(fresh_model), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(baseline, _params(model), strict=True))

    # Without the restored state (fresh moments, step 0), the same step lands elsewhere.
    other_model, other_opt = _model_and_optimizer()
    other_model.load_state_dict(load_tensors(path / "model.safetensors"))
    _step(other_model, other_opt, 3)
    assert not all(
        torch.equal(a, b) for a, b in zip(_params(model), _params(other_model), strict=True)
    )


def test_optimizer_state_non_tensor_values_round_trip(tmp_path: Path) -> None:
    # Optimizers may keep plain numbers (older torch: AdamW's "step") or None in their state.
    state_dict = {
        "state": {
            0: {"step": 3, "exp_avg": torch.ones(2), "extra": None},
            5: {"step": 4, "history": (1.5, [2, 3])},
        },
        "param_groups": [{"params": [0, 5], "lr": 0.1, "betas": (0.9, 0.99), "foreach": None}],
    }
    tensors, meta = optimizer_state_to_files(state_dict)
    assert list(tensors) == ["state.0.exp_avg"]
    save_json(meta, tmp_path / "optimizer.json")
    restored = optimizer_state_from_files(tensors, load_json(tmp_path / "optimizer.json"))
    assert restored["state"][0]["step"] == 3 and restored["state"][0]["extra"] is None
    assert torch.equal(restored["state"][0]["exp_avg"], torch.ones(2))
    assert restored["state"][5] == {"step": 4, "history": [1.5, [2, 3]]}
    assert restored["param_groups"] == [
        {"params": [0, 5], "lr": 0.1, "betas": (0.9, 0.99), "foreach": None}
    ]


def test_optimizer_state_refuses_values_json_cannot_hold() -> None:
    state_dict = {"state": {0: {"odd": {1, 2}}}, "param_groups": []}
    with pytest.raises(TypeError, match="set"):
        optimizer_state_to_files(state_dict)


@pytest.fixture
def _keep_global_rng() -> Iterator[None]:
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def _draws() -> list[object]:
    return [
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.standard_normal(3).tolist(),
        np.random.rand(),
        torch.rand(4).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
    ]


@pytest.mark.usefixtures("_keep_global_rng")
def test_rng_state_round_trip_through_files(tmp_path: Path) -> None:
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    # Leave a cached Gaussian in both python's and numpy's state (an odd number of draws).
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    assert np.random.get_state()[3] == 1

    tensors, meta = capture_rng_state()
    save_tensors(tensors, tmp_path / "rng.safetensors")
    save_json(meta, tmp_path / "rng.json")
    expected = _draws()

    moved_on = _draws()
    assert moved_on != expected

    restore_rng_state(load_tensors(tmp_path / "rng.safetensors"), load_json(tmp_path / "rng.json"))
    assert _draws() == expected


# --- a full disk while writing -------------------------------------------------------------


def _disk_full(path: Path, data: bytes, written: list[Path]) -> None:
    path.write_bytes(data[: len(data) // 2])  # part of it fits, then the disk is full
    written.append(path)
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("step", [2, 1], ids=["new-step", "over-existing-step"])
@pytest.mark.parametrize("writer", ["save_tensors", "save_json", "atomic_write_bytes"])
def test_full_disk_while_writing_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int, writer: str
) -> None:
    first = _write(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    written: list[Path] = []

    def fake_save_tensors(tensors, path, metadata=None):
        data = safetensors_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        _disk_full(Path(path), data, written)

    def fake_save_json(obj, path):
        _disk_full(Path(path), json.dumps(obj).encode(), written)

    def fake_atomic_write_bytes(path, data):  # the manifest, written last
        _disk_full(Path(path), data, written)

    fakes = {
        "save_tensors": fake_save_tensors,
        "save_json": fake_save_json,
        "atomic_write_bytes": fake_atomic_write_bytes,
    }
    monkeypatch.setattr(checkpoint_module, writer, fakes[writer])
    with pytest.raises(OSError, match="No space left on device") as info:
        _write(tmp_path, step)
    assert info.value.errno == errno.ENOSPC
    assert written and written[0].parent.name.startswith(TMP_PREFIX)  # it did write, partly

    assert verify_checkpoint_dir(first)["step"] == 1
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert _names(tmp_path) == ["step_00000001"]  # no step 2, no .tmp-* staging left
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_valid_checkpoint(tmp_path) == first


@pytest.mark.parametrize("manifest", ['{"files": []}', '{"files": {"x": {}}}', '{"files": 3}'])
def test_a_manifest_of_the_wrong_shape_is_damage_not_a_crash(tmp_path: Path, manifest) -> None:
    directory = tmp_path / "step_00000001"
    directory.mkdir()
    (directory / "manifest.json").write_text(manifest)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: unreadable manifest"):
        verify_checkpoint_dir(directory)


def test_odd_names_and_bad_keep_last(tmp_path: Path) -> None:
    for name in ("step_00000003", "step_\u00b2", "step_", "step_12a"):
        (tmp_path / name).mkdir()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        prune_checkpoints(tmp_path, -1)
    assert (tmp_path / "step_00000003").is_dir()
