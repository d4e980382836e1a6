"""Recipes: loading, dotted overrides, key validation, and the shipped ``lm`` recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmgpt.recipe import (
    apply_overrides,
    load_recipe,
    parse_scalar,
    recipe_names,
    run_training,
    validate_recipe,
)


def test_shipped_lm_recipe_is_valid() -> None:
    assert "lm" in recipe_names()
    recipe = load_recipe("lm")
    validate_recipe(recipe)
    assert recipe["objective"]["name"] == "lm" and recipe["data"]["name"] == "text"
    assert isinstance(recipe["train"]["lr"], float)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("3.0e-4", 3e-4), ("2", 2), ("true", True), ("[0.8, 0.9]", [0.8, 0.9])],
)
def test_values_are_yaml_scalars(text: str, value) -> None:
    assert parse_scalar(text) == value


def test_dotted_overrides() -> None:
    recipe = apply_overrides(
        load_recipe("lm"), ["train.lr=1e-3", "model.n_layer=2", "train.betas=[0.8, 0.9]"]
    )
    assert recipe["train"]["lr"] == 1e-3 and recipe["model"]["n_layer"] == 2
    assert recipe["train"]["betas"] == [0.8, 0.9]
    # the CLI passes a mapping of strings
    recipe = apply_overrides(recipe, {"train.max_steps": "7", "data.eval_fraction": "0.2"})
    assert recipe["train"]["max_steps"] == 7 and recipe["data"]["eval_fraction"] == 0.2
    assert load_recipe("lm")["train"]["lr"] != 1e-3  # the shipped recipe is untouched


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.learning_rate=1", r"unknown recipe key 'train.learning_rate'.*valid keys .*\blr\b"),
        ("trainer.lr=1", r"unknown recipe key 'trainer.lr': valid sections are .*train"),
        ("model.n_layr=2", r"did you mean model.n_layer\?"),
        ("data.pathz=x", r"'data.pathz'.*valid keys of 'data': .*eval_fraction.*paths"),
        ("tokenizer.vocab=5", r"'tokenizer.vocab'.*did you mean tokenizer.vocab_size"),
        ("lr=1", r"must name a key inside a section"),
        ("train.lr", r"not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_overrides(load_recipe("lm"), [override])


def test_unknown_key_in_a_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data: {name: text}\nobjective: {name: lm}\ntrain: {lrr: 1}\n")
    with pytest.raises(ValueError, match="unknown recipe key 'train.lrr'"):
        validate_recipe(load_recipe(path))
    with pytest.raises(FileNotFoundError, match="shipped recipes: .*lm"):
        load_recipe("no-such-recipe")


def test_lm_recipe_end_to_end_on_the_example_corpus(tmp_path: Path) -> None:
    pytest.importorskip("mmgpt_text")
    from mmgpt.model import GPT
    from mmgpt.registry import create

    out = tmp_path / "run"
    overrides = [
        "train.max_steps=3",
        "train.batch_size=2",
        "train.eval_batches=1",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
        "model.block_size=32",
        "tokenizer.vocab_size=300",
    ]
    result = run_training("lm", out=out, overrides=overrides)  # default data: shipped corpus
    assert result["step"] == 3 and result["model_dir"] == str(out / "model")
    assert result["eval"]["loss"] > 0 and "perplexity" in result["eval"]

    model = GPT.from_pretrained(out / "model")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["tokenizer"]["name"] == "bpe"
    tokenizer = create("tokenizer", "bpe", path=str(out / "model"))
    assert model.config.vocab_size == tokenizer.vocab_size == 300
    assert model.config.block_size == 32 and model.config.dropout == 0.1
    assert (out / "recipe.yaml").is_file()

    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run_training("lm", out=out, overrides=overrides)
    again = run_training("lm", out=out, resume=True, overrides=overrides)  # already finished
    assert again["step"] == 3


def test_data_argument_must_exist(tmp_path: Path) -> None:
    pytest.importorskip("mmgpt_text")
    with pytest.raises(FileNotFoundError, match="no files match .*missing"):
        run_training("lm", data=str(tmp_path / "missing" / "*.txt"), out=tmp_path / "o")


def test_text_data_without_a_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    recipe = {
        "model": {"preset": "gpt-nano"},
        "data": {"name": "text"},
        "objective": {"name": "lm"},
        "train": {"max_steps": 1},
    }
    with pytest.raises(ValueError, match="needs a tokenizer"):
        run_training(recipe, out=tmp_path)
