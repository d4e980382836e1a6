"""A recipe's ``stages`` (a curriculum): each stage trains on from the whole model of the one
before, a finished stage is reused, and a bad stage key is an error that names its stage."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("timm")

from mmgpt.files import load_tensors
from mmgpt.recipe import apply_overrides, load_recipe, run_training
from mmgpt.recipe.stages import stage_recipes

TINY = [
    "model.block_size=64",
    "data.max_shapes=1",
    "data.size=200",
    "data.eval_fraction=0.05",
    "train.batch_size=8",
    "train.lr=4e-3",
    "train.warmup_steps=1",
    "train.eval_batches=1",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
]
# the second stage trains only the projector (train.stage=align): the GPT it ends with is
# exactly the one the first stage handed on
STAGES = [
    "stages.first.train.max_steps=3",
    "stages.first.train.save_every=2",
    "stages.second.train.max_steps=2",
    "stages.second.train.stage=align",
]


def _part(tensors: dict, prefix: str) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def test_each_stage_starts_from_the_whole_model_of_the_one_before(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    result = run_training("caption", out=out, overrides=[*TINY, *STAGES])
    assert result["stages"] == ["first", "second"]
    assert result["model_dir"] == str(out / "model")

    first = load_tensors(out / "stages" / "first" / "model" / "model.safetensors")
    final = load_tensors(out / "model" / "model.safetensors")
    gpt_first, gpt_final = _part(first, "gpt."), _part(final, "gpt.")
    assert gpt_first and gpt_first.keys() == gpt_final.keys()
    for key in gpt_first:  # carried over bit for bit: the second stage froze the GPT
        torch.testing.assert_close(gpt_final[key], gpt_first[key], rtol=0, atol=0)
    projector_first, projector_final = _part(first, "projectors."), _part(final, "projectors.")
    assert projector_first
    assert any(not torch.equal(projector_final[k], projector_first[k]) for k in projector_first)

    # the tokenizer came with the model: the final directory's is the first stage's
    first_tok = (out / "stages" / "first" / "model" / "tokenizer.json").read_text()
    assert (out / "model" / "tokenizer.json").read_text() == first_tok
    # the second stage's own run: its steps, and a recipe that says where it started
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    recorded = (out / "recipe.yaml").read_text()
    assert str(out / "stages" / "first" / "model") in recorded
    assert "stage: align" in recorded
    whole = yaml.safe_load((out / "stages" / "recipe.yaml").read_text())
    assert list(whole["stages"]) == ["first", "second"]

    # run again with --resume: the finished first stage is reused, not trained again
    capsys.readouterr()
    before = (out / "stages" / "first" / "model" / "model.safetensors").stat().st_mtime_ns
    with warnings.catch_warnings():  # the same recipe: nothing to warn about
        warnings.simplefilter("error", RuntimeWarning)
        run_training("caption", out=out, overrides=[*TINY, *STAGES], resume=True)
    assert "stage first: done before" in capsys.readouterr().out
    after = (out / "stages" / "first" / "model" / "model.safetensors").stat().st_mtime_ns
    assert after == before
    # a finished stage whose keys changed since is still reused, and the run says so (as the
    # whole recipe's record says that the resumed run changed)
    changed = [*TINY, *STAGES, "stages.first.train.lr=1e-3"]
    with (
        pytest.warns(RuntimeWarning, match=r"resuming .* changed recipe"),
        pytest.warns(RuntimeWarning, match=r"stage first: reusing .*\(train\.lr\)"),
    ):
        run_training("caption", out=out, overrides=changed, resume=True)
    assert (out / "stages" / "first" / "model" / "model.safetensors").stat().st_mtime_ns == before

    # interrupted in the first stage after its step-2 checkpoint: the command run again
    # resumes that stage (to the same weights as without the interruption), then the next
    first_dir = out / "stages" / "first"
    shutil.rmtree(first_dir / "model")
    shutil.rmtree(first_dir / "checkpoints" / "step_00000003")
    for leftover in ("model", "checkpoints", "metrics.jsonl"):
        path = out / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_training("caption", out=out, overrides=[*TINY, *STAGES])
    again = load_tensors(first_dir / "model" / "model.safetensors")
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)
    logged = [json.loads(line) for line in (first_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in logged if r.get("split") == "train"]
    assert train_steps == sorted(set(train_steps)) and max(train_steps) == 3
    assert (out / "model" / "model.safetensors").is_file()


def test_a_stage_merges_its_keys_into_the_recipe() -> None:
    spec = apply_overrides(
        {**load_recipe("shapes-tiny"), "stages": {}},
        [
            "stages.reading.data.task_weights.vqa=0",
            "stages.reading.data.task_weights.t2i=0.05",
            "stages.reading.train.max_steps=7",
            "stages.everything.train.lr=1e-3",
        ],
    )
    (first, reading), (second, everything) = stage_recipes(spec)
    assert (first, second) == ("reading", "everything")
    assert reading["data"]["task_weights"] == {"caption": 1, "vqa": 0, "t2i": 0.05}
    assert reading["train"]["max_steps"] == 7 and reading["train"]["lr"] == 2e-3
    assert everything["data"]["task_weights"] == {"caption": 1, "vqa": 2, "t2i": 9}
    assert everything["train"]["lr"] == 1e-3 and everything["train"]["max_steps"] == 4500
    assert not reading["stages"] and not everything["stages"]


def test_bad_stages_are_errors_before_anything_trains(tmp_path) -> None:
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"stages.second.*train.max_stepz.*max_steps"):
        run_training("caption", out=out, overrides=[*TINY, "stages.second.train.max_stepz=2"])
    assert not (out / "stages").exists()
    with pytest.raises(ValueError, match="a stage name is a folder name"):
        stage_recipes({**load_recipe("caption"), "stages": {"../up": {}}})
    with pytest.raises(ValueError, match="stages.first' must be a mapping"):
        stage_recipes({**load_recipe("caption"), "stages": {"first": 3}})
    with pytest.raises(ValueError, match="needs model.architecture=multimodal"):
        stage_recipes(apply_overrides(load_recipe("lm"), ["stages.first.train.max_steps=2"]))


def test_the_documented_curriculum_is_the_shipped_recipes() -> None:
    """docs/concepts.md shows shapes-tiny's stages; they must be the recipe's own."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "concepts.md").read_text()
    section = text[text.index("**A curriculum in the same command.**") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert yaml.safe_load(block)["stages"] == load_recipe("shapes-tiny")["stages"]
