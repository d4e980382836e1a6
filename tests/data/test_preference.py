"""Preference JSONL: pairs, ranked lists expanded into ordered pairs, validation by line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmgpt.data.preference import PreferenceDataset, PreferencePair, ranked_pairs, read_preference
from mmgpt.data.records import DataError
from mmgpt.registry import create


def write_lines(path, rows) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_ranked_pairs_orders_and_ties():
    assert ranked_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    # lower rank is better; the tie (a, c) gives no pair
    assert ranked_pairs(["a", "b", "c"], [2, 1, 2]) == [("b", "a"), ("b", "c")]
    assert ranked_pairs(["a", "b", "c", "d"], [4, 3, 2, 1]) == [
        ("d", "c"),
        ("d", "b"),
        ("d", "a"),
        ("c", "b"),
        ("c", "a"),
        ("b", "a"),
    ]


def test_preference_pairs_ranked_lists_and_images(tmp_path):
    Image.new("RGB", (4, 4), (0, 128, 0)).save(tmp_path / "g.png")
    write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Say hi", "chosen": "hi", "rejected": "go away", "id": 1},
            {"prompt": "What colour?", "image": "g.png", "chosen": "green", "rejected": "red"},
            {"prompt": "Rank", "responses": ["best", "mid", "worst"], "judge": "human"},
            {
                "prompt": "<image> tie",
                "image": ["g.png"],
                "responses": ["x", "y", "z"],
                "ranking": [1, 2, 1],
            },
        ],
    )
    data = create("dataset", "preference", path=tmp_path / "p.jsonl")
    assert len(data) == 1 + 1 + 3 + 2
    items = [data[i] for i in range(len(data))]
    assert all(isinstance(p, PreferencePair) for p in items)
    assert (items[0].prompt, items[0].chosen, items[0].rejected, items[0].images) == (
        "Say hi",
        "hi",
        "go away",
        [],
    )
    assert items[0].meta["id"] == "1" and items[0].meta["line"] == 1
    assert items[1].prompt == "<image>\nWhat colour?"
    assert items[1].images[0].getpixel((0, 0)) == (0, 128, 0)
    assert [(p.chosen, p.rejected) for p in items[2:5]] == [
        ("best", "mid"),
        ("best", "worst"),
        ("mid", "worst"),
    ]
    assert items[2].meta["judge"] == "human" and items[4].meta["num_pairs"] == 3
    assert [(p.chosen, p.rejected) for p in items[5:]] == [("x", "y"), ("z", "y")]
    assert items[5].prompt == "<image> tie"  # already has its placeholder

    chosen, rejected = items[1].samples()
    assert [t.text for t in chosen.conversation] == ["<image>\nWhat colour?", "green"]
    assert [t.text for t in rejected.conversation] == ["<image>\nWhat colour?", "red"]
    assert len(chosen.images) == chosen.num_image_placeholders == 1


def test_preference_validation_with_line_numbers(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # 1 good
        {"chosen": "a", "rejected": "b"},  # 2 no prompt
        {"prompt": "p", "chosen": "a"},  # 3 no rejected
        {"prompt": "p", "chosen": "a", "rejected": "a"},  # 4 identical
        {"prompt": "p", "responses": ["only one"]},  # 5 too short
        {"prompt": "p", "responses": ["a", "b"], "ranking": [1]},  # 6 length mismatch
        {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]},  # 7 all tie
        {"prompt": "p", "chosen": "a", "rejected": "b", "responses": ["a", "b"]},  # 8 both
        {"prompt": "p", "image": "nope.png", "chosen": "a", "rejected": "b"},  # 9 missing image
        {"prompt": "<image><image>", "image": "ok.png", "chosen": "a", "rejected": "b"},  # 10
        "not json",  # 11
        {"prompt": "p", "responses": "ab"},  # 12 wrong type
        {"prompt": 5, "chosen": "a", "rejected": "b"},  # 13 wrong type
    ]
    write_lines(tmp_path / "p.jsonl", rows)
    with pytest.warns(RuntimeWarning, match="skipped 12 unusable"):
        data = PreferenceDataset(tmp_path / "p.jsonl")
    assert len(data) == 1
    assert [(p.line, p.reason) for p in data.problems] == [
        (2, "missing_field"),
        (3, "missing_field"),
        (4, "bad_value"),
        (5, "bad_value"),
        (6, "bad_value"),
        (7, "bad_value"),
        (8, "bad_value"),
        (9, "missing_image"),
        (10, "placeholder_mismatch"),
        (11, "bad_json"),
        (12, "bad_type"),
        (13, "bad_type"),
    ]
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing_field: missing field 'prompt'"):
        PreferenceDataset(tmp_path / "p.jsonl", strict=True)


def test_preference_bad_image_skips_to_next_pair(tmp_path):
    (tmp_path / "bad.png").write_text("nope")
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "image": "bad.png", "responses": ["a", "b", "c"]},
            {"prompt": "q", "image": "ok.png", "chosen": "good", "rejected": "bad"},
        ],
    )
    data = PreferenceDataset(tmp_path / "p.jsonl")
    with pytest.warns(RuntimeWarning, match="bad.png"):
        assert data[0].chosen == "good"
    assert data[1].chosen == "good" and data[2].chosen == "good"
    assert data.skipped == {"not_an_image": 1}  # one bad file, counted once


def test_ranked_list_size_is_bounded(tmp_path):
    from mmgpt.data.preference import MAX_RANKED_RESPONSES

    many = [f"answer {i}" for i in range(MAX_RANKED_RESPONSES + 1)]
    lines = [
        {"prompt": "Rank", "responses": many[:MAX_RANKED_RESPONSES]},
        {"prompt": "Rank", "responses": many},  # would be 5050 pairs from one short line
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records, problems = read_preference(path)
    assert len(records) == MAX_RANKED_RESPONSES * (MAX_RANKED_RESPONSES - 1) // 2
    assert [(p.line, p.reason) for p in problems] == [(2, "bad_value")]
    assert f"more than the {MAX_RANKED_RESPONSES}" in problems[0].message
