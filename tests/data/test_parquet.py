"""Parquet files and ``datasets`` directories: the LLaVA-Instruct, Cauldron and caption layouts,
embedded images and paths, tasks, problems with file and row, the safe loader, streaming
row group by row group with exact resume, ``data check`` and format detection."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("pyarrow", reason='parquet support needs pip install "mmgpt[data]"')

import pyarrow as pa
import pyarrow.parquet as pq

from mmgpt.data.check import check_dataset, detect_format
from mmgpt.data.errors import DataError
from mmgpt.data.loader import ResumableLoader, StreamingLoader
from mmgpt.data.parquet import (
    HFDiskDataset,
    ParquetDataset,
    ParquetStream,
    parquet_dataset,
    require_pyarrow,
)
from mmgpt.registry import create

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURNS = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), colour).save(buffer, "PNG")
    return buffer.getvalue()


def llava_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "image": {"bytes": png((i * 20, 0, 0)), "path": f"{i}.png"},
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?" if i % 2 else "colour?"},
                {"from": "gpt", "value": f"red {i}"},
            ],
        }
        for i in range(n)
    ]


def write(path: Path, rows: list[dict], schema: pa.Schema, row_group_size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


LLAVA = pa.schema([("id", pa.string()), ("image", IMAGE), ("conversations", TURNS)])


def test_llava_instruct_layout_with_embedded_images(tmp_path: Path) -> None:
    path = write(tmp_path / "llava" / "train-00000-of-00001.parquet", llava_rows(4), LLAVA)
    dataset = create("dataset", "parquet", path=str(tmp_path / "llava"))
    assert isinstance(dataset, ParquetDataset) and len(dataset) == 4
    sample = dataset[1]
    assert [t.role for t in sample.conversation] == ["user", "assistant"]
    assert sample.conversation[0].text == "<image>\nWhat colour?"
    assert dataset[0].conversation[0].text == "<image>\ncolour?"  # LLaVA's rule: prepended
    assert sample.images[0].getpixel((0, 0)) == (20, 0, 0)
    assert sample.meta == {"id": "r1", "source": str(path), "line": 2}
    assert detect_format(tmp_path / "llava") == ("parquet", tmp_path / "llava")
    assert detect_format(path) == ("parquet", path)


def test_images_by_path_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "coco").mkdir(parents=True)
    Image.new("RGB", (3, 3), (0, 9, 0)).save(root / "coco" / "a.png")
    Image.new("RGB", (3, 3), (0, 0, 9)).save(tmp_path / "secret.png")
    conversation = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "green"}]
    schema = pa.schema([("image", pa.string()), ("conversations", TURNS)])
    rows = [{"image": "coco/a.png", "conversations": conversation}]
    write(root / "llava.parquet", rows, schema)
    [sample] = list(ParquetDataset(root / "llava.parquet"))
    assert sample.images[0].getpixel((0, 0)) == (0, 9, 0)

    write(
        root / "escape.parquet", [{"image": "../secret.png", "conversations": conversation}], schema
    )
    with pytest.raises(DataError, match=r"escape\.parquet:1: image path '.*\.\./secret\.png'"):
        ParquetDataset(root / "escape.parquet")
    assert len(ParquetDataset(root / "escape.parquet", allow_outside_root=True)) == 1
    report = check_dataset(root / "escape.parquet")
    assert [w.reason for w in report.warnings] == ["outside_root"]


def test_cauldron_layout_several_images(tmp_path: Path) -> None:
    schema = pa.schema(
        [
            ("images", pa.list_(IMAGE)),
            (
                "texts",
                pa.list_(pa.struct([(k, pa.string()) for k in ("user", "assistant", "source")])),
            ),
        ]
    )
    rows = [
        {
            "images": [
                {"bytes": png((1, 1, 1)), "path": None},
                {"bytes": png((2, 2, 2)), "path": None},
            ],
            "texts": [
                {"user": "Which is darker?", "assistant": "The first.", "source": "x"},
                {"user": "Sure?", "assistant": "Yes.", "source": "x"},
            ],
        }
    ]
    path = write(tmp_path / "ai2d" / "train-00000-of-00001.parquet", rows, schema)
    [sample] = list(ParquetDataset(path))
    assert [(t.role, t.text) for t in sample.conversation] == [
        ("user", "<image>\n<image>\nWhich is darker?"),
        ("assistant", "The first."),
        ("user", "Sure?"),
        ("assistant", "Yes."),
    ]
    assert [im.getpixel((0, 0)) for im in sample.images] == [(1, 1, 1), (2, 2, 2)]


@pytest.mark.parametrize(
    ("task", "users"),
    [
        ("caption", ["<image>\nDescribe the image."]),
        ("t2i", ["draw a red box"]),
        ("mixed", ["<image>\nDescribe the image.", "draw a red box"]),
    ],
)
def test_caption_column_and_tasks(tmp_path: Path, task: str, users: list[str]) -> None:
    schema = pa.schema([("image", IMAGE), ("caption", pa.string())])
    rows = [{"image": {"bytes": png((200, 0, 0)), "path": "x.png"}, "caption": "a red box"}]
    path = write(tmp_path / "c.parquet", rows, schema)
    samples = list(ParquetDataset(path, task=task, prompt_template="draw {text}"))
    assert [s.conversation[0].text for s in samples] == users
    drawing = [s for s in samples if s.output_images]
    assert len(drawing) == (task != "caption")
    with pytest.raises(ValueError, match=r"parquet: task must be one of"):
        ParquetDataset(path, task="captions")


def test_problems_name_file_and_row_and_images_go_through_the_safe_loader(tmp_path: Path) -> None:
    rows = llava_rows(5)
    rows[1]["conversations"] = [{"from": "human", "value": "no answer"}]
    rows[2]["image"] = {"bytes": b"%!PS-Adobe-3.0 EPSF-3.0\n", "path": "evil.png"}
    rows[3]["image"] = {"bytes": None, "path": None}
    path = write(tmp_path / "bad.parquet", rows, LLAVA)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        dataset = ParquetDataset(path, verify_images=True)
    found = sorted((p.line, p.reason) for p in dataset.problems)
    assert found == [(2, "bad_value"), (3, "unsupported_format"), (4, "missing_image")]
    assert f"{path}:3" in str(next(p for p in dataset.problems if p.line == 3))
    with pytest.raises(DataError, match=r"bad\.parquet:2"):
        ParquetDataset(path, strict=True)
    report = check_dataset(path)
    assert report.num_samples == 2 and report.exit_code == 1
    assert f"{path}:3 column 'image': detected format EPS" in report.to_text()


def test_unreadable_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x\.parquet: not a parquet file"):
        ParquetDataset(tmp_path / "x.parquet")
    report = check_dataset(tmp_path / "x.parquet")
    assert [p.reason for p in report.problems] == ["bad_table"]


def test_split_selects_files(tmp_path: Path) -> None:
    write(tmp_path / "d" / "data" / "train-00000-of-00001.parquet", llava_rows(3), LLAVA)
    write(tmp_path / "d" / "data" / "test-00000-of-00001.parquet", llava_rows(1), LLAVA)
    assert len(ParquetDataset(tmp_path / "d")) == 4
    assert len(ParquetDataset(tmp_path / "d", split="train")) == 3
    assert len(ParquetDataset(str(tmp_path / "d" / "data" / "test-*.parquet"))) == 1
    with pytest.raises(DataError, match="no parquet file of split 'validation'"):
        ParquetDataset(tmp_path / "d", split="validation")


def test_missing_pyarrow_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "mmgpt\[data\]"'):
        require_pyarrow()


def texts(batch: list) -> list[str]:
    return [sample.conversation[-1].text for sample in batch]


def test_streaming_reads_row_groups_and_resumes_exactly(tmp_path: Path) -> None:
    write(tmp_path / "s" / "a.parquet", llava_rows(9), LLAVA, row_group_size=4)
    write(tmp_path / "s" / "b.parquet", llava_rows(5), LLAVA, row_group_size=2)

    def make() -> ResumableLoader:
        stream = parquet_dataset(tmp_path / "s", streaming=True, shuffle_buffer=3)
        return ResumableLoader(stream, 3, seed=4, collate_fn=texts)

    stream = parquet_dataset(tmp_path / "s", streaming=True)
    assert isinstance(stream, ParquetStream) and len(stream.shards) == 3 + 3
    assert [s.conversation[-1].text for s in stream] == [f"red {i}" for i in [*range(9), *range(5)]]
    assert isinstance(make(), StreamingLoader)
    steps = 14
    reference = make().forever()
    expected = [next(reference) for _ in range(steps)]
    first_epoch = [text for batch in expected[:4] for text in batch]
    assert sorted(first_epoch) != first_epoch  # shuffled
    for cut in (1, 4, 7, 13):
        first = make()
        head = first.forever()
        got = [next(head) for _ in range(cut)]
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        tail = resumed.forever()
        assert got + [next(tail) for _ in range(steps - cut)] == expected, cut
    with pytest.raises(ValueError, match="verify_images"):
        parquet_dataset(tmp_path / "s", streaming=True, verify_images=True)


# -- datasets directories (save_to_disk) ----------------------------------------------------
def test_datasets_directories_of_both_layouts(tmp_path: Path) -> None:
    datasets = pytest.importorskip(
        "datasets", reason="writing a save_to_disk directory needs the datasets library"
    )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conversations": [
                {"from": datasets.Value("string"), "value": datasets.Value("string")}
            ],
        }
    )
    images = [Image.new("RGB", (4, 4), (i * 50, 1, 1)) for i in range(3)]
    conversations = [
        [{"from": "human", "value": "colour?"}, {"from": "gpt", "value": f"shade {i}"}]
        for i in range(3)
    ]
    llava = datasets.Dataset.from_dict(
        {"image": images, "conversations": conversations}, features=features
    )
    llava.save_to_disk(str(tmp_path / "llava"))
    dataset = HFDiskDataset(tmp_path / "llava")
    assert [s.conversation[1].text for s in dataset] == ["shade 0", "shade 1", "shade 2"]
    assert dataset[2].images[0].getpixel((0, 0)) == (100, 1, 1)
    assert detect_format(tmp_path / "llava") == ("hf_dataset", tmp_path / "llava")

    cauldron = datasets.Dataset.from_dict(
        {
            "images": [[images[0], images[1]]],
            "texts": [[{"user": "Compare.", "assistant": "Different.", "source": "s"}]],
        },
        features=datasets.Features(
            {
                "images": datasets.Sequence(datasets.Image()),
                "texts": [{k: datasets.Value("string") for k in ("user", "assistant", "source")}],
            }
        ),
    )
    captions = datasets.Dataset.from_dict(
        {"image": images[:2], "text": ["one", "two"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": cauldron, "test": captions}).save_to_disk(str(tmp_path / "dd"))
    [sample] = list(HFDiskDataset(tmp_path / "dd"))  # the train split by default
    assert sample.conversation[0].text == "<image>\n<image>\nCompare." and len(sample.images) == 2
    test = HFDiskDataset(tmp_path / "dd", split="test", task="t2i")
    assert [s.conversation[0].text for s in test] == ["one", "two"] and test[0].output_images
    with pytest.raises(DataError, match="no split 'validation'; this DatasetDict has train, test"):
        HFDiskDataset(tmp_path / "dd", split="validation")
    report = check_dataset(tmp_path / "dd")
    assert report.format == "hf_dataset" and report.ok and report.num_images == 2
