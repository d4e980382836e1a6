"""Text-to-image evaluation: the judge (trained on real scenes, cached) and the t2i metrics."""

from __future__ import annotations

import json

import pytest
import torch

from mmgpt.data.shapes import Shape, render_scene
from mmgpt.eval import judge as judge_module
from mmgpt.eval.judge import JudgeConfig, judge_dir, load_or_train_judge
from mmgpt.eval.t2i import T2IPrompt, load_t2i_prompts, score_images

# a quick judge: 3 kinds x 3 colours, large shapes, all 9 positions, 32 px
QUICK = JudgeConfig(
    kinds=("circle", "square", "triangle"),
    colors=("red", "green", "blue"),
    sizes=("large",),
    steps=60,
    batch_size=32,
    lr=5e-3,
    heldout=300,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("judge-cache")


@pytest.fixture(scope="module")
def quick_judge(cache):
    return load_or_train_judge(QUICK, cache_dir=cache)


def test_a_quickly_trained_judge_is_accurate_on_held_out_real_scenes(quick_judge, cache) -> None:
    judge, accuracy = quick_judge
    assert accuracy["all"] >= 0.95, accuracy
    assert set(accuracy) == {"shape", "color", "size", "position", "all"}
    # it reads the attributes of scenes it never saw, rendered by the dataset
    scenes = [
        Shape("triangle", "blue", "large", "top right"),
        Shape("circle", "red", "large", "bottom left"),
        Shape("square", "green", "large", "center"),
    ]
    verdicts = judge.predict([render_scene([s], 32) for s in scenes])
    assert [(v["shape"], v["color"], v["position"]) for v in verdicts] == [
        (s.shape, s.color, s.position) for s in scenes
    ]


def test_the_judge_is_cached_by_config_hash(quick_judge, cache, monkeypatch) -> None:
    judge, accuracy = quick_judge
    directory = judge_dir(QUICK, cache)
    assert directory.name == QUICK.hash() and len(QUICK.hash()) == 16
    assert (directory / "judge.safetensors").is_file()
    saved = json.loads((directory / "judge.json").read_text())
    assert saved["heldout_accuracy"] == accuracy and saved["hash"] == QUICK.hash()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached judge must not be trained again")

    monkeypatch.setattr(judge_module, "train_judge", no_training)
    again, again_accuracy = load_or_train_judge(QUICK, cache_dir=cache)
    assert again_accuracy == accuracy
    for (name, a), b in zip(judge.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = JudgeConfig(**{**QUICK.__dict__, "seed": 1})
    assert other.hash() != QUICK.hash()  # any change of the config: another judge
    with pytest.raises(ValueError, match="JudgeConfig.kinds"):
        JudgeConfig(kinds=("hexagon",))


def test_scoring_counts_attributes_and_missing_images(quick_judge) -> None:
    judge, _ = quick_judge
    red_circle = {"shape": "circle", "color": "red", "size": "large", "position": "left"}
    blue_square = {"shape": "square", "color": "blue", "size": "large", "position": "top"}
    images = [
        render_scene([Shape(**red_circle)], 32),  # right on everything
        render_scene([Shape("circle", "green", "large", "left")], 32),  # wrong colour
        None,  # the model drew nothing
        render_scene([Shape(**blue_square)], 32),
    ]
    targets = [red_circle, red_circle, red_circle, {"shape": "square", "color": "blue"}]
    scores = score_images(judge, images, targets)
    assert scores["image_rate"] == 0.75
    assert scores["shape_and_color"] == 0.5
    assert scores["accuracy"]["shape"] == 0.75 and scores["accuracy"]["color"] == 0.5
    assert scores["accuracy"]["position"] == pytest.approx(2 / 3)  # asked of three prompts
    assert scores["all_attributes"] == 0.5
    assert scores["verdicts"][2] is None


def test_prompts_come_from_the_shapes_world_and_prompt_files(tmp_path) -> None:
    prompts, skipped = load_t2i_prompts("shapes:size=5,seed=3", image_size=32)
    assert len(prompts) == 5 and skipped == 0
    assert all(p.prompt == "draw " + _describe(p.target) for p in prompts)
    assert set(prompts[0].target) == {"shape", "color", "size", "position"}

    text = tmp_path / "prompts.txt"
    text.write_text(
        "draw a red circle on the left\n\ndraw two shapes: a red circle on the left and a "
        "blue star on the right\n"
    )
    prompts, skipped = load_t2i_prompts(text)
    assert [p.target for p in prompts] == [{"shape": "circle", "color": "red", "position": "left"}]
    assert skipped == 1  # the judge scores one-shape scenes only

    rows = tmp_path / "prompts.jsonl"
    scene = [{"shape": "star", "color": "blue", "size": "small", "position": "center"}]
    rows.write_text(json.dumps({"prompt": "draw something", "scene": scene}) + "\n")
    prompts, _ = load_t2i_prompts(rows)
    assert prompts[0].target == scene[0]
    rows.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: invalid JSON"):
        load_t2i_prompts(rows)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_t2i_prompts(tmp_path / "missing.txt")


def _describe(target: dict) -> str:
    return Shape(**target).describe()


def test_evaluate_end_to_end_on_a_tiny_model(quick_judge, tmp_path) -> None:
    pytest.importorskip("diffusers")
    mmgpt_text = pytest.importorskip("mmgpt_text")
    from mmgpt.eval.t2i import evaluate_t2i, run_t2i_eval
    from mmgpt.imagegen import ImageGenerationConfig
    from mmgpt.multimodal import MultimodalGPT

    judge, accuracy = quick_judge
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("User: draw a large red circle on the left\nAssistant: \n" * 20)
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=280, num_signal_tokens=2)
    torch.manual_seed(0)
    model = MultimodalGPT.build(
        "gpt-nano",
        tok,
        encoder=None,
        block_size=96,
        image_decoder="diffusion",
        image_decoder_kwargs={"condition_dim": 16, "num_condition_tokens": 2, "image_size": 32},
        output_projector="signal_mlp",
    )
    prompts = [
        T2IPrompt(f"draw a large {c} {k} on the left", {"shape": k, "color": c})
        for c, k in [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    ]
    config = ImageGenerationConfig(steps=2, seed=0)
    metrics = evaluate_t2i(
        model,
        prompts,
        judge=judge,
        judge_accuracy=accuracy,
        image_config=config,
        diversity_prompts=2,
        diversity_seeds=3,
        force_image=True,
    )
    assert metrics["num_prompts"] == 3 and metrics["image_rate"] == 1.0
    assert 0.0 <= metrics["shape_and_color"] <= 1.0
    assert set(metrics["accuracy"]) == {"shape", "color"}  # what the prompts name
    assert metrics["diversity"]["pairs"] == 2 * 3  # two prompts, three pairs of seeds each
    assert metrics["diversity"]["pairwise_distance"] > 0  # different seeds, different images
    assert metrics["judge"]["heldout_accuracy"]["all"] >= 0.95
    assert len(metrics["examples"]) == 3
    json.dumps(metrics)  # JSON-ready

    model.save_pretrained(tmp_path / "model")
    result = run_t2i_eval(
        tmp_path / "model",
        "shapes:size=2",
        steps=2,
        judge=judge,
        judge_accuracy=accuracy,
        diversity_prompts=0,
        force_image=True,
    )
    assert result["task"] == "t2i" and result["num_prompts"] == 2
