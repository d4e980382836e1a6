"""LLaVA conversation JSON: parsing, placeholders, line numbers, skipping and strict mode."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmgpt.data.llava import LlavaDataset, insert_image_placeholders, read_llava
from mmgpt.data.records import DataError
from mmgpt.data.sample import Turn
from mmgpt.registry import create


def convo(question: str, answer: str = "ok") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_records(path, records) -> None:
    # One record per line so record k starts on line k + 2 (line 1 is "[").
    body = ",\n".join(json.dumps(r) for r in records)
    path.write_text("[\n" + body + "\n]\n")


@pytest.fixture
def llava(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (5, 5), (255, 0, 0)).save(images / "red.png")
    Image.new("LA", (5, 5), (80, 255)).save(images / "gray.png")
    (images / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = [
        {"id": "a", "image": "red.png", "conversations": convo("<image>\nWhat colour?", "red")},
        {"id": "b", "image": "red.png", "conversations": convo("No placeholder here")},
        {"id": "c", "conversations": convo("Text only, no image")},
        {
            "id": "d",
            "image": ["red.png", "gray.png"],
            "conversations": convo("<image> vs <image>?"),
        },
        {"id": "e", "image": "fake.png", "conversations": convo("<image> broken file")},
        {"id": "f", "image": "absent.png", "conversations": convo("<image> missing")},
        {"id": "g", "image": "red.png", "conversations": convo("<image><image> two?")},
        {"id": "h", "image": "red.png"},
        {"id": "i", "image": "gray.png", "conversations": convo("<image>\nlast")},
    ]
    path = tmp_path / "data.json"
    write_records(path, records)
    return path, images


def test_llava_records_placeholders_and_problems(llava):
    path, images = llava
    with pytest.warns(RuntimeWarning, match="skipped 3 unusable") as record:
        data = LlavaDataset(path, image_root=images)
    assert "(id f)" in str(record[0].message)
    assert [(p.id, p.line, p.reason) for p in data.problems] == [
        ("f", 7, "missing_image"),
        ("g", 8, "placeholder_mismatch"),
        ("h", 9, "missing_field"),
    ]
    assert len(data) == 6
    a, b, c, d = (data[i] for i in range(4))
    assert [t.role for t in a.conversation] == ["user", "assistant"]
    assert a.images[0].getpixel((0, 0)) == (255, 0, 0) and a.meta["id"] == "a"
    assert b.conversation[0].text == "<image>\nNo placeholder here"  # LLaVA convention
    assert c.images == [] and c.num_image_placeholders == 0
    assert len(d.images) == d.num_image_placeholders == 2
    assert d.images[1].mode == "RGB" and d.images[1].getpixel((0, 0)) == (80, 80, 80)
    with pytest.warns(RuntimeWarning, match="fake.png"):
        e = data[4]  # the broken file → the next good record
    assert e.meta["id"] == "i"
    assert data.skipped == {
        "missing_image": 1,
        "placeholder_mismatch": 1,
        "missing_field": 1,
        "not_an_image": 1,
    }


def test_llava_strict_raises_on_first_problem_with_line_and_id(llava):
    path, images = llava
    with pytest.raises(DataError, match=r"data\.json:7 \(id f\): missing_image"):
        LlavaDataset(path, image_root=images, strict=True)


def test_llava_default_image_root_is_the_json_directory(tmp_path):
    Image.new("RGB", (3, 3)).save(tmp_path / "x.png")
    write_records(tmp_path / "d.json", [{"image": "x.png", "conversations": convo("<image>")}])
    data = create("dataset", "llava", path=tmp_path / "d.json")
    assert data[0].images[0].size == (3, 3)


def test_llava_jsonl_and_syntax_errors(tmp_path):
    lines = [
        json.dumps({"conversations": convo("hi")}),
        "{oops",
        json.dumps({"conversations": convo("bye")}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    records, problems = read_llava(tmp_path / "d.jsonl")
    assert len(records) == 2 and [(p.line, p.reason) for p in problems] == [(2, "bad_json")]

    (tmp_path / "bad.json").write_text('[\n{"conversations": []},\n{"conversations": [}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3:\d+: invalid JSON") as info:
        read_llava(tmp_path / "bad.json")
    assert info.value.line == 3
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    with pytest.raises(DataError, match="expected a JSON list"):
        read_llava(tmp_path / "obj.json")


def test_llava_conversation_validation(tmp_path):
    records = [
        {"conversations": "hello"},
        {"conversations": []},
        {"conversations": [{"from": "human"}]},
        {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"image": 5, "conversations": convo("x")},
        ["not", "an", "object"],
    ]
    write_records(tmp_path / "d.json", records)
    _, problems = read_llava(tmp_path / "d.json")
    assert [(p.line, p.reason) for p in problems] == [
        (2, "bad_type"),
        (3, "bad_value"),
        (4, "missing_field"),
        (5, "bad_type"),
        (6, "bad_value"),
        (7, "bad_type"),
        (8, "bad_type"),
    ]
    assert "no 'gpt' turn" in problems[4].message


def test_insert_image_placeholders_rule():
    turns = [
        Turn("user", "q1"),
        Turn("assistant", "a1"),
        Turn("user", "q2"),
        Turn("assistant", "a2"),
    ]
    out = insert_image_placeholders(turns, 2)
    assert out[0].text == "<image>\n<image>\nq1" and out[2].text == "q2"
    assert insert_image_placeholders(turns, 0) == turns


def test_an_image_in_a_gpt_turn_is_an_image_to_draw(tmp_path):
    Image.new("RGB", (5, 5), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (7, 4), (0, 0, 255)).save(tmp_path / "blue.png")
    records = [
        {"id": "draw", "image": "red.png", "conversations": convo("draw red", "<image>")},
        {  # reads one image, draws the other: images follow the placeholders in order
            "id": "edit",
            "image": ["red.png", "blue.png"],
            "conversations": convo("<image>\nmake it blue", "Done: <image_out>"),
        },
        {  # no placeholder at all: LLaVA's rule puts the image before the question (an input)
            "id": "ask",
            "image": "blue.png",
            "conversations": convo("What colour?", "blue"),
        },
        {"id": "human", "image": "red.png", "conversations": convo("<image_out>", "no")},
        {"id": "count", "image": "red.png", "conversations": convo("<image> x", "<image>")},
    ]
    path = tmp_path / "d.json"
    write_records(path, records)
    with pytest.warns(RuntimeWarning, match="skipped 2 unusable"):
        data = LlavaDataset(path)
    draw, edit, ask = (data[i] for i in range(3))
    assert [t.text for t in draw.conversation] == ["draw red", "<image_out>"]
    assert draw.images == [] and [im.size for im in draw.output_images] == [(5, 5)]
    assert [t.text for t in edit.conversation] == ["<image>\nmake it blue", "Done: <image_out>"]
    assert [im.size for im in edit.images] == [(5, 5)]
    assert [im.size for im in edit.output_images] == [(7, 4)]
    assert ask.conversation[0].text == "<image>\nWhat colour?" and ask.output_images == []
    human, count = data.problems
    assert (human.id, human.reason) == ("human", "bad_value")
    assert "conversations[0] is a 'human' turn with '<image_out>'" in human.message
    assert (count.id, count.reason) == ("count", "placeholder_mismatch")
    assert count.message == (
        "1 '<image>' placeholder(s) in the text and 1 in 'gpt' turns (images to draw) "
        "but 1 image(s)"
    )


def test_a_path_too_long_for_the_filesystem_is_a_problem_naming_the_line(tmp_path) -> None:
    import json

    from mmgpt.data.imagefolder import read_imagefolder
    from mmgpt.data.llava import read_llava

    turns = [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "ok"}]
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x" * 5000, "conversations": turns}]))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "y" * 5000, "text": "t"}))
    for records, problems in (read_llava(tmp_path / "a.json"), read_imagefolder(tmp_path)):
        assert records == [] and [(p.line, p.reason) for p in problems] == [(1, "bad_path")]
