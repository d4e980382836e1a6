"""``mmgpt train caption --data X`` on the downloaded formats: parquet (in memory and streamed),
a ``datasets`` directory and tar shards are detected, trained on, and recorded in the run's
recipe; a streamed run resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

pytest.importorskip("timm")
pytest.importorskip("mmgpt_text")

from mmgpt.cli import main
from mmgpt.data.convert import convert_dataset

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 225)}
TINY = [
    "model.block_size=64",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.save_every=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
]


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("downloaded") / "folder"
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        Image.new("RGB", (12 + i, 10), colour).save(root / "images" / f"{name}.png")
        rows.append({"file_name": f"images/{name}.png", "text": f"a {name} picture"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    return root


def train(data: Path | str, out: Path, *extra: str) -> dict:
    assert main(["train", "caption", "--data", str(data), "--out", str(out), *TINY, *extra]) == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "model" / "config.json").is_file()
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    return {"steps": [s["step"] for s in steps if s["split"] == "train"], "data": recipe["data"]}


def test_train_from_parquet_in_memory_and_streamed(imagefolder: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason='parquet needs pip install "mmgpt[data]"')
    convert_dataset(imagefolder, tmp_path / "pq", "parquet", shard_size=4)
    run = train(tmp_path / "pq", tmp_path / "run", "train.max_steps=2", "data.eval_fraction=0")
    assert run["steps"] == [1, 2] and run["data"]["name"] == "parquet"
    streamed = train(
        tmp_path / "pq", tmp_path / "stream", "train.max_steps=2", "data.streaming=true"
    )
    assert streamed["steps"] == [1, 2] and streamed["data"]["streaming"] is True


def test_train_from_a_datasets_directory(imagefolder: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip(
        "datasets", reason="writing a save_to_disk directory needs the datasets library"
    )
    rows = [json.loads(x) for x in (imagefolder / "metadata.jsonl").read_text().splitlines()]
    data = datasets.Dataset.from_dict(
        {
            "image": [str(imagefolder / r["file_name"]) for r in rows],
            "text": [r["text"] for r in rows],
        },
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    data.save_to_disk(str(tmp_path / "hf"))
    run = train(tmp_path / "hf", tmp_path / "run", "train.max_steps=2", "data.eval_fraction=0")
    assert run["steps"] == [1, 2] and run["data"]["name"] == "hf_dataset"


def test_train_from_tar_shards_and_resume(imagefolder: Path, tmp_path: Path, capsys) -> None:
    convert_dataset(imagefolder, tmp_path / "shards", "shards", shard_size=2)
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    run = train(pattern, tmp_path / "run", "train.max_steps=2", "data.shuffle_buffer=3")
    assert run["steps"] == [1, 2] and run["data"]["name"] == "shards"
    assert "no held-out split" in capsys.readouterr().out
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text()
    )
    assert state["data"]["kind"] == "stream" and state["data"]["samples"] == 4
    resumed = train(
        pattern, tmp_path / "run", "--resume", "train.max_steps=4", "data.shuffle_buffer=3"
    )
    assert "resuming at step 2" in capsys.readouterr().out
    assert resumed["steps"] == [1, 2, 3, 4]
