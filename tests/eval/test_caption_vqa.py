"""Caption and VQA metrics against hand-computed values, and the evaluation data specs."""

from __future__ import annotations

import math
import random

import pytest

from mmgpt.data.shapes import ShapesWorld, ask_question, caption
from mmgpt.eval.caption import attribute_accuracy, caption_metrics
from mmgpt.eval.metrics import bleu, exact_match, normalize_answer
from mmgpt.eval.run import eval_items, load_eval_data, parse_shapes_spec
from mmgpt.eval.vqa import infer_question_type, vqa_metrics
from mmgpt.registry import get


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("  A Red  circle. ", "a red circle"),
        ("yes", "yes"),
        ("Top\tLeft.", "top left"),
        ("a red circle..", "a red circle."),  # only one final period goes
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_exact_match_is_registered_and_normalised() -> None:
    assert get("metric", "exact_match") is exact_match
    preds = ["Red.", "two", " top  left ", "blue"]
    refs = ["red", "three", "top left", "blue square"]
    assert exact_match(preds, refs) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="lists of strings"):
        exact_match("abc", "abc")


def test_bleu_matches_hand_computation_and_sacrebleu() -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    assert get("metric", "bleu") is bleu
    # n-gram precisions 5/6, 4/5, 3/4, 2/3 and no brevity penalty: BLEU = (1/3) ** (1/4)
    pred, ref = "a red circle on the left", "a red circle on the right"
    assert bleu([pred], [ref]) == pytest.approx(100 * (1 / 3) ** 0.25, abs=1e-6)
    assert bleu([ref], [ref]) == pytest.approx(100.0)
    # a short hypothesis: precisions 1, 1, 1, 1 and brevity penalty exp(1 - 6/4)
    short = "a red circle on"
    assert bleu([short], [ref]) == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-6)
    # a corpus pools n-gram counts over sentences (not a mean of sentence scores)
    preds = [pred, "a small blue square", "yes"]
    refs = [ref, "a large blue square", "no"]
    expected = sacrebleu.corpus_bleu(preds, [refs]).score
    assert bleu(preds, refs) == pytest.approx(expected)
    assert expected != pytest.approx(sum(bleu([p], [r]) for p, r in zip(preds, refs)) / 3)


def test_attribute_accuracy_on_hand_made_captions() -> None:
    red_circle = {"shape": "circle", "color": "red", "size": "large", "position": "left"}
    blue_square = {"shape": "square", "color": "blue", "size": "small", "position": "top"}
    green_star = {"shape": "star", "color": "green", "size": "small", "position": "bottom"}
    scenes = [[red_circle], [blue_square, red_circle], [green_star]]
    predictions = [
        "a large red circle on the left",  # all right
        # right count; first shape: colour wrong; second: size and position wrong
        "two shapes: a small green square at the top and a small red circle in the center",
        # one shape too many: the extra one is wrong for every attribute
        "two shapes: a small green star at the bottom and a large red circle on the left",
    ]
    result = attribute_accuracy(predictions, scenes)
    slots = 1 + 2 + 2  # max(scene, caption) shapes per sample
    assert result == {
        "shape": pytest.approx(4 / slots),
        "color": pytest.approx(3 / slots),
        "size": pytest.approx(3 / slots),
        "position": pytest.approx(3 / slots),
        "count": pytest.approx(2 / 3),
    }
    # the scene's order does not matter (captions list shapes in reading order)
    reordered = [[red_circle], [red_circle, blue_square], [green_star]]
    assert attribute_accuracy(predictions, reordered) == result
    # a caption that says nothing about shapes is wrong everywhere
    assert attribute_accuracy(["hello"], [[red_circle]]) == {
        "shape": 0.0, "color": 0.0, "size": 0.0, "position": 0.0, "count": 0.0
    }  # fmt: skip


def test_caption_metrics_on_the_shapes_world_references() -> None:
    world = ShapesWorld(size=20, task="caption", image_size=16, seed=3)
    refs = [s.meta["caption"] for s in world]
    scenes = [s.meta["scene"] for s in world]
    perfect = caption_metrics(refs, refs, scenes)
    assert perfect["exact_match"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
    # exact match is normalised, BLEU (sacrebleu's default) is case-sensitive
    shouted = caption_metrics([r.upper() + "." for r in refs], refs, scenes)
    assert shouted["exact_match"] == 1.0 and shouted["bleu"] < 5.0
    assert perfect["attributes"] == dict.fromkeys(
        ["shape", "color", "size", "position", "count"], 1.0
    )
    assert perfect["num_with_scene"] == 20
    shuffled = caption_metrics(refs[1:] + refs[:1], refs, scenes)
    assert shuffled["exact_match"] < 0.2 and shuffled["bleu"] < perfect["bleu"]
    assert caption_metrics(refs, refs, None).keys() == {"exact_match", "bleu"}


def test_question_types_are_inferred_for_every_shapes_question() -> None:
    world = ShapesWorld(size=5, image_size=16)
    rng = random.Random(0)
    for i in range(300):
        qa = ask_question(world.scene(i), rng)
        assert infer_question_type(qa["question"]) == qa["type"], qa["question"]
    assert infer_question_type("<image>\nWhat colour is the bus?") == "color"
    assert infer_question_type("Describe the image.") == "other"


def test_vqa_metrics_per_type() -> None:
    preds = ["Red", "blue", "two", "yes.", "left"]
    refs = ["red", "green", "two", "no", "left"]
    types = ["color", "color", "count", "exists", "position"]
    result = vqa_metrics(preds, refs, types)
    assert result["exact_match"] == pytest.approx(3 / 5)
    assert result["per_type"] == {
        "color": {"exact_match": 0.5, "count": 2},
        "count": {"exact_match": 1.0, "count": 1},
        "exists": {"exact_match": 0.0, "count": 1},
        "position": {"exact_match": 1.0, "count": 1},
    }


def test_shapes_data_specs(tmp_path) -> None:
    assert parse_shapes_spec("shapes") == {}
    assert parse_shapes_spec("shapes:seed=7,size=20,image_size=32") == {
        "seed": 7, "size": 20, "image_size": 32
    }  # fmt: skip
    assert parse_shapes_spec("data/shapes.json") is None
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_shapes_spec("shapes:seed")
    data = load_eval_data("shapes:size=6,max_shapes=1", "vqa", image_size=24)
    assert len(data) == 6 and data.image_size == 24 and data.seed == 1
    items = eval_items(data)
    assert len(items) == 6 and all(len(i.images) == 1 for i in items)
    assert all(i.meta["question_type"] and i.reference == i.meta["answer"] for i in items)
    assert items[0].prompt[-1].role == "user"
    with pytest.raises(ValueError, match="comes from --task"):
        load_eval_data("shapes:task=vqa", "caption")
    with pytest.raises(ValueError, match="task must be one of"):
        load_eval_data("shapes", "t2i")
    (tmp_path / "a.txt").write_text("plain text\n")
    with pytest.raises(ValueError, match="detected a text dataset"):
        load_eval_data(tmp_path / "a.txt", "caption")


def test_exported_shapes_data_keeps_scenes_for_attribute_scores(tmp_path) -> None:
    world = ShapesWorld(size=4, task="caption", image_size=16, seed=5)
    world.write_imagefolder(tmp_path / "folder", 4)
    items = eval_items(load_eval_data(tmp_path / "folder", "caption"))
    assert [i.reference for i in items] == [caption(world.scene(k)) for k in range(4)]
    assert all(i.meta["scene"] == world[k].meta["scene"] for k, i in enumerate(items))
    world.write_llava(tmp_path / "llava", 3)
    items = eval_items(load_eval_data(tmp_path / "llava" / "conversations.json", "caption"))
    assert len(items) == 3 and all(len(i.images) == 1 for i in items)


@pytest.mark.parametrize("to", ["parquet", "shards"])
def test_converted_data_gives_the_same_eval_items(tmp_path, to: str) -> None:
    # `mmgpt eval --data` reads the formats `mmgpt data convert` writes: same prompts, images
    # and references as the imagefolder they came from (shards read in order, up to --limit)
    if to == "parquet":
        pytest.importorskip("pyarrow")
    from mmgpt.data.convert import convert_dataset

    world = ShapesWorld(size=5, task="caption", image_size=16, seed=5)
    world.write_imagefolder(tmp_path / "folder", 5)
    convert_dataset(tmp_path / "folder", tmp_path / to, to)
    expected = eval_items(load_eval_data(tmp_path / "folder", "caption"))
    got = eval_items(load_eval_data(tmp_path / to, "caption"))
    assert [i.reference for i in got] == [i.reference for i in expected]
    assert [[t.text for t in i.prompt] for i in got] == [
        [t.text for t in i.prompt] for i in expected
    ]
    assert [list(i.images[0].getdata()) for i in got] == [
        list(i.images[0].getdata()) for i in expected
    ]
    assert len(eval_items(load_eval_data(tmp_path / to, "caption"), limit=2)) == 2
