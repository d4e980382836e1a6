"""Ranked reward-model data of the shapes world: the programmatic preference, multi-attribute
corruptions (size included) and a policy's own samples in the ranked lists."""

from __future__ import annotations

import json
import random

import pytest

from mmgpt.data.preference import PreferenceDataset, ranked_pairs
from mmgpt.data.shapes import Shape, ShapesWorld, caption, parse_caption
from mmgpt.rlhf.shapes import (
    MALFORMED_ERRORS,
    caption_errors,
    corrupt_attributes,
    shapes_ranked_answers,
    write_shapes_reward_data,
)

SCENE = [Shape("square", "blue", "small", "top right")]
TWO = [Shape("circle", "red", "large", "top left"), Shape("square", "blue", "small", "center")]


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        ("a small blue square at the top right", 0),
        ("a large blue square at the top right", 1),  # size
        ("a small red circle at the top right", 2),  # colour and kind
        ("a large red circle at the bottom left", 4),  # every attribute
        ("a small blue right", MALFORMED_ERRORS),  # off the grammar
        ("", MALFORMED_ERRORS),
        ("two shapes: a small blue square at the top right and a small red circle on the left", 4),
    ],
)
def test_caption_errors_counts_wrong_attributes(text, errors) -> None:
    assert caption_errors(text, SCENE) == errors


def test_caption_errors_compares_shapes_in_reading_order() -> None:
    right = caption(TWO)
    assert caption_errors(right, TWO) == 0
    assert caption_errors(right, list(reversed(TWO))) == 0  # scenes in any order
    assert caption_errors(caption(TWO[:1]), TWO) == 4  # a shape missing
    moved = [TWO[0], Shape("square", "blue", "large", "bottom")]
    assert caption_errors(caption(moved), TWO) == 2  # size and position of the second


@pytest.mark.parametrize(
    "attributes", [("size",), ("color", "size"), ("shape", "position", "size"), ("color",)]
)
def test_corrupt_attributes_changes_exactly_those_attributes(attributes) -> None:
    rng = random.Random(0)
    for _ in range(20):
        corrupted = corrupt_attributes(SCENE, attributes, rng)
        assert corrupted is not None
        assert caption_errors(caption(corrupted), SCENE) == len(attributes)
        changed = {a for a in ("shape", "color", "size", "position")}
        changed = {a for a in changed if getattr(corrupted[0], a) != getattr(SCENE[0], a)}
        assert changed == {"color" if a == "color" else a for a in attributes}


def test_corrupt_attributes_rejects_unknown_attributes_and_reports_impossible_ones() -> None:
    with pytest.raises(ValueError, match="attributes must be among"):
        corrupt_attributes(SCENE, ["texture"], random.Random(0))
    assert corrupt_attributes(SCENE, ["size"], random.Random(0), sizes=("small",)) is None


def test_ranked_answers_rank_by_the_programmatic_preference() -> None:
    world = ShapesWorld(size=30, seed=4, max_shapes=1, task="caption", image_size=32)
    for index in range(30):
        record = shapes_ranked_answers(
            world, index, negatives=6, extra_answers=["a small blue right", "red"]
        )
        scene = world.scene(index)
        assert record["responses"][0] == caption(scene) and record["ranking"][0] == 0
        assert record["ranking"] == [caption_errors(r, scene) for r in record["responses"]]
        assert len(set(record["responses"])) == len(record["responses"]) == 9
        # the corruptions are wrong somewhere (an added shape: 4, and it may shift the reading
        # order: at most 4 per shape of the two); the extras
        # are off the grammar, worse than any well-formed caption
        assert all(1 <= e <= 8 for e in record["ranking"][1:7])
        assert record["ranking"][7:] == [MALFORMED_ERRORS] * 2
        assert max(record["ranking"][:7]) < MALFORMED_ERRORS
        assert record == shapes_ranked_answers(
            world, index, negatives=6, extra_answers=["a small blue right", "red"]
        )
    sizes = [
        shapes_ranked_answers(world, i)["responses"][1:] for i in range(30)
    ]  # size corruptions do occur (the single-corruption pairs never change the size)
    flips = sum(
        caption(world.scene(i)).split()[1] != r.split()[1] for i, rs in enumerate(sizes) for r in rs
    )
    assert flips > 20


def test_reward_data_holds_the_policys_finished_samples(monkeypatch, tmp_path) -> None:
    """The policy's sampled answers join each ranked list — deduplicated, ranked by the same
    preference, the unfinished ones (cut at max_new_tokens) left out — and the file reads back
    as every ordered pair of different rank."""
    import mmgpt.rlhf.rollout as rollout

    world = ShapesWorld(size=4, seed=2, max_shapes=1, task="caption", image_size=32)
    right = caption(world.scene(0))
    scripted = [right, "a small blue right", right, "cut off at the limit"]
    calls = []

    def fake_generate(policy, prompts, config):
        calls.append((len(prompts), config.seed))
        texts = scripted * (len(prompts) // len(scripted))
        return None, texts, [True, True, True, False] * (len(prompts) // 4)

    monkeypatch.setattr(rollout, "generate_responses", fake_generate)
    path = write_shapes_reward_data(
        tmp_path,
        4,
        negatives=3,
        policy=object(),
        policy_samples=4,
        seed=2,
        image_size=32,
        max_shapes=1,
        batch_images=2,
    )
    assert [n for n, _ in calls] == [8, 8]  # two batches of 2 images × 4 samples
    assert len(set(calls[0][1] + calls[1][1])) == 16  # one seed per sampled row
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for index, record in enumerate(records):
        scene = world.scene(index)
        extras = record["responses"][4:]
        expected = [a for a in (right, "a small blue right") if a not in record["responses"][:4]]
        assert extras == expected
        assert record["ranking"] == [caption_errors(r, scene) for r in record["responses"]]
        assert "cut off at the limit" not in record["responses"]
        assert (tmp_path / record["image"]).is_file()
    dataset = PreferenceDataset(path)
    expected = sum(len(ranked_pairs(r["responses"], r["ranking"])) for r in records)
    assert len(dataset) == expected
    assert dataset[0].chosen == records[0]["responses"][0] and len(dataset[0].images) == 1


def test_reward_data_samples_a_real_policy_reproducibly(red_or_blue_policy, tmp_path) -> None:
    def write(directory):
        return write_shapes_reward_data(
            directory,
            3,
            negatives=2,
            policy=red_or_blue_policy,
            policy_samples=4,
            max_new_tokens=4,
            seed=2,
            image_size=32,
            max_shapes=1,
            caption_prompt="What colour is the square?",  # the question the policy answers
        )

    path = write(tmp_path / "a")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(len(r["responses"]) - 3 for r in records) >= 1  # some samples were finished
    assert write(tmp_path / "b").read_text() == path.read_text()


def test_per_attribute_negatives_are_wrong_in_that_attribute_only() -> None:
    """per_attribute=k puts, before the random corruptions, k captions wrong in ONLY each
    attribute (as many as the world allows: two sizes give one wrong size), so every list
    holds a caption whose sole error is its colour; per_attribute=0 keeps the old lists."""
    world = ShapesWorld(size=20, seed=4, max_shapes=1, task="caption", image_size=32)
    for index in range(20):
        record = shapes_ranked_answers(world, index, negatives=3, per_attribute=2)
        truth = world.scene(index)[0]
        # kinds of single errors, in order: colour ×2, shape ×2, position ×2, count ×2, size ×1
        single = record["responses"][1:10]
        changed = []
        for text in single:
            if len(parse_caption(text, strict=True)) != 1:
                changed.append("count")
                continue
            said = parse_caption(text, strict=True)[0]
            diff = [
                a for a in ("shape", "color", "size", "position") if said[a] != getattr(truth, a)
            ]
            assert len(diff) == 1, (text, diff)
            changed.append(diff[0])
        assert changed == ["color"] * 2 + ["shape"] * 2 + ["position"] * 2 + ["count"] * 2 + [
            "size"
        ]
        ranking = record["ranking"][1:10]
        assert ranking[:6] == [1] * 6 and ranking[8] == 1
        assert all(4 <= e <= 8 for e in ranking[6:8])  # an added shape (and reading order)
        assert len(record["responses"]) == 1 + 9 + 3  # then the 3 random corruptions
        assert len(set(record["responses"])) == len(record["responses"])
        assert shapes_ranked_answers(world, index, negatives=3) == shapes_ranked_answers(
            world, index, negatives=3, per_attribute=0
        )
    with pytest.raises(ValueError, match="per_attribute must be >= 0"):
        shapes_ranked_answers(world, 0, per_attribute=-1)
