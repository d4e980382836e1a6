"""Preference batches, prompts, and the shapes-world preference generator."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mmgpt.data.preference import PreferenceDataset
from mmgpt.data.sample import Sample, Turn
from mmgpt.data.shapes import ShapesWorld, caption, parse_caption
from mmgpt.rlhf.data import PreferenceCollator, as_prompt, collate_prompts, select_rows
from mmgpt.rlhf.prompts import PromptDataset
from mmgpt.rlhf.shapes import CORRUPTIONS, corrupt_scene, write_shapes_preferences


def test_preference_batch_holds_both_answers_with_their_images(tok, rl) -> None:
    model = rl.build(tok)
    processor = model.processor()
    pairs = rl.colour_pairs(3, seed=0)
    pairs[1].chosen = "it is red, not blue"  # a longer answer: the others are padded
    batch = PreferenceCollator(processor)(pairs)
    assert len(batch) == 3 and len(batch.pairs) == 6
    assert batch.pairs.images.shape[0] == 6  # every row carries its pair's image
    for half, index in ((batch.chosen, 0), (batch.rejected, 1)):
        alone = processor([p.samples()[index] for p in pairs])
        T = alone.input_ids.size(1)
        torch.testing.assert_close(half.input_ids[:, :T], alone.input_ids)
        torch.testing.assert_close(half.labels[:, :T], alone.labels)
        torch.testing.assert_close(half.images, alone.images)
        torch.testing.assert_close(half.image_positions, alone.image_positions)
    with pytest.raises(TypeError, match="not a preference pair"):
        PreferenceCollator(processor)(["red"])


def test_select_rows_keeps_each_rows_images(tok, rl) -> None:
    rng = random.Random(0)
    samples = [
        Sample(
            [Turn("user", "<image> and <image>"), Turn("assistant", "two")],
            [rl.square("red", rng), rl.square("blue", rng)],
        ),
        Sample([Turn("user", "no image"), Turn("assistant", "none")]),
        Sample([Turn("user", rl.QUESTION), Turn("assistant", "blue")], [rl.square("blue", rng)]),
    ]
    batch = rl.build(tok).processor()(samples)
    picked = select_rows(batch, [2, 0])
    assert picked.image_positions.tolist() == [
        [0, batch.image_positions[2, 1].item()],
        [1, batch.image_positions[0, 1].item()],
        [1, batch.image_positions[1, 1].item()],
    ]
    torch.testing.assert_close(picked.images, batch.images[[2, 0, 1]])
    assert select_rows(batch, [1]).images is None


def test_as_prompt_drops_the_answer_and_keeps_the_prompt_images(rl) -> None:
    rng = random.Random(1)
    sample = Sample(
        [Turn("user", rl.QUESTION), Turn("assistant", "red")],
        [rl.square("red", rng)],
        meta={"a": 1},
    )
    prompt = as_prompt(sample)
    assert [t.role for t in prompt.conversation] == ["user"] and len(prompt.images) == 1
    assert prompt.meta == {"a": 1}
    assert as_prompt("hello").conversation[0].text == "hello"
    assert [p.conversation[0].text for p in collate_prompts(rl.colour_pairs(2, 0))] == [
        rl.QUESTION
    ] * 2
    with pytest.raises(TypeError, match="cannot take a prompt"):
        as_prompt(3)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_changes_exactly_one_thing(kind) -> None:
    world = ShapesWorld(size=50, seed=3, max_shapes=3, task="caption")
    rng = random.Random(0)
    for index in range(50):
        scene = world.scene(index)
        corrupted = corrupt_scene(scene, kind, rng)
        assert corrupted is not None
        assert caption(corrupted) != caption(scene)
        before = {(s.shape, s.color, s.size, s.position) for s in scene}
        after = {(s.shape, s.color, s.size, s.position) for s in corrupted}
        if kind == "count":
            assert abs(len(after) - len(before)) == 1 and (after < before or before < after)
            continue
        assert len(after) == len(before) and len(before - after) == 1
        (old,), (new,) = before - after, after - before
        changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        assert changed == [("shape", "color", "size", "position").index(kind)]


def test_shapes_preferences_load_as_pairs_and_as_prompts(tmp_path) -> None:
    path = write_shapes_preferences(tmp_path, 12, seed=5, image_size=32, max_shapes=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["corruption"] for r in records} <= set(CORRUPTIONS)
    for r in records:
        assert parse_caption(r["chosen"]) == r["scene"]  # chosen: right in every attribute
        assert r["rejected"] != r["chosen"]
    pairs = PreferenceDataset(path)
    assert len(pairs) == 12 and pairs[0].images[0].size == (32, 32)
    assert pairs[0].prompt == "<image>\nDescribe the image."
    prompts = PromptDataset(path)  # a preference file doubles as prompt data
    prompt = prompts[3]
    assert prompt.conversation[0].text == "<image>\nDescribe the image."
    assert prompt.meta["chosen"] == records[3]["chosen"] and len(prompt.images) == 1


def test_prompt_file_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "hi"}\n{"image": "x.png"}\n{"prompt": "a", "image": "missing.png"}\n'
    )
    with pytest.warns(RuntimeWarning, match="skipped 2"):
        data = PromptDataset(path)
    assert len(data) == 1
    assert [p.line for p in data.problems] == [2, 3]
    assert [p.reason for p in data.problems] == ["missing_field", "missing_image"]
