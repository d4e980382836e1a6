"""Image paths that leave the dataset root: refused by training datasets, warned about by the check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmgpt.data.check import check_dataset
from mmgpt.data.records import DataError
from mmgpt.recipe import apply_overrides, load_recipe, validate_recipe
from mmgpt.registry import create


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, str]:
    """``tmp/data`` (the dataset root) holds in.png and a symlink to ../secret.png; each
    value is the image path a record gives, relative to the root when it is."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(data / "in.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "secret.png")
    (data / "link.png").symlink_to(tmp_path / "secret.png")
    (data / "inner.png").symlink_to(data / "in.png")  # a symlink that stays inside is fine
    return {
        "inside": "in.png",
        "inner link": "inner.png",
        "dotdot": "../secret.png",
        "absolute": str(tmp_path / "secret.png"),
        "symlink": "link.png",
    }


def dataset_file(kind: str, data: Path, image: str) -> tuple[str, Path]:
    """(registry name, file or directory) of a one-record dataset of ``kind`` naming ``image``."""
    if kind == "imagefolder":
        write_jsonl(data / "metadata.jsonl", [{"file_name": image, "text": "a square"}])
        return "imagefolder", data
    if kind == "llava":
        turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
        path = data / "data.json"
        path.write_text(json.dumps([{"id": "r1", "image": image, "conversations": turns}]))
        return "llava", path
    if kind == "preference":
        row = {"prompt": "Which?", "image": image, "chosen": "a", "rejected": "b"}
        return "preference", write_jsonl(data / "prefs.jsonl", [row])
    return "prompts", write_jsonl(data / "prompts.jsonl", [{"prompt": "Say", "image": image}])


KINDS = ["imagefolder", "llava", "preference", "prompts"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_training_datasets_refuse_paths_outside_the_root(tmp_path, layout, kind, case) -> None:
    name, path = dataset_file(kind, tmp_path / "data", layout[case])
    with pytest.raises(DataError, match="outside the dataset root") as info:
        create("dataset", name, path=str(path))
    message = str(info.value)
    assert info.value.reason == "outside_root" and info.value.line == 1
    assert f"{info.value.file}:1:" in message and Path(info.value.file).name in message
    written = layout[case] if case == "absolute" else str(tmp_path / "data" / layout[case])
    assert repr(written) in message
    assert "allow_outside_root" in message
    dataset = create("dataset", name, path=str(path), allow_outside_root=True)
    assert len(dataset) == 1 and dataset[0] is not None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["inside", "inner link"])
def test_paths_inside_the_root_are_accepted(tmp_path, layout, kind, case) -> None:
    name, path = dataset_file(kind, tmp_path / "data", layout[case])
    assert len(create("dataset", name, path=str(path))) == 1


def test_check_warns_about_each_path_with_file_and_line(tmp_path, layout) -> None:
    data = tmp_path / "data"
    rows = [{"file_name": layout[case], "text": case} for case in layout]
    write_jsonl(data / "metadata.jsonl", rows)
    report = check_dataset(data)
    assert report.problems == [] and report.exit_code == 0  # usable, only suspicious
    leaving = [w for w in report.warnings if w.reason == "outside_root"]
    assert [(Path(w.file).name, w.line) for w in leaving] == [
        ("metadata.jsonl", 3),
        ("metadata.jsonl", 4),
        ("metadata.jsonl", 5),
    ]
    assert "'" + str(data / "link.png") + "'" in leaving[2].message
    assert str(tmp_path / "secret.png") in leaving[2].message  # where the symlink leads
    assert check_dataset(data, strict=True).exit_code == 1
    assert "metadata.jsonl:4: outside_root" in report.to_text()


def test_split_may_use_images_of_the_dataset_directory(tmp_path) -> None:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "shared").mkdir()
    Image.new("RGB", (4, 4)).save(data / "shared" / "a.png")
    write_jsonl(data / "train" / "metadata.jsonl", [{"file_name": "../shared/a.png", "text": "a"}])
    assert len(create("dataset", "imagefolder", path=str(data), split="train")) == 1


def test_recipe_override_reaches_the_dataset(tmp_path, layout) -> None:
    _, path = dataset_file("preference", tmp_path / "data", layout["dotdot"])
    recipe = apply_overrides(load_recipe("reward"), ["data.allow_outside_root=true"])
    validate_recipe(recipe)
    args = {k: v for k, v in recipe["data"].items() if k in ("allow_outside_root",)}
    assert args == {"allow_outside_root": True}
    assert len(create("dataset", recipe["data"]["name"], path=str(path), **args)) == 1
