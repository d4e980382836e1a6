"""GPTConfig validation, dict round trips, presets and reading a model directory's config."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mmgpt.config
from mmgpt.config import (
    CONFIG_NAME,
    GPT_PRESETS,
    GPTConfig,
    from_dict,
    gpt_config,
    read_model_config,
)
from mmgpt.files import load_json, save_json

# Subprocesses import the same mmgpt as this test does.
SRC = Path(mmgpt.config.__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(block_size=0), "block_size"),
        (dict(n_layer=2.0), "n_layer"),
        (dict(n_layer="2"), "n_layer"),
        (dict(n_head=True, n_embd=8), "n_head"),
        (dict(n_embd=0), "n_embd"),
        (dict(n_embd=100, n_head=12), "n_embd"),
        (dict(pos_encoding="alibi"), "pos_encoding"),
        (dict(norm="batchnorm"), "norm"),
        (dict(activation="relu"), "activation"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout=float("nan")), "dropout"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(mlp_ratio=-2.0), "mlp_ratio"),
        (dict(pos_encoding="rotary", n_embd=36, n_head=4), "n_embd"),  # head_dim 9
        (dict(pos_encoding="sinusoidal", n_embd=9, n_head=3), "n_embd"),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={v[k]!r}" for k in v),
)
def test_gptconfig_rejects_invalid_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^GPTConfig\.{field}: "):
        GPTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dropout=0.0),
        dict(dropout=0.999),
        dict(mlp_ratio=0.25),
        dict(n_layer=1, n_head=1, n_embd=1, vocab_size=1, block_size=1),
        dict(pos_encoding="rotary", n_embd=32, n_head=4),  # head_dim 8
        dict(pos_encoding="sinusoidal", n_embd=10, n_head=10),  # odd head_dim, even n_embd
        dict(pos_encoding="learned", n_embd=9, n_head=3),  # odd sizes need no rotary/sinusoidal
        dict(pos_encoding="none", norm="rmsnorm", activation="gelu_tanh"),
    ],
)
def test_gptconfig_accepts_boundary_values(kwargs: dict[str, Any]) -> None:
    config = GPTConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


def test_gptconfig_derived_sizes() -> None:
    config = GPTConfig(n_embd=96, n_head=6, mlp_ratio=2.5)
    assert config.head_dim == 16
    assert config.mlp_hidden == 240


def test_to_dict_from_dict_round_trip(tmp_path: Path) -> None:
    config = GPTConfig(
        vocab_size=300,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_embd=32,
        mlp_ratio=3.0,
        dropout=0.25,
        bias=False,
        pos_encoding="rotary",
        norm="rmsnorm",
        norm_eps=1e-6,
        activation="gelu_tanh",
        tie_embeddings=False,
        rope_theta=500000.0,
        init_std=0.01,
    )
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(GPTConfig)}
    assert data["pos_encoding"] == "rotary" and data["bias"] is False
    assert GPTConfig.from_dict(data) == config
    assert from_dict(GPTConfig, data) == config
    # As stored in config.json.
    save_json(data, tmp_path / "c.json")
    restored = GPTConfig.from_dict(load_json(tmp_path / "c.json"))
    assert restored == config
    assert restored != GPTConfig()
    # to_dict is a copy: editing it does not change the config.
    data["n_layer"] = 99
    assert config.n_layer == 2


def test_from_dict_validates_values() -> None:
    with pytest.raises(ValueError, match=r"GPTConfig\.n_head"):
        GPTConfig.from_dict({"n_head": 0})


def test_from_dict_unknown_key_names_it_and_lists_fields() -> None:
    with pytest.raises(ValueError) as info:
        GPTConfig.from_dict({"n_layer": 2, "n_layers": 3, "hidden_size": 64})
    message = str(info.value)
    assert "GPTConfig" in message
    assert "'n_layers'" in message and "'hidden_size'" in message
    for name in (f.name for f in dataclasses.fields(GPTConfig)):
        assert f"'{name}'" in message


def test_gpt_config_applies_preset_and_overrides() -> None:
    config = gpt_config("gpt-nano", dropout=0.1, n_layer=2)
    assert config.n_layer == 2
    assert config.dropout == 0.1
    assert config.n_embd == GPT_PRESETS["gpt-nano"]["n_embd"]
    assert config.vocab_size == GPT_PRESETS["gpt-nano"]["vocab_size"]
    assert GPT_PRESETS["gpt-nano"]["n_layer"] == 3  # the preset itself is not modified


@pytest.mark.parametrize(
    ("typo", "suggestion"), [("gpt-nan", "gpt-nano"), ("gpt2-medum", "gpt2-medium")]
)
def test_gpt_config_unknown_preset_suggests_closest(typo: str, suggestion: str) -> None:
    with pytest.raises(ValueError) as info:
        gpt_config(typo)
    message = str(info.value)
    assert repr(typo) in message
    assert f"did you mean {suggestion!r}" in message
    for name in GPT_PRESETS:
        assert name in message


def test_gpt_config_unknown_preset_without_close_match() -> None:
    with pytest.raises(ValueError, match="unknown GPT preset 'zzzzzz'") as info:
        gpt_config("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_gpt_config_unknown_override_names_it() -> None:
    with pytest.raises(ValueError, match="n_embed"):
        gpt_config("gpt-nano", n_embed=64)


@pytest.mark.parametrize("preset", sorted(GPT_PRESETS))
def test_every_preset_builds(preset: str) -> None:
    config = gpt_config(preset)
    for key, value in GPT_PRESETS[preset].items():
        assert getattr(config, key) == value
    assert config.head_dim * config.n_head == config.n_embd


def test_read_model_config(tmp_path: Path) -> None:
    save_json({"model": {"n_layer": 2}, "format_version": 1}, tmp_path / CONFIG_NAME)
    assert read_model_config(tmp_path) == {"model": {"n_layer": 2}, "format_version": 1}
    assert read_model_config(str(tmp_path)) == read_model_config(tmp_path)


def test_read_model_config_not_a_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        read_model_config(missing)
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*not a model directory"):
        read_model_config(a_file)


def test_read_model_config_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{CONFIG_NAME}"):
        read_model_config(tmp_path)


@pytest.mark.parametrize("content", [json.dumps([1, 2, 3]), json.dumps("text"), "null"])
def test_read_model_config_not_an_object(tmp_path: Path, content: str) -> None:
    (tmp_path / CONFIG_NAME).write_text(content)
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object") as info:
        read_model_config(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def test_read_model_config_invalid_json(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text('{"n_layer": 2,,}')
    with pytest.raises(ValueError, match="invalid JSON") as info:
        read_model_config(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def test_import_config_does_not_import_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", "import sys, mmgpt.config; print('torch' in sys.modules)"],
        cwd=SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mlp_ratio", float("nan")),
        ("mlp_ratio", float("inf")),
        ("norm_eps", -1.0),
        ("rope_theta", 0.0),
        ("init_std", float("nan")),
        ("bias", "yes"),
        ("tie_embeddings", 1),
        ("dropout", "0.1"),
    ],
)
def test_non_finite_non_positive_and_mistyped_values_name_their_field(field, value) -> None:
    with pytest.raises(ValueError, match=rf"^GPTConfig\.{field}: "):
        GPTConfig(**{field: value})
