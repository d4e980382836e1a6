"""Imagefolder datasets and safe image loading, on real files with real defects."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmgpt.data.imagefolder import ImageFolderDataset, read_imagefolder
from mmgpt.data.images import ImageLoadError, load_image
from mmgpt.data.records import DataError
from mmgpt.data.sample import DEFAULT_CAPTION_PROMPT, IMAGE_PLACEHOLDER
from mmgpt.registry import create


def solid(color, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def truncated_png(path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture
def folder(tmp_path):
    """Six rows: three good images (one in a subfolder, one via conversations), a truncated
    PNG, a text file named .png, a missing file; plus a bad JSON line and a row without
    file_name."""
    (tmp_path / "sub").mkdir()
    solid((255, 0, 0)).save(tmp_path / "red.png")
    solid((0, 0, 255)).save(tmp_path / "sub" / "blue.png")
    solid((0, 255, 0)).save(tmp_path / "green.jpg", quality=95)
    truncated_png(tmp_path / "truncated.png")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    rows = [
        json.dumps({"file_name": "red.png", "text": "a red picture", "source_id": 1}),  # 1
        json.dumps({"file_name": "truncated.png", "text": "cut short"}),  # 2
        '{"file_name": "broken.png", "text": ',  # 3 bad JSON
        json.dumps({"file_name": "notes.png", "text": "text pretending"}),  # 4
        json.dumps({"file_name": "missing.png", "text": "gone"}),  # 5
        json.dumps({"text": "no file name"}),  # 6
        json.dumps({"file_name": "sub/blue.png", "text": "a blue picture"}),  # 7
        "",  # blank lines are ignored
        json.dumps(
            {
                "file_name": "green.jpg",
                "conversations": [
                    {"from": "human", "value": "What colour?"},
                    {"from": "gpt", "value": "green"},
                ],
            }
        ),  # 9
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


# -- load_image -----------------------------------------------------------------------------
def test_load_image_converts_every_mode_to_rgb(tmp_path):
    gray = Image.new("L", (4, 4), 100)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red → white
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    palette = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    sixteen = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    for name, image in [
        ("g.png", gray),
        ("a.png", rgba),
        ("p.png", palette),
        ("c.jpg", cmyk),
        ("s.png", sixteen),
    ]:
        image.save(tmp_path / name)
    results = {
        name: load_image(tmp_path / name) for name in ("g.png", "a.png", "p.png", "c.jpg", "s.png")
    }
    assert all(im.mode == "RGB" and im.size == (4, 4) for im in results.values())
    assert results["g.png"].getpixel((1, 1)) == (100, 100, 100)
    assert results["a.png"].getpixel((0, 0)) == (255, 0, 0)
    assert results["a.png"].getpixel((2, 2)) == (255, 255, 255)
    assert results["p.png"].getpixel((1, 1)) == (0, 0, 255)
    red = results["c.jpg"].getpixel((1, 1))
    assert red[0] > 200 and red[1] < 40 and red[2] < 40
    assert results["s.png"].getpixel((1, 1)) == (127, 127, 127)  # scaled, not clipped to 255


def test_load_image_transparent_palette_is_composited_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "t.png", transparency=0)
    loaded = load_image(tmp_path / "t.png")
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (255, 0, 0)


def test_load_image_errors_say_why(folder):
    reasons = {}
    for name in ("truncated.png", "notes.png", "missing.png"):
        with pytest.raises(ImageLoadError) as info:
            load_image(folder / name)
        assert name in str(info.value)
        reasons[name] = info.value.reason
    assert reasons == {
        "truncated.png": "truncated_image",
        "notes.png": "not_an_image",
        "missing.png": "missing_image",
    }
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_image_refuses_decompression_bombs(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="above the limit of 10000") as info:
        load_image(tmp_path / "big.png", max_pixels=10_000)
    assert info.value.reason == "too_large"
    assert load_image(tmp_path / "big.png").size == (300, 300)


# -- the dataset ----------------------------------------------------------------------------
def test_imagefolder_skips_and_counts_bad_rows(folder):
    with pytest.warns(RuntimeWarning, match="skipped 3 unusable") as record:
        data = ImageFolderDataset(folder)
    assert "metadata.jsonl:3" in str(record[0].message)
    assert data.skipped == {"bad_json": 1, "missing_image": 1, "missing_field": 1}
    assert len(data) == 5  # red, truncated, notes, blue, green
    lines = {p.reason: p.line for p in data.problems}
    assert lines == {"bad_json": 3, "missing_image": 5, "missing_field": 6}

    with pytest.warns(RuntimeWarning) as record:
        samples = [data[i] for i in range(len(data))]
    messages = " ".join(str(w.message) for w in record)
    assert "truncated.png" in messages and "notes.png" in messages
    assert data.skipped == {
        "bad_json": 1,
        "missing_image": 1,
        "missing_field": 1,
        "truncated_image": 1,
        "not_an_image": 1,
    }
    # A failing sample is replaced by the next good one, deterministically.
    captions = [s.conversation[-1].text for s in samples]
    assert captions == [
        "a red picture",
        "a blue picture",
        "a blue picture",
        "a blue picture",
        "green",
    ]
    first = samples[0]
    assert first.conversation[0].text == f"{IMAGE_PLACEHOLDER}\n{DEFAULT_CAPTION_PROMPT}"
    assert first.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert first.meta["line"] == 1 and first.meta["source_id"] == 1
    # Placeholder added to the first human turn of a conversation row without one.
    assert samples[-1].conversation[0].text == f"{IMAGE_PLACEHOLDER}\nWhat colour?"
    # No new warnings once the bad files are known.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data[1].conversation[-1].text == "a blue picture"


def test_imagefolder_strict_names_file_and_line(folder):
    with pytest.raises(DataError, match=r"metadata\.jsonl:3: bad_json") as info:
        ImageFolderDataset(folder, strict=True)
    assert info.value.line == 3

    good_rows = [
        json.dumps({"file_name": "red.png", "text": "ok"}),
        json.dumps({"file_name": "truncated.png", "text": "cut"}),
    ]
    (folder / "metadata.jsonl").write_text("\n".join(good_rows) + "\n")
    data = ImageFolderDataset(folder, strict=True)
    assert data[0].conversation[-1].text == "ok"
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: truncated_image: .*truncated\.png"):
        data[1]


def test_imagefolder_verify_images_finds_all_problems_up_front(folder):
    with pytest.warns(RuntimeWarning, match="skipped 5 unusable"):
        data = ImageFolderDataset(folder, verify_images=True)
    assert data.skipped["truncated_image"] == 1 and data.skipped["not_an_image"] == 1


def test_imagefolder_csv_and_caption_prompt_and_registry(tmp_path):
    solid((10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text,conversations\na.png,"a dark, bluish picture",\n'
        'a.png,,"[{""from"": ""human"", ""value"": ""<image> hue?""}, {""from"": ""gpt"", ""value"": ""dark""}]"\n'
        "a.png,,{not json\n"
    )
    with pytest.warns(RuntimeWarning, match="bad_json: 1"):
        data = create("dataset", "imagefolder", path=tmp_path, caption_prompt="Caption:")
    assert len(data) == 2
    assert [t.text for t in data[0].conversation] == ["<image>\nCaption:", "a dark, bluish picture"]
    assert [t.text for t in data[1].conversation] == ["<image> hue?", "dark"]
    assert data.problems[0].line == 4


def test_imagefolder_csv_bad_bytes_spoil_only_their_row_and_huge_cells_name_the_line(tmp_path):
    solid((10, 20, 30)).save(tmp_path / "a.png")
    meta = tmp_path / "metadata.csv"
    meta.write_bytes(b"file_name,text\na.png,caf\xe9 latin-1\na.png,fine\n")
    records, problems = read_imagefolder(tmp_path)
    assert [r.line for r in records] == [3]
    assert [(p.line, p.reason) for p in problems] == [(2, "bad_encoding")]

    meta.write_bytes(b"file_name,text\na.png,ok\na.png," + b"x" * 200_000 + b"\n")
    with pytest.raises(DataError, match=r"metadata\.csv:3: invalid CSV: field larger") as info:
        read_imagefolder(tmp_path)
    assert (info.value.line, info.value.reason) == (3, "bad_csv")


def test_imagefolder_placeholder_mismatch_and_wrong_types(tmp_path):
    solid((1, 2, 3)).save(tmp_path / "a.png")
    two = [{"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "no"}]
    rows = [
        {"file_name": "a.png", "conversations": two},
        {"file_name": 7, "text": "x"},
        {"file_name": "a.png", "text": ["x"]},
        {"file_name": "a.png", "conversations": [{"from": "robot", "value": "hi"}]},
        {"file_name": "a.png", "text": "fine"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(RuntimeWarning):
        data = ImageFolderDataset(tmp_path)
    assert [(p.line, p.reason) for p in data.problems] == [
        (1, "placeholder_mismatch"),
        (2, "bad_type"),
        (3, "bad_type"),
        (4, "bad_value"),
    ]
    assert "2 '<image>' placeholder(s)" in data.problems[0].message
    assert "'robot'" in data.problems[3].message
    assert len(data) == 1


def test_imagefolder_without_metadata_or_usable_rows(tmp_path):
    with pytest.raises(DataError, match="no metadata.jsonl"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "x"}\n')
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match="no usable samples"):
        ImageFolderDataset(tmp_path)


def test_imagefolder_split_and_nested_metadata(tmp_path):
    for split, color in (("train", (255, 0, 0)), ("test", (0, 255, 0))):
        (tmp_path / split).mkdir()
        solid(color).save(tmp_path / split / "x.png")
        (tmp_path / split / "metadata.jsonl").write_text(
            json.dumps({"file_name": "x.png", "text": split})
        )
    assert len(ImageFolderDataset(tmp_path)) == 2
    train = ImageFolderDataset(tmp_path, split="train")
    assert len(train) == 1 and train[0].images[0].getpixel((0, 0)) == (255, 0, 0)


# -- drawing samples (task=t2i / mixed) -----------------------------------------------------
@pytest.fixture
def drawings(tmp_path):
    """Captioned images in three modes and sizes, and a conversation row whose assistant turn
    holds the image (an image to draw)."""
    solid((255, 0, 0), (12, 8)).save(tmp_path / "red.png")
    Image.new("L", (6, 9), 90).save(tmp_path / "grey.png")
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 0))  # transparent, a blue opaque corner
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "alpha.png")
    draw = [{"from": "human", "value": "paint it"}, {"from": "gpt", "value": "Sure: <image>"}]
    rows = [
        {"file_name": "red.png", "text": "a red picture"},
        {"file_name": "grey.png", "text": "a grey picture"},
        {"file_name": "alpha.png", "text": "a blue dot"},
        {"file_name": "red.png", "conversations": draw},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def texts(sample) -> list[str]:
    return [turn.text for turn in sample.conversation]


def test_task_t2i_makes_each_captioned_row_a_drawing_of_its_image(drawings):
    data = ImageFolderDataset(drawings, task="t2i", prompt_template="draw {text}")
    assert len(data) == 4
    red, grey, alpha, conversation = (data[i] for i in range(4))
    assert texts(red) == ["draw a red picture", "<image_out>"]
    assert red.images == [] and len(red.output_images) == 1
    (drawn,) = red.output_images
    assert drawn.size == (12, 8) and drawn.getpixel((0, 0)) == (255, 0, 0)
    (drawn,) = grey.output_images
    assert drawn.mode == "RGB" and drawn.getpixel((1, 1)) == (90, 90, 90)
    # alpha composited onto white
    assert alpha.output_images[0].getpixel((5, 5)) == (255, 255, 255)
    assert alpha.output_images[0].getpixel((0, 0)) == (0, 0, 255)
    # an assistant turn's <image> is drawn, whatever the task
    assert texts(conversation) == ["paint it", "Sure: <image_out>"]
    assert conversation.images == [] and len(conversation.output_images) == 1
    assert red.meta["line"] == 1 and red.meta["text"] == "a red picture"

    plain = ImageFolderDataset(drawings, task="t2i")  # the caption itself is the prompt
    assert texts(plain[0]) == ["a red picture", "<image_out>"]
    captions = ImageFolderDataset(drawings)  # task="caption", as before
    assert texts(captions[0]) == [f"{IMAGE_PLACEHOLDER}\n{DEFAULT_CAPTION_PROMPT}", "a red picture"]
    assert len(captions[0].images) == 1 and captions[0].output_images == []
    assert texts(captions[3]) == ["paint it", "Sure: <image_out>"]


def test_task_mixed_and_lists_of_tasks(drawings):
    mixed = ImageFolderDataset(drawings, task="mixed", prompt_template="draw {text}")
    assert len(mixed) == 7  # a caption and a drawing per captioned row, then the conversation
    assert [texts(mixed[i])[1] for i in range(7)] == [
        "a red picture",
        "<image_out>",
        "a grey picture",
        "<image_out>",
        "a blue dot",
        "<image_out>",
        "Sure: <image_out>",
    ]
    assert mixed.records[0].line == mixed.records[1].line == 1
    # the shapes world's task names: vqa adds nothing to a caption row
    for task, kinds in [
        (["vqa", "caption"], ["caption"]),
        ("vqa", ["caption"]),
        (["caption", "t2i"], ["caption", "t2i"]),
        (["vqa", "t2i"], ["t2i"]),
    ]:
        records, _ = read_imagefolder(drawings, task=task)
        first = [r for r in records if r.line == 1]
        assert ["<image_out>" in r.data[1].text for r in first] == [k == "t2i" for k in kinds]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"task": "draw"}, r"task must be one of caption, vqa, t2i, mixed.*'draw' is not a task"),
        ({"task": 3}, r"task must be one of caption, vqa, t2i, mixed.*got 3"),
        (
            {"task": "t2i", "prompt_template": "draw it"},
            r"prompt_template must be a string holding",
        ),
        (
            {"task": "t2i", "prompt_template": {"text": None}},
            r"got \{'text': None\} \(quote it in YAML",
        ),
        ({"task": "t2i", "prompt_template": "<image> {text}"}, r"must not hold '<image>'"),
    ],
)
def test_bad_task_or_prompt_template_is_a_clear_error(drawings, options, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(drawings, **options)


def test_output_image_in_a_human_turn_is_a_problem_of_its_line(drawings):
    bad = [{"from": "human", "value": "<image_out>"}, {"from": "gpt", "value": "ok"}]
    with open(drawings / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "red.png", "conversations": bad}) + "\n")
    with pytest.warns(RuntimeWarning, match="skipped 1 unusable"):
        data = ImageFolderDataset(drawings, task="t2i")
    (problem,) = data.problems
    assert (problem.line, problem.reason) == (5, "bad_value")
    assert "belongs in a 'gpt' turn" in problem.message


@pytest.mark.parametrize("task", ["caption", "t2i"])
def test_a_caption_holding_an_image_placeholder_is_a_problem_of_its_row(tmp_path, task) -> None:
    import json

    from PIL import Image

    from mmgpt.data.imagefolder import read_imagefolder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    rows = [
        {"file_name": "a.png", "text": "a red <image> square"},
        {"file_name": "b.png", "text": "ok"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, problems = read_imagefolder(tmp_path, task=task)
    assert len(records) == 1 and [(p.line, p.reason) for p in problems] == [(1, "bad_value")]
