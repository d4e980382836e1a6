"""``mmgpt demo`` / ``launch_demo``: the shipped model is the default, bad arguments are
one-line errors, and the ``demos`` package ships with the distribution."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

from mmgpt import cli
from mmgpt.demo import APPS, build_demo, default_model_dir, launch_demo

MAX_SHIPPED_BYTES = 25 * 1024 * 1024


def test_bad_arguments_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown demo app 'nope'; apps: chat, text_to_image"):
        launch_demo(app="nope")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        launch_demo(tmp_path)
    assert cli.main(["demo", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmgpt: error: ") and "missing: not a model directory" in err
    assert err.count("\n") == 1  # no traceback


def test_every_app_is_a_module_of_the_demos_package() -> None:
    import importlib

    for name, module in APPS.items():
        assert callable(importlib.import_module(module).build_app), name


def test_the_shipped_model_is_the_default_and_loads_offline() -> None:
    directory = default_model_dir()
    assert directory.parent.name == "assets" and directory.name == "shapes-tiny"
    weights = directory / "model.safetensors"
    assert weights.is_file(), "the shipped model is missing; train it: mmgpt train shapes-tiny"
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert size <= MAX_SHIPPED_BYTES, size
    blocks = build_demo()  # no model_dir: the shipped one, read from the package
    assert blocks.title == "mmgpt chat"
    assert "shapes-tiny" in str(blocks.config)
