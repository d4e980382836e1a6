"""The caption and vqa recipes end to end: training on the shapes world, LLaVA's stages,
resuming, evaluation of the saved model, and ``mmgpt data check`` on an imagefolder."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("mmgpt_text")

from mmgpt.data.shapes import ShapesWorld
from mmgpt.files import load_tensors
from mmgpt.recipe import (
    apply_overrides,
    load_recipe,
    recipe_names,
    run_training,
    trainable_parts,
    validate_recipe,
)

# a tiny, fast configuration of the shipped recipe: one shape per image, 32 px (the tiny ViT's
# input size), a short context
TINY = [
    "model.block_size=64",
    "data.max_shapes=1",
    "data.size=800",
    "data.eval_fraction=0.05",
    "train.batch_size=16",
    "train.lr=4e-3",
    "train.min_lr=4e-4",
    "train.warmup_steps=5",
    "train.eval_batches=2",
    "train.log_every=5",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
]
STEPS = 60


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("caption") / "run"
    overrides = [*TINY, f"train.max_steps={STEPS}", "train.eval_every=5", "train.eval_batches=1"]
    result = run_training("caption", out=out, overrides=overrides)
    return out, result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The shapes world exported as an imagefolder (captions), as a user's data would be."""
    root = tmp_path_factory.mktemp("folder")
    ShapesWorld(task="caption", image_size=32, max_shapes=1, seed=4).write_imagefolder(root, 48)
    return root


def frozen_and_trained(before: dict, after: dict, prefixes: tuple[str, ...]) -> tuple[set, set]:
    """Keys bit-identical before/after, and keys that changed; ``prefixes`` must have changed."""
    assert before.keys() == after.keys()
    same = {k for k in before if torch.equal(before[k], after[k])}
    changed = set(before) - same
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in changed), f"nothing under {prefix} trained"
    return same, changed


def test_shipped_recipes_are_valid_and_reject_unknown_keys(tmp_path: Path) -> None:
    assert {"caption", "vqa"} <= set(recipe_names())
    for name in ("caption", "vqa"):
        recipe = load_recipe(name)
        validate_recipe(recipe)
        assert recipe["model"]["architecture"] == "multimodal"
        assert recipe["model"]["encoder"] == {"type": "vit", "name": "vit_tiny_custom"}
        assert recipe["objective"]["name"] == "sft" and recipe["data"]["name"] == "shapes"
    recipe = apply_overrides(
        load_recipe("caption"),
        [
            "model.encoder.name=vit_base_patch16_224",
            "model.encoder.pretrained_path=/weights/vit.safetensors",
            "model.projector.depth=3",
            "train.stage=finetune",
            "train.train_encoder=true",
            "data.truncation=true",
        ],
    )
    assert recipe["model"]["encoder"]["name"] == "vit_base_patch16_224"
    assert recipe["model"]["projector"] == {"type": "mlp2x_gelu", "depth": 3}
    bad = {
        "model.projector.dept=3": r"did you mean model.projector.depth\?",
        "model.encoderr.type=vit": r"'model.encoderr.type' \(did you mean model.encoder\?\)",
        "train.stag=align": r"did you mean train.stage\?",
        "data.caption_promt=x": r"did you mean data.caption_prompt\?",
        "model.architecture=cnn": r"must be one of gpt, multimodal",
    }
    for override, match in bad.items():
        with pytest.raises(ValueError, match=match):
            recipe = apply_overrides(load_recipe("caption"), ["data.name=imagefolder", override])
            validate_recipe(recipe)
    # the shapes world takes **options: its unknown keys fail when it is built, before any write
    with pytest.raises(ValueError, match=r"'data' \(dataset 'shapes'\).*eval_fractoin"):
        run_training("caption", out=tmp_path / "run", overrides=["data.eval_fractoin=0.1"])
    assert not (tmp_path / "run").exists()
    # stage keys and components belong to multimodal recipes only
    for override in ("train.stage=align", "model.encoder.type=vit"):
        with pytest.raises(ValueError, match="unknown recipe key"):
            apply_overrides(load_recipe("lm"), [override])


def test_stages_select_the_trainable_parts() -> None:
    assert trainable_parts() == trainable_parts("full", True) == "all"
    assert trainable_parts("full", False) == (
        "gpt+projector+image_decoder+output_projector+decoders+output_projectors"
    )
    assert trainable_parts("align") == "projector"
    assert trainable_parts("finetune") == "projector+gpt"
    assert trainable_parts("finetune", True) == "projector+gpt+encoder"
    assert trainable_parts("decoder") == (
        "image_decoder+output_projector+decoders+output_projectors"
    )
    with pytest.raises(ValueError, match="align trains the projector only"):
        trainable_parts("align", True)
    with pytest.raises(ValueError, match="decoder trains the output projectors and decoders"):
        trainable_parts("decoder", True)
    with pytest.raises(ValueError, match="must be one of full, align, finetune, decoder"):
        trainable_parts("pretrain")


def test_caption_training_lowers_held_out_loss_and_the_model_evaluates(trained) -> None:
    from mmgpt.eval import run_eval
    from mmgpt.multimodal import MultimodalGPT

    out, result = trained
    assert result["step"] == STEPS and result["model_dir"] == str(out / "model")
    evals = [r for r in records(out / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == list(range(5, STEPS + 1, 5))
    first, last = evals[0]["loss"], evals[-1]["loss"]
    print(f"held-out loss: step 5 {first:.3f} -> step {STEPS} {last:.3f}")
    assert last < 0.5 * first and last < 1.5
    assert evals[-1]["token_accuracy"] > 0.5

    model = MultimodalGPT.from_pretrained(out / "model")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architecture"] == "multimodal"
    assert config["encoders"]["image"]["config"]["name"] == "vit_tiny_custom"
    assert config["projectors"]["image"]["name"] == "mlp2x_gelu"
    assert model.config.block_size == 64 and model.config.vocab_size == model.tokenizer.vocab_size
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    metrics = run_eval(out / "model", "shapes:size=32,max_shapes=1", "caption", batch_size=16)
    print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}))
    assert metrics["task"] == "caption" and metrics["num_samples"] == 32
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["bleu"] <= 100.0
    assert set(metrics["attributes"]) == {"shape", "color", "size", "position", "count"}
    assert all(0.0 <= v <= 1.0 for v in metrics["attributes"].values())
    # it has learned the caption grammar: one well-formed shape description per image
    assert metrics["attributes"]["count"] > 0.8 and metrics["bleu"] > 10.0
    assert len(metrics["examples"]) == 5 and set(metrics["examples"][0]) == {
        "prompt",
        "prediction",
        "reference",
    }
    json.dumps(metrics)  # what the CLI prints

    vqa = run_eval(out / "model", "shapes:size=8", "vqa", batch_size=8, max_new_tokens=4)
    assert vqa["num_samples"] == 8 and 0.0 <= vqa["exact_match"] <= 1.0
    assert sum(t["count"] for t in vqa["per_type"].values()) == 8
    with pytest.raises(ValueError, match="task must be one of caption, vqa, t2i"):
        run_eval(out / "model", "shapes", "poetry")
    with pytest.raises(ValueError, match="no image decoder"):  # t2i goes to its own evaluation
        run_eval(out / "model", "shapes", "t2i")


def test_align_then_finetune_on_an_imagefolder_with_resume(trained, folder, tmp_path) -> None:
    out, _ = trained
    base = [*TINY, "data.eval_fraction=0", "train.save_every=2"]
    before = load_tensors(out / "model" / "model.safetensors")

    # stage 1: only the projector trains; GPT and encoder stay bit-identical
    align = tmp_path / "align"
    stage1 = [*base, "train.stage=align", f"model.from={out / 'model'}"]
    run_training("caption", data=folder, out=align, overrides=[*stage1, "train.max_steps=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "resuming with a changed recipe"
        resumed = run_training(
            "caption", data=folder, out=align, resume=True, overrides=[*stage1, "train.max_steps=3"]
        )
    assert resumed["step"] == 3
    recipe = load_recipe(align / "recipe.yaml")
    assert recipe["data"]["name"] == "imagefolder" and recipe["data"]["path"] == str(folder)
    after_align = load_tensors(align / "model" / "model.safetensors")
    same, changed = frozen_and_trained(before, after_align, ("projectors.image.",))
    assert all(k.startswith("projectors.") for k in changed)
    assert any(k.startswith("gpt.") for k in same) and any(k.startswith("encoders.") for k in same)

    # stage 2: projector + GPT train from stage 1's model; the encoder stays frozen; batches
    # grouped by length (a window of two), through the resume too
    finetune = tmp_path / "finetune"
    stage2 = [*base, "train.stage=finetune", f"model.from={align / 'model'}"]
    stage2.append("train.length_grouping=2")
    run_training("caption", data=folder, out=finetune, overrides=[*stage2, "train.max_steps=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        resumed = run_training(
            "caption",
            data=folder,
            out=finetune,
            resume=True,
            overrides=[*stage2, "train.max_steps=4"],
        )
    assert resumed["step"] == 4
    log = records(finetune / "metrics.jsonl")
    assert [r["step"] for r in log if r["split"] == "train"] == [2, 4]  # each run's last step
    after = load_tensors(finetune / "model" / "model.safetensors")
    same, changed = frozen_and_trained(after_align, after, ("projectors.image.", "gpt."))
    assert all(k.startswith("encoders.") for k in same)
    assert all(math.isfinite(v) for v in resumed["train"].values())


def test_data_check_and_eval_through_the_cli(trained, folder, capsys) -> None:
    from mmgpt.cli import main

    assert main(["data", "check", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "format:   imagefolder" in text and "48 usable samples" in text
    assert "result:   OK" in text and "lengths (chars)" in text
    model_dir = str(trained[0] / "model")
    assert main(["data", "check", str(folder), "--model", model_dir, "--json"]) == 0
    lengths = json.loads(capsys.readouterr().out)["lengths"]
    assert lengths["unit"] == "tokens" and 5 < lengths["max"] < 64

    data = "shapes:size=6,max_shapes=1"
    assert main(["eval", "--model", model_dir, "--data", data, "--limit", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out)  # --task defaults to caption
    assert metrics["task"] == "caption" and metrics["num_samples"] == 3
    assert {"exact_match", "bleu", "attributes", "examples"} <= metrics.keys()
    (folder / "metadata.jsonl").write_text(
        (folder / "metadata.jsonl").read_text()
        + '{"file_name": "images/missing.png", "text": "x"}\n'
    )
    assert main(["data", "check", str(folder), "--strict", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problem_counts"] == {"missing_image": 1} and report["num_samples"] == 48


def test_changing_a_component_type_replaces_the_component() -> None:
    """``model.encoder.type=clip`` on a recipe whose file configures a timm ViT: the file's
    ViT arguments are dropped, the override's arguments (in any order) go to the new type."""
    recipe = apply_overrides(
        load_recipe("caption"), ["model.encoder.path=/models/clip", "model.encoder.type=clip"]
    )
    validate_recipe(recipe)
    assert recipe["model"]["encoder"] == {"type": "clip", "path": "/models/clip"}
    with pytest.raises(ValueError, match=r"model\.encoder\.depth.*clip"):
        apply_overrides(
            load_recipe("caption"), ["model.encoder.type=clip", "model.encoder.depth=2"]
        )
    # the same type again keeps the file's arguments
    same = apply_overrides(load_recipe("caption"), ["model.encoder.type=vit"])
    assert same["model"]["encoder"] == {"type": "vit", "name": "vit_tiny_custom"}


def test_an_explicit_block_size_is_the_window_of_a_run_from_a_model_directory(tmp_path) -> None:
    import mmgpt_text
    from mmgpt.multimodal import MultimodalGPT

    world = ShapesWorld(task="caption", size=50, max_shapes=1, image_size=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(world[i].meta["caption"] for i in range(50)))
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300)
    MultimodalGPT.build("gpt-nano", tok, block_size=128).save_pretrained(tmp_path / "mm")
    small = [o for o in TINY if not o.startswith("model.block_size")]
    common = [f"model.from={tmp_path / 'mm'}", *small, "train.max_steps=1", "data.size=64"]
    with pytest.raises(ValueError, match="exceed max_length=16"):
        run_training("caption", out=tmp_path / "a", overrides=[*common, "model.block_size=16"])
    assert run_training("caption", out=tmp_path / "b", overrides=common)["step"] == 1


def test_an_encoder_starts_from_another_model_directory(tmp_path) -> None:
    """``model.encoder.from=DIR``: the encoder's weights come from DIR (e.g. a ``clip`` run),
    the rest of the model is the recipe's own (here a wider GPT than DIR's)."""
    import mmgpt_text
    from mmgpt.multimodal import MultimodalGPT

    world = ShapesWorld(task="caption", size=50, max_shapes=1, image_size=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(world[i].meta["caption"] for i in range(50)))
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300)
    source = MultimodalGPT.build("gpt-nano", tok, block_size=64)
    with torch.no_grad():
        for p in source.encoders["image"].parameters():
            p.add_(torch.randn_like(p))  # weights no fresh initialisation could give
    source.save_pretrained(tmp_path / "src")
    theirs = {k: v for k, v in load_tensors(tmp_path / "src" / "model.safetensors").items()}

    overrides = [*TINY, f"model.encoder.from={tmp_path / 'src'}", "model.preset=gpt-micro"]
    run_training("caption", out=tmp_path / "run", overrides=[*overrides, "train.max_steps=1"])
    ours = load_tensors(tmp_path / "run" / "model" / "model.safetensors")
    encoder_keys = [k for k in theirs if k.startswith("encoders.image.")]
    assert encoder_keys
    for key in encoder_keys:  # the encoder is frozen in this recipe: exactly DIR's weights
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    wte = "gpt.transformer.wte.weight"
    assert ours[wte].shape[1] == 128 and theirs[wte].shape[1] == 48  # the recipe's own GPT

    config_path = tmp_path / "src" / "config.json"
    config = json.loads(config_path.read_text())
    config["encoders"]["image"]["name"] = "spectrogram"  # another registry entry
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="its image encoder is 'spectrogram', this recipe's is"):
        run_training("caption", out=tmp_path / "other", overrides=[*overrides, "train.max_steps=1"])
    config["encoders"]["image"]["name"] = "vit"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape .64,., the model expects .32,."):
        run_training(
            "caption",
            out=tmp_path / "wider",
            overrides=[*overrides, "model.encoder.embed_dim=32", "train.max_steps=1"],
        )


def test_encoder_pretraining_runs_first_and_its_encoder_starts_the_run(tmp_path, capsys) -> None:
    """``encoder_pretraining``: a ``clip`` stage into OUT/encoder_pretraining, whose encoder
    the run starts from; reused when the run is resumed; skipped under model.encoder.from."""
    stage = [
        "encoder_pretraining.recipe=clip",
        "encoder_pretraining.overrides.train.max_steps=3",
        "encoder_pretraining.overrides.train.batch_size=8",
        "encoder_pretraining.overrides.data.size=120",
        "encoder_pretraining.overrides.data.max_shapes=1",
    ]
    overrides = [*TINY, *stage, "train.max_steps=2", "data.size=120"]
    out = tmp_path / "run"
    run_training("caption", out=out, overrides=overrides)
    stage_model = out / "encoder_pretraining" / "model"
    assert (stage_model / "contrastive_config.json").is_file()  # the clip recipe ran there
    # the run's own progress, device and tensorboard settings (TINY) reached the sub-run
    sub = load_recipe(out / "encoder_pretraining" / "recipe.yaml")["train"]
    assert (sub["progress"], sub["device"], sub["tensorboard"]) == (False, "cpu", False)
    assert not (out / "encoder_pretraining" / "tensorboard").exists()
    theirs = load_tensors(stage_model / "model.safetensors")
    ours = load_tensors(out / "model" / "model.safetensors")
    keys = [k for k in theirs if k.startswith("encoders.image.")]
    assert keys
    for key in keys:  # caption keeps the encoder frozen: exactly the stage's weights
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert "encoders.image.model.blocks.0.attn.qkv.weight" in keys

    capsys.readouterr()
    run_training("caption", out=out, overrides=overrides, resume=True)
    assert "encoder_pretraining done before" in capsys.readouterr().out

    other = tmp_path / "given"
    run_training("caption", out=other, overrides=[*overrides, f"model.encoder.from={stage_model}"])
    assert not (other / "encoder_pretraining").exists()
    assert "encoder_pretraining skipped" in capsys.readouterr().out

    with pytest.raises(ValueError, match="encoder_pretraining.recipe"):
        run_training(
            "caption",
            out=tmp_path / "norecipe",
            overrides=[*TINY, "encoder_pretraining.overrides.train.max_steps=3"],
        )
    with pytest.raises(ValueError, match="needs model.architecture=multimodal"):
        apply_overrides(load_recipe("lm"), ["encoder_pretraining.recipe=clip"])
