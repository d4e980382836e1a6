"""Samples: input and output images in placeholder order, and finding drawing samples in a
dataset (file datasets record by record, others by a probe)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from torch.utils.data import Subset

from mmgpt.data.imagefolder import ImageFolderDataset
from mmgpt.data.sample import (
    Turn,
    count_drawing_samples,
    describe_dataset,
    is_drawing,
    split_images,
)
from mmgpt.data.shapes import ShapesWorld


def test_split_images_follows_the_placeholders_in_order():
    a, b, c = object(), object(), object()
    turns = [
        Turn("user", "<image> and <image>: blend them"),
        Turn("assistant", "here: <image_out>"),
    ]
    assert split_images(turns, [a, b, c]) == ([a, b], [c])
    turns = [Turn("user", "draw, then read <image>"), Turn("assistant", "<image_out> ok")]
    assert split_images(turns, [a, b]) == ([a], [b])
    assert split_images([Turn("user", "hi"), Turn("assistant", "yo")], []) == ([], [])
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) .* but 1 image\(s\)"):
        split_images(turns, [a])


def test_is_drawing_needs_the_output_placeholder_in_an_assistant_turn():
    assert is_drawing([Turn("user", "draw"), Turn("assistant", "<image_out>")])
    assert is_drawing([{"role": "assistant", "content": "x <image_out>"}])  # as messages
    assert not is_drawing([Turn("user", "<image_out>"), Turn("assistant", "no")])
    assert not is_drawing([Turn("user", "<image>"), Turn("assistant", "<image>")])


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": f"caption {i}"} for i in range(6)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def test_file_datasets_are_counted_completely_even_behind_subsets(folder):
    captions = ImageFolderDataset(folder)
    found = count_drawing_samples(captions)
    assert (found.drawing, found.checked, found.complete) == (0, 6, True)
    mixed = ImageFolderDataset(folder, task="mixed")  # caption, drawing, caption, drawing, …
    found = count_drawing_samples(mixed)
    assert (found.drawing, found.checked, found.complete) == (6, 12, True)
    nested = Subset(Subset(mixed, [0, 1, 2, 3, 4]), [0, 2, 4])  # mixed[0], [2], [4]: captions
    assert count_drawing_samples(nested).drawing == 0
    assert count_drawing_samples(Subset(mixed, [0, 5])).drawing == 1
    assert describe_dataset(nested) == str(folder)


def test_other_datasets_are_probed_evenly():
    captions = ShapesWorld(size=500, task="caption", image_size=8)
    found = count_drawing_samples(captions, probe=20)  # none in 20: then 320 are looked at
    assert (found.drawing, found.checked, found.complete) == (0, 320, False)
    assert describe_dataset(captions) == "ShapesWorld (task='caption')"
    drawings = ShapesWorld(size=500, task="t2i", image_size=8)
    assert count_drawing_samples(drawings, probe=20).drawing == 20
    # 1% drawings: none among the first 64 samples looked at, found in the larger probe
    rare = ShapesWorld(
        size=5000, task_weights={"caption": 1, "vqa": 0, "t2i": 0.01}, image_size=8, seed=2
    )
    assert not any(rare[i * 5000 // 64].meta["task"] == "t2i" for i in range(64))
    found = count_drawing_samples(rare)
    assert found.checked == 1024 and found.drawing == sum(
        rare[i * 5000 // 1024].meta["task"] == "t2i" for i in range(1024)
    )
    assert found.drawing > 0
    small = ShapesWorld(size=5, task=["caption", "t2i"], image_size=8, seed=3)
    found = count_drawing_samples(small)
    expected = sum(small[i].meta["task"] == "t2i" for i in range(5))
    assert (found.drawing, found.checked, found.complete) == (expected, 5, True)
    assert count_drawing_samples(iter([])) is None  # iterable: cannot tell
    assert count_drawing_samples([{"text": "no conversation"}]) is None
