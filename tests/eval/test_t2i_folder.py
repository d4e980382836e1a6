"""Evaluating drawings on the user's own data: ``mmgpt train judge`` on labelled images, the
distribution statistics against direct computations, the CLIP score against transformers'
own forward pass, and the whole command-line path judge → t2i → eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmgpt.cli import main
from mmgpt.eval.image_stats import (
    channel_stats,
    distribution_report,
    frechet_distance,
    histogram_distance,
)
from mmgpt.eval.judge import load_judge

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
QUICK_JUDGE = [
    "train.max_steps=40",
    "train.batch_size=16",
    "train.warmup_steps=5",
    "train.progress=false",
    "train.eval_every=0",
    "train.log_every=1",
]


def square(colour: str, offset: int, canvas: tuple[int, int] = (40, 30)) -> Image.Image:
    image = Image.new("RGB", canvas, (240, 240, 235))
    ImageDraw.Draw(image).rectangle((offset, 4, offset + 14, 22), fill=COLOURS[colour])
    return image


def class_folders(root, n: int = 10):
    for colour in COLOURS:
        (root / colour).mkdir(parents=True)
        for i in range(n):
            square(colour, 6 + i % 8).save(root / colour / f"{i}.png")
    return root


def captioned_folder(root, n: int = 6):
    rows = []
    (root / "images").mkdir(parents=True)
    for colour in COLOURS:
        for i in range(n):
            name = f"images/{colour}_{i}.png"
            square(colour, 6 + i % 8).save(root / name)
            rows.append({"file_name": name, "text": f"a {colour} square", "color": colour})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


# -- the judge -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_judge(tmp_path_factory):
    data = class_folders(tmp_path_factory.mktemp("squares"))
    out = tmp_path_factory.mktemp("runs") / "judge"
    assert main(["train", "judge", "--data", str(data), "--out", str(out), *QUICK_JUDGE]) == 0
    return out


def test_a_judge_trained_on_class_subfolders_tells_red_from_blue(folder_judge) -> None:
    saved = json.loads((folder_judge / "model" / "judge.json").read_text())
    assert saved["labels"] == {"folder": ["blue", "red"]}
    assert saved["label_sources"] == ["folder"]
    assert saved["num_train"] + saved["num_heldout"] == 20 and saved["num_heldout"] == 4
    assert saved["heldout_accuracy"] == {"folder": 1.0, "all": 1.0}
    assert sorted(p.name for p in (folder_judge / "model").iterdir()) == [
        "judge.json",
        "judge.safetensors",
    ]
    lines = [json.loads(x) for x in (folder_judge / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train[-1]["step"] == 40 and train[-1]["loss"] < train[0]["loss"]
    assert lines[-1]["split"] == "eval" and lines[-1]["accuracy"] == 1.0
    # the run folder and its model/ both load; unseen squares (other size, place) are read right
    judge, meta = load_judge(folder_judge)
    assert meta["heldout_accuracy"]["all"] == 1.0
    fresh = [square("red", 2, (50, 50)), square("blue", 20, (50, 50))]
    assert judge.predict(fresh) == [{"folder": "red"}, {"folder": "blue"}]


def test_label_fields_several_attributes_and_clear_errors(tmp_path, capsys) -> None:
    data = captioned_folder(tmp_path / "data", n=4)
    rows = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["side"] = "left" if i % 2 else "right"
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "two"

    def train(out, *extra):
        argv = ["train", "judge", "--data", str(data), "--out", str(out)]
        return main([*argv, *QUICK_JUDGE, "train.max_steps=2", "train.batch_size=4", *extra])

    assert train(out, "data.labels=[color,side]") == 0
    judge, meta = load_judge(out / "model")
    assert judge.labels == {"color": ("blue", "red"), "side": ("left", "right")}
    assert set(meta["heldout_accuracy"]) == {"color", "side", "all"}

    # a field the rows lack, a field with one label, no labels at all: named errors
    assert train(tmp_path / "o1", "data.labels=[kind]") == 2
    assert "metadata.jsonl:1: no 'kind' field" in capsys.readouterr().err
    for row in rows:
        row["text"] = "a square"
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert train(tmp_path / "o2", "data.labels=text") == 2
    assert "attribute 'text' has one label ('a square')" in capsys.readouterr().err
    assert train(tmp_path / "o3") == 2
    assert "no labels found" in capsys.readouterr().err
    assert train(tmp_path / "o4", "data.lables=[color]") == 2
    assert "did you mean data.labels?" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="judge.safetensors is missing"):
        (out / "model" / "judge.safetensors").unlink()
        load_judge(out / "model")


# -- distribution statistics ---------------------------------------------------------------
def test_frechet_distance_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.7

    def direct(x, y):
        mu = x.mean(0) - y.mean(0)
        sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        # Tr sqrtm(sx @ sy) from the eigenvalues of the (non-symmetric) product itself
        trace_root = np.sqrt(np.linalg.eigvals(sx @ sy)).real.sum()
        return mu @ mu + np.trace(sx + sy) - 2 * trace_root

    assert frechet_distance(a, b) == pytest.approx(direct(a, b), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # a shift of every feature by d adds D * d**2
    for d in (0.5, 1.0, 2.0):
        assert frechet_distance(a, a + d) == pytest.approx(6 * d * d, rel=1e-6)
    # fewer samples than dimensions: singular covariances, still finite and >= 0
    few = rng.normal(size=(5, 40))
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(few, few + 1) == pytest.approx(40.0, rel=1e-6)


def test_colour_statistics_of_solid_images_are_hand_checkable() -> None:
    red = torch.zeros(4, 3, 8, 8)
    red[:, 0] = 1.0
    blue = torch.zeros(4, 3, 8, 8)
    blue[:, 2] = 1.0
    assert channel_stats(red) == {"mean": [1.0, 0.0, 0.0], "std": [0.0, 0.0, 0.0]}
    halves = torch.cat([red[:2], blue[:2]])
    assert channel_stats(halves)["mean"] == [0.5, 0.0, 0.5]
    assert channel_stats(halves)["std"] == pytest.approx([0.5, 0.0, 0.5])
    assert histogram_distance(red, red) == 0.0
    assert histogram_distance(red, blue) == 1.0  # no colour in common
    assert histogram_distance(red, halves) == 0.5
    report = distribution_report(halves, red)
    assert report["generated"]["diversity"] == pytest.approx(
        (4 * np.sqrt(2 / 3)) / 6  # 4 of the 6 pairs differ in two of three channels
    )
    assert report["real"]["diversity"] == 0.0
    assert report["frechet_features"] == "pixels_8x8" and report["real_halves"] is not None
    # the same set: zero distances
    same = distribution_report(red, red)
    assert same["histogram_distance"] == 0 and same["frechet_distance"] == pytest.approx(0)


# -- CLIP score ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from mmgpt.hf_fixtures import build_hf_clip_dir

    return build_hf_clip_dir(tmp_path_factory.mktemp("clip"), seed=0)


def test_clip_score_equals_transformers_own_computation(clip_dir) -> None:
    import transformers

    from mmgpt.eval.clip_score import ClipScorer, clip_scores

    images = [square("red", 4), square("blue", 12), square("red", 16, (30, 30))]
    texts = ["a red square", "a blue square", "something else entirely"]
    scorer = ClipScorer(clip_dir)
    ours = clip_scores(scorer.embed_images(images), scorer.embed_texts(texts))

    model = transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()
    processor = transformers.CLIPProcessor.from_pretrained(str(clip_dir))
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert torch.allclose(ours, 100 * cosine.clamp(min=0), atol=1e-4)
    assert (ours >= 0).all() and (ours <= 100).all()


def test_clip_directories_that_cannot_score_are_named(clip_dir, tmp_path) -> None:
    from mmgpt.eval.clip_score import ClipScorer
    from mmgpt.hf_fixtures import build_hf_vision_dir

    with pytest.raises(FileNotFoundError, match="no such directory"):
        ClipScorer(tmp_path / "nowhere")
    vision = build_hf_vision_dir(tmp_path / "vision", "clip")
    with pytest.raises(ValueError, match="model_type 'clip_vision_model'; a CLIP score needs"):
        ClipScorer(vision)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ClipScorer(broken)
    (broken / "model.safetensors").write_bytes((clip_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="cannot load its CLIPProcessor"):
        ClipScorer(broken)


# -- the whole command-line path -----------------------------------------------------------
def test_train_judge_then_t2i_then_eval_with_judge_and_clip(
    folder_judge, clip_dir, tmp_path, capsys
) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("timm")
    pytest.importorskip("mmgpt_text")
    data = captioned_folder(tmp_path / "data")
    judge_run = tmp_path / "judge"
    argv = ["train", "judge", "--data", str(data), "--out", str(judge_run), *QUICK_JUDGE]
    assert main([*argv, "train.batch_size=8", "data.labels=[color]"]) == 0
    t2i = tmp_path / "t2i"
    argv = ["train", "t2i", "--data", str(data), "--out", str(t2i)]
    small = [
        "train.max_steps=3",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.progress=false",
        "train.tensorboard=false",
        "data.eval_fraction=0",
        "model.image_decoder.image_size=16",
        "model.image_decoder.unet_config.block_out_channels=[8,16]",
        "data.prompt_template=draw {text}",
    ]
    assert main([*argv, *small]) == 0
    capsys.readouterr()

    argv = ["eval", "--task", "t2i", "--model", str(t2i / "model"), "--data", str(data)]
    assert main([*argv, "--judge", str(judge_run), "--clip", str(clip_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_prompts"] == 12
    # eval drew from the prompts the run trained on
    assert result["prompt_template"] == {
        "template": "draw {text}",
        "from": "the training run's recipe.yaml",
    }
    assert result["examples"][0]["prompt"].startswith("draw a ")
    judge = result["judge"]
    assert judge["chance"] == {"color": 0.5, "all": 0.5}  # two balanced colours
    assert judge["majority"] == {"color": 0.5, "all": 0.5}
    assert judge["real_accuracy"] == {"color": 1.0, "all": 1.0}  # the ceiling on this data
    assert judge["heldout_accuracy"]["all"] == 1.0
    assert 0.0 <= judge["accuracy"]["color"] <= 1.0
    clip = result["clip"]
    for key in ("generated", "real", "shuffled_real"):
        assert 0.0 <= clip[key] <= 100.0
    stats = result["distribution"]
    assert stats["frechet_features"] == "judge" and stats["frechet_distance"] >= 0
    assert 0 <= stats["histogram_distance"] <= 1 and stats["num_real"] == 12
    assert len(stats["generated"]["channel_mean"]) == 3

    # with no judge or CLIP: the statistics alone, on downsampled pixels
    assert main([*argv, "--limit", "4", "--prompt-template", "{text}"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert "judge" not in alone and "clip" not in alone
    assert alone["distribution"]["frechet_features"] == "pixels_8x8"
    assert alone["examples"][0]["prompt"] == "a red square"

    # a judge trained on other labels, options that belong to t2i, a template without {text}
    assert main([*argv, "--judge", str(folder_judge)]) == 2
    err = capsys.readouterr().err
    assert "no 'folder'" not in err and "a label the judge was not trained on" in err
    assert main([*argv, "--prompt-template", "draw"]) == 2
    assert "must hold '{text}'" in capsys.readouterr().err
    assert main([*argv[:2], "caption", *argv[3:], "--judge", str(judge_run)]) == 2
    assert "--judge applies to --task t2i, not caption" in capsys.readouterr().err


def test_judge_baselines_and_the_shuffled_pairing_are_hand_checkable() -> None:
    from mmgpt.eval.t2i import _chance, _derangement, _judge_accuracy

    targets = [
        {"color": "red", "kind": "circle"},
        {"color": "red", "kind": "square"},
        {"color": "red", "kind": "circle"},
        {"color": "blue", "kind": "circle"},
    ]
    baselines = _chance(targets, ["color", "kind"])
    assert baselines["chance"]["color"] == pytest.approx(0.75**2 + 0.25**2)
    assert baselines["majority"] == {"color": 0.75, "kind": 0.75, "all": 0.5}
    # (red, circle) twice, (red, square), (blue, circle): 0.5² + 0.25² + 0.25²
    assert baselines["chance"]["all"] == pytest.approx(0.375)
    verdicts = [targets[0], {"color": "red", "kind": "circle"}, None, targets[3]]
    assert _judge_accuracy(verdicts, targets, ["color", "kind"]) == {
        "color": 0.75,  # the missing drawing counts as wrong
        "kind": 0.5,
        "all": 0.5,
    }
    for n in (2, 3, 10):
        moved = _derangement(n, seed=n)
        assert sorted(moved) == list(range(n)) and all(moved[i] != i for i in range(n))


def test_the_prompt_template_comes_from_the_run_that_trained_the_model(tmp_path) -> None:
    from mmgpt.eval.t2i import training_prompt_template

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    assert training_prompt_template(model) is None  # no run recipe beside it
    recipe = tmp_path / "run" / "recipe.yaml"
    recipe.write_text("data:\n  name: imagefolder\n  path: x\n")
    assert training_prompt_template(model) == "{text}"  # the imagefolder's default
    recipe.write_text("data:\n  name: imagefolder\n  prompt_template: 'please draw {text}'\n")
    assert training_prompt_template(model) == "please draw {text}"
    recipe.write_text("data:\n  name: shapes\n  task: t2i\n")
    assert training_prompt_template(model) == "draw {text}"  # the shapes world's prompts
    recipe.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="recipe.yaml: invalid YAML"):
        training_prompt_template(model)


def test_auto_labels_are_the_class_subfolders_even_beside_captions() -> None:
    # the README's flow: one captioned imagefolder in class subfolders trains t2i and the judge
    from pathlib import Path

    from mmgpt.eval.judge_training import FOLDER, LabelledRow, resolve_label_sources

    rows = [
        LabelledRow(Path(f"data/{c}/{i}.png"), {"text": f"a {c} square"}, f"m:{i}")
        for i, c in enumerate(["red", "blue"])
    ]
    assert resolve_label_sources(rows, None, "data") == [FOLDER]
    flat = [LabelledRow(Path(f"data/{i}.png"), {"text": "x"}, f"m:{i}") for i in range(2)]
    with pytest.raises(ValueError, match="no labels found"):
        resolve_label_sources(flat, None, "data")
