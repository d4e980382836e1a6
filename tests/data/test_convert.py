"""``mmgpt data convert``: COCO captions → imagefolder, imagefolder ⇄ parquet, imagefolder →
tar shards; the converted data gives the same samples, images are copied byte for byte,
problems are reported with file and row, and the output appears whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmgpt.cli import main
from mmgpt.data.errors import DataError
from mmgpt.data.imagefolder import ImageFolderDataset
from mmgpt.data.shards import ShardDataset

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat shape?"},
    {"from": "gpt", "value": "A circle."},
]


def write_coco(root: Path) -> Path:
    """COCO's layout: annotations/captions.json, train2017/*.jpg; two captions per image."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 6), (i * 80, 20, 20)).save(root / "train2017" / f"{i:012d}.jpg")
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(3)]
    images += [{"id": 7, "file_name": "gone.jpg"}, {"id": 8, "file_name": "../../secret.jpg"}]
    notes = [{"id": 100 + k, "image_id": k % 3, "caption": f"caption {k}"} for k in range(6)]
    notes += [
        {"id": 200, "image_id": 7, "caption": "its image is missing"},
        {"id": 201, "image_id": 8, "caption": "its image is outside"},
        {"id": 202, "image_id": 99, "caption": "no such image"},
    ]
    path = root / "annotations" / "captions.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": notes}))
    return path


def test_coco_captions_to_imagefolder_through_the_cli(tmp_path: Path, capsys) -> None:
    source = write_coco(tmp_path / "coco")
    out = tmp_path / "folder"
    argv = ["data", "convert", str(source), str(out), "--to", "imagefolder"]
    assert main([*argv, "--images", str(tmp_path / "coco" / "train2017")]) == 1  # rows skipped
    printed = capsys.readouterr().out
    assert "written:   6 rows, 3 images" in printed
    assert "skipped:   3 rows (bad_value: 1, missing_image: 1, outside_root: 1)" in printed
    assert f"{source}: bad_value: annotations[8]: image_id 99 not in images" in printed

    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [f"caption {k}" for k in range(6)]
    assert rows[0]["file_name"] == rows[3]["file_name"] == "images/00000000.jpg"  # shared once
    assert rows[0]["image_id"] == 0 and rows[0]["id"] == 100
    original = (tmp_path / "coco" / "train2017" / f"{1:012d}.jpg").read_bytes()
    assert (out / rows[1]["file_name"]).read_bytes() == original  # byte for byte
    dataset = ImageFolderDataset(out)
    assert [s.conversation[1].text for s in dataset] == [f"caption {k}" for k in range(6)]

    assert main([*argv, "--json"]) == 2  # the folder exists now
    assert "exists; pass --overwrite" in capsys.readouterr().err


def write_imagefolder(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (7, 5), (200, 10, 10)).save(root / "img" / "a.png")
    Image.new("L", (6, 6), 90).save(root / "img" / "b.png")
    Image.new("RGB", (9, 4), (10, 10, 200)).save(root / "img" / "c.jpg", quality=90)
    rows = [
        {"file_name": "img/a.png", "text": "a red rectangle", "source_id": 3},
        {"file_name": "img/b.png", "conversations": CONVERSATION},
        {"file_name": "img/c.jpg", "text": "a blue strip"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def same_samples(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [(t.role, t.text) for t in x.conversation] == [
            (t.role, t.text) for t in y.conversation
        ]
        assert [im.tobytes() for im in x.images] == [im.tobytes() for im in y.images]
        assert [im.tobytes() for im in x.output_images] == [im.tobytes() for im in y.output_images]


def test_imagefolder_to_parquet_and_back_round_trips(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason='parquet needs pip install "mmgpt[data]"')
    from mmgpt.data.parquet import ParquetDataset

    write_imagefolder(tmp_path / "src")
    convert = ["data", "convert", str(tmp_path / "src"), str(tmp_path / "pq")]
    assert main([*convert, "--to", "parquet", "--shard-size", "2"]) == 0
    files = sorted(p.name for p in (tmp_path / "pq").iterdir())
    assert files == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    original = ImageFolderDataset(tmp_path / "src", task="mixed")
    same_samples(ParquetDataset(tmp_path / "pq", task="mixed"), original)

    back = ["data", "convert", str(tmp_path / "pq"), str(tmp_path / "back")]
    assert main([*back, "--to", "imagefolder"]) == 0
    same_samples(ImageFolderDataset(tmp_path / "back", task="mixed"), original)
    rows = [json.loads(x) for x in (tmp_path / "back" / "metadata.jsonl").read_text().splitlines()]
    assert [("text" in r, "conversations" in r) for r in rows] == [(1, 0), (0, 1), (1, 0)]
    assert (tmp_path / "back" / rows[2]["file_name"]).read_bytes() == (
        tmp_path / "src" / "img" / "c.jpg"
    ).read_bytes()

    datasets = pytest.importorskip("datasets", reason="checks the files with the datasets library")
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pq"), split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded[0]["image"].size == (7, 5) and loaded[0]["text"] == "a red rectangle"


def test_imagefolder_to_shards_gives_the_same_samples(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "src")
    out = tmp_path / "shards"
    argv = ["data", "convert", str(tmp_path / "src"), str(out), "--to", "shards"]
    assert main([*argv, "--shard-size", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    same_samples(
        list(ShardDataset(out, task="mixed")), ImageFolderDataset(tmp_path / "src", task="mixed")
    )
    assert main(["data", "check", str(out)]) == 0


def test_several_images_fit_parquet_and_shards_not_an_imagefolder(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason='parquet needs pip install "mmgpt[data]"')
    (tmp_path / "src").mkdir()
    for i, name in enumerate(("x.png", "y.png")):
        Image.new("RGB", (3, 3), (i * 100, 0, 0)).save(tmp_path / "src" / name)
    question = [
        {"from": "human", "value": "<image> or <image>?"},
        {"from": "gpt", "value": "left"},
    ]
    llava = [
        {"id": "two", "image": ["x.png", "y.png"], "conversations": question},
        {"id": "one", "image": "x.png", "conversations": CONVERSATION},
    ]
    source = tmp_path / "src" / "llava.json"
    source.write_text(json.dumps(llava))
    report_code = main(
        ["data", "convert", str(source), str(tmp_path / "if"), "--to", "imagefolder"]
    )
    assert (
        report_code == 1 and len((tmp_path / "if" / "metadata.jsonl").read_text().splitlines()) == 1
    )
    assert main(["data", "convert", str(source), str(tmp_path / "pq"), "--to", "parquet"]) == 0
    assert (
        main(["data", "convert", str(tmp_path / "pq"), str(tmp_path / "sh"), "--to", "shards"]) == 0
    )
    two = next(iter(ShardDataset(tmp_path / "sh")))
    assert two.conversation[0].text == "<image> or <image>?"
    assert [im.getpixel((0, 0)) for im in two.images] == [(0, 0, 0), (100, 0, 0)]


def test_output_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    from mmgpt.data import convert

    write_imagefolder(tmp_path / "src")
    (tmp_path / "src" / "img" / "c.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # refused
    out = tmp_path / "out"
    report = convert.convert_dataset(tmp_path / "src", out, "shards")
    assert report.rows == 2 and [p.reason for p in report.problems] == ["unsupported_format"]
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "_tar_member", crash)
    with pytest.raises(OSError, match="No space"):
        convert.convert_dataset(tmp_path / "src", out, "shards", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # the old output is untouched
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}  # no staging folder left

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text('{"file_name": "none.png", "text": "x"}\n')
    with pytest.raises(DataError, match="no usable row"):
        convert.convert_dataset(tmp_path / "empty", tmp_path / "nothing", "imagefolder")
    assert not (tmp_path / "nothing").exists()


def test_an_unhashable_coco_image_id_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    from mmgpt.data.convert import convert_dataset

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [
            {"image_id": 1, "caption": "a black square"},
            {"image_id": [1], "caption": "a list as an id"},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    report = convert_dataset(tmp_path / "c.json", tmp_path / "out", "imagefolder")
    rows = (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 1 and "a black square" in rows[0]
    assert "image_id [1] not in images" in str(report)
