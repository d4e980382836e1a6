"""A modality added by a plugin, end to end inside mmgpt: its loader (registry kind ``loader``)
reads its files for LLaVA and imagefolder data, ``mmgpt data check``, ``mmgpt generate
--input`` and the chat demo; recipes take several encoders (``model.encoders``), which the
model directory saves and loads; a model trained by a recipe on the modality's files answers
from them.

The modality is ``"sensor"``: a ``.sensor`` text file of 6 comma-separated readings. It is
written here as a third-party plugin would write it, against the documented contract only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmgpt import registry
from mmgpt.data.check import check_dataset
from mmgpt.data.errors import DataError
from mmgpt.data.loaders import (
    InputLoadError,
    accepted_extensions,
    load_input,
    modality_of_file,
    placeholder_of,
)
from mmgpt.multimodal import MultimodalGPT

pytest.importorskip("mmgpt_text")

READINGS = 6


class SensorEncoder(nn.Module):
    """6 readings → ``num_tokens`` vectors."""

    modality = "sensor"

    def __init__(self, num_tokens: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.num_tokens, self.output_dim, self.dim = num_tokens, dim, dim
        self.proj = nn.Sequential(
            nn.Linear(READINGS, 32), nn.GELU(), nn.Linear(32, num_tokens * dim)
        )

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in items])  # (N, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).view(-1, self.num_tokens, self.dim)  # (N, num_tokens, dim)

    def config_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "dim": self.dim}


class SensorLoader:
    modality = "sensor"
    extensions = (".sensor",)
    max_bytes = 1000

    def load(self, path: Path) -> torch.Tensor:
        values = [float(v) for v in path.read_text().split(",")]  # ValueError: not numbers
        if len(values) != READINGS:
            raise ValueError(f"expected {READINGS} readings, got {len(values)}")
        return torch.tensor(values)


@pytest.fixture(scope="module")
def sensor():
    registry.register("encoder", "test-sensor", SensorEncoder)
    registry.register("loader", "sensor", SensorLoader)
    yield
    registry.REGISTRY.unregister("encoder", "test-sensor")
    registry.REGISTRY.unregister("loader", "sensor")


def write_sensor(path: Path, values: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(str(v) for v in values))
    return path


HIGH, LOW = [0.9] * READINGS, [-0.9] * READINGS


# -- loaders ------------------------------------------------------------------------------------
def test_load_input_checks_the_file_then_calls_the_loader(sensor, tmp_path: Path) -> None:
    good = write_sensor(tmp_path / "a.sensor", HIGH)
    assert torch.equal(load_input("sensor", good), torch.tensor(HIGH))
    assert placeholder_of("sensor") == "<sensor>" and placeholder_of("image") == "<image>"
    assert accepted_extensions(["sensor"]) == {".sensor": "sensor"}
    assert modality_of_file(tmp_path / "B.SENSOR") == "sensor"
    assert modality_of_file(tmp_path / "c.png") == "image"

    cases = [
        (tmp_path / "missing.sensor", "missing_file", "file not found"),
        (tmp_path, "missing_file", "is a directory"),
        (write_sensor(tmp_path / "a.txt", HIGH), "unsupported_format", "must be a .sensor"),
        (
            write_sensor(tmp_path / "big.sensor", [0.0] * 400),
            "too_large",
            "above the limit of 1000",
        ),
        (write_sensor(tmp_path / "few.sensor", [1.0]), "unreadable_input", "expected 6 readings"),
    ]
    for path, reason, words in cases:
        with pytest.raises(InputLoadError, match=words) as info:
            load_input("sensor", path)
        assert info.value.reason == reason and str(path) in str(info.value)
    with pytest.raises(DataError, match=r"no loader reads 'smell' files.*register\("):
        load_input("smell", good)
    with pytest.raises(
        InputLoadError, match=r"no loader reads '\.xyz' files \(accepted: .*\.sensor"
    ):
        modality_of_file(tmp_path / "x.xyz")


def test_two_loaders_of_one_extension_are_an_error(sensor) -> None:
    class Other(SensorLoader):
        modality = "other"

    registry.register("loader", "other", Other)
    try:
        with pytest.raises(DataError, match="'sensor' loaders both read '.sensor'"):
            accepted_extensions()
    finally:
        registry.REGISTRY.unregister("loader", "other")


# -- data -----------------------------------------------------------------------------------------
def llava_file(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def convo(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_llava_records_name_files_per_modality(sensor, tmp_path: Path) -> None:
    from PIL import Image

    from mmgpt.data.llava import LlavaDataset, read_llava

    write_sensor(tmp_path / "hi.sensor", HIGH)
    write_sensor(tmp_path / "lo.sensor", LOW)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    records = [
        {"id": "key", "sensor": "hi.sensor", "conversations": convo("<sensor>\nlevel?", "high")},
        {"id": "none", "sensor": ["lo.sensor"], "conversations": convo("level?", "low")},
        {  # both modalities, through "inputs"
            "id": "both",
            "inputs": {"sensor": ["hi.sensor", "lo.sensor"], "image": "x.png"},
            "conversations": convo("<image> <sensor> then <sensor>?", "up, down"),
        },
        {"id": "count", "sensor": "hi.sensor", "conversations": convo("<sensor><sensor>", "x")},
        {"id": "smell", "inputs": {"smell": ["a.smell"]}, "conversations": convo("?", "x")},
        {
            "id": "twice",
            "sensor": "hi.sensor",
            "inputs": {"sensor": []},
            "conversations": convo("?", "x"),
        },
        {"id": "gone", "sensor": "nope.sensor", "conversations": convo("?", "x")},
    ]
    path = llava_file(tmp_path, records)
    parsed, problems = read_llava(path)
    assert [r.id for r in parsed] == ["key", "none", "both"]
    assert {p.id: p.reason for p in problems} == {
        "count": "placeholder_mismatch",
        "smell": "unknown_modality",
        "twice": "bad_value",
        "gone": "missing_file",
    }
    assert "2 '<sensor>' placeholder(s) in the text but 1 sensor file(s)" in str(problems[0])
    assert "'sensor'" not in parsed[0].meta and "inputs" not in parsed[2].meta

    with pytest.warns(RuntimeWarning, match="skipped 4"):
        data = LlavaDataset(path)
    sample = data[1]  # no placeholder: prepended to the first human turn, as images are
    assert sample.conversation[0].text == "<sensor>\nlevel?"
    assert torch.equal(sample.inputs["sensor"][0], torch.tensor(LOW))
    both = data[2]
    assert len(both.images) == 1 and both.images[0].size == (8, 8)
    assert [x.tolist() for x in both.inputs["sensor"]] == [
        pytest.approx(HIGH),
        pytest.approx(LOW),
    ]


def test_convert_reports_rows_with_other_modalities_instead_of_dropping_files(
    sensor, tmp_path: Path
) -> None:
    from PIL import Image

    from mmgpt.data.convert import convert_dataset

    write_sensor(tmp_path / "hi.sensor", HIGH)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    records = [
        {"id": "img", "image": "x.png", "conversations": convo("<image>\ncolour?", "red")},
        {
            "id": "mix",
            "inputs": {"sensor": "hi.sensor", "image": "x.png"},
            "conversations": convo("<image><sensor>?", "red, high"),
        },
    ]
    report = convert_dataset(llava_file(tmp_path, records), tmp_path / "out", "parquet")
    assert report.rows == 1
    assert [(p.id, p.reason) for p in report.problems] == [("mix", "unsupported_modality")]
    assert "sensor files" in report.problems[0].message


def test_an_unreadable_file_skips_its_sample_or_fails_under_strict(sensor, tmp_path) -> None:
    from mmgpt.data.llava import LlavaDataset

    write_sensor(tmp_path / "hi.sensor", HIGH)
    (tmp_path / "bad.sensor").write_text("not,numbers")
    path = llava_file(
        tmp_path,
        [
            {"sensor": "bad.sensor", "conversations": convo("level?", "?")},
            {"sensor": "hi.sensor", "conversations": convo("level?", "high")},
        ],
    )
    data = LlavaDataset(path)
    with pytest.warns(RuntimeWarning, match=r"bad\.sensor.*using the next sample"):
        sample = data[0]
    assert sample.conversation[1].text == "high"  # the next loadable sample
    assert data.skipped == {"unreadable_input": 1}
    with pytest.raises(DataError, match=r"data\.json:1: unreadable_input: .*bad\.sensor"):
        LlavaDataset(path, strict=True, verify_images=True)

    report = check_dataset(path)
    assert not report.ok and report.num_samples == 1 and report.num_inputs == {"sensor": 1}
    assert [(p.line, p.reason) for p in report.problems] == [(1, "unreadable_input")]
    assert "1 sensor files read" in report.to_text()


def test_imagefolder_rows_name_files_per_modality(sensor, tmp_path: Path) -> None:
    from PIL import Image

    from mmgpt.data.imagefolder import ImageFolderDataset, read_imagefolder

    write_sensor(tmp_path / "s" / "a.sensor", HIGH)
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    rows = [
        {"sensor_file_name": "s/a.sensor", "text": "rising"},
        {"file_name": "b.png", "inputs": {"sensor": ["s/a.sensor"]}, "text": "blue, rising"},
        {"inputs": {"sensor": "s/a.sensor"}, "conversations": convo("what now?", "rising")},
        {"sensor_file_name": "s/a.sensor", "inputs": {"sensor": ["s/a.sensor"]}, "text": "x"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records, problems = read_imagefolder(tmp_path)
    assert [p.reason for p in problems] == ["bad_value"] and problems[0].line == 4
    assert records[0].data[0].text == "<sensor>\nDescribe the image."
    assert records[1].data[0].text == "<image>\n<sensor>\nDescribe the image."
    assert records[2].data[0].text == "<sensor>\nwhat now?"
    with pytest.warns(RuntimeWarning):
        data = ImageFolderDataset(tmp_path, caption_prompt="Describe it.")
    sample = data[1]
    assert len(sample.images) == 1 and torch.equal(sample.inputs["sensor"][0], torch.tensor(HIGH))
    with pytest.raises(ValueError, match="task t2i needs an image"):
        ImageFolderDataset(tmp_path, task="t2i", strict=True)


def test_imagefolder_csv_rows_name_files_in_columns(sensor, tmp_path: Path) -> None:
    from mmgpt.data.imagefolder import read_imagefolder

    write_sensor(tmp_path / "a.sensor", HIGH)
    (tmp_path / "metadata.csv").write_text(
        "file_name,sensor_file_name,text,inputs\n"
        ",a.sensor,rising,\n"  # an empty file_name cell: the row has no image
        ',,falling,"{""sensor"": [""a.sensor""]}"\n'
        ",,no files,\n"
    )
    records, problems = read_imagefolder(tmp_path)
    assert [r.data[0].text for r in records] == ["<sensor>\nDescribe the image."] * 2
    assert [r.inputs for r in records] == [{"sensor": [tmp_path / "a.sensor"]}] * 2
    assert [(p.line, p.reason) for p in problems] == [(4, "bad_type")]  # file_name is ""


# -- models and recipes ------------------------------------------------------------------------------
def test_several_encoders_build_save_and_load(sensor, tmp_path: Path) -> None:
    from PIL import Image

    from mmgpt.data.sample import Sample, Turn
    from mmgpt_text import TextTokenizer, example_corpus_files

    pytest.importorskip("timm")
    tok = TextTokenizer.train(example_corpus_files(), vocab_size=300)
    model = MultimodalGPT.build(
        "gpt-nano",
        tok,
        encoder=None,
        encoders={"image": ("vit", {}), "sensor": ("test-sensor", {"num_tokens": 3})},
        projectors={"sensor": ("linear", {})},
        block_size=128,
    )
    assert model.component_names["projectors.image"] == "mlp2x_gelu"  # the default projector
    assert model.component_names["projectors.sensor"] == "linear"
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {m: c["name"] for m, c in config["encoders"].items()} == {
        "image": "vit",
        "sensor": "test-sensor",
    }
    loaded = MultimodalGPT.from_pretrained(tmp_path / "m")
    sample = Sample(
        [Turn("user", "<sensor> and <image>?"), Turn("assistant", "yes")],
        images=[Image.new("RGB", (32, 32), "red")],
        inputs={"sensor": [torch.tensor(HIGH)]},
    )
    batch = model.processor()([sample])
    with torch.no_grad():
        assert torch.equal(model.eval()(batch).logits, loaded(batch).logits)

    with pytest.raises(
        ValueError, match=r"encoders\['audio'\] is 'test-sensor', an encoder of modality 'sensor'"
    ):
        MultimodalGPT.build("gpt-nano", tok, encoder=None, encoders={"audio": ("test-sensor", {})})
    with pytest.raises(ValueError, match="two encoders for modality 'sensor'"):
        MultimodalGPT.build(
            "gpt-nano", tok, encoder="test-sensor", encoders={"sensor": ("test-sensor", {})}
        )
    with pytest.raises(
        ValueError, match=r"projectors given for modalities without an encoder: \['x'\]"
    ):
        MultimodalGPT.build("gpt-nano", tok, encoder=None, projectors={"x": ("linear", {})})


def test_the_loader_and_the_encoder_must_agree_on_the_placeholder(sensor) -> None:
    from mmgpt_text import TextTokenizer, example_corpus_files

    class Tagged(SensorEncoder):
        placeholder = "<reading>"

    registry.register("encoder", "test-tagged", Tagged)
    try:
        tok = TextTokenizer.train(example_corpus_files(), vocab_size=300)
        with pytest.raises(
            ValueError, match="placeholder is '<reading>' but the 'sensor' loader's is '<sensor>'"
        ):
            MultimodalGPT.build("gpt-nano", tok, encoder="test-tagged")
    finally:
        registry.REGISTRY.unregister("encoder", "test-tagged")


def test_recipe_keys_of_model_encoders_are_validated(sensor) -> None:
    from mmgpt.recipe.spec import apply_overrides, load_recipe, validate_recipe

    recipe = load_recipe("vqa")
    recipe = apply_overrides(
        recipe,
        ["model.encoders.sensor.type=test-sensor", "model.encoders.sensor.num_tokens=3"],
    )
    validate_recipe(recipe)
    assert recipe["model"]["encoders"] == {"sensor": {"type": "test-sensor", "num_tokens": 3}}
    again = apply_overrides(recipe, ["model.encoders.sensor.type=vit"])  # a new type: args go
    assert again["model"]["encoders"]["sensor"] == {"type": "vit"}
    with pytest.raises(
        ValueError, match=r"model\.encoders\.sensor\.num_token.*did you mean.*num_tokens"
    ):
        apply_overrides(recipe, ["model.encoders.sensor.num_token=2"])
    bad = load_recipe("vqa")
    bad["model"]["encoders"] = {"sensor": {"num_tokens": 2}}
    with pytest.raises(
        ValueError, match=r"'model\.encoders\.sensor' must be a mapping with a 'type'"
    ):
        validate_recipe(bad)
    bad["model"]["encoders"] = ["vit"]
    with pytest.raises(ValueError, match="must map modalities to components"):
        validate_recipe(bad)


@pytest.fixture(scope="module")
def sensor_run(sensor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A recipe with only the sensor encoder (``model.encoders``), trained on LLaVA records
    whose answer ("rising"/"falling") is told by the sign of the readings alone."""
    from mmgpt.recipe.run import run_training

    tmp_path = tmp_path_factory.mktemp("sensor-run")
    records = []
    for i in range(16):
        rising = i % 2 == 0
        name = f"clips/{i}.sensor"
        write_sensor(tmp_path / name, [v * (0.5 + i / 40) for v in (HIGH if rising else LOW)])
        answer = "rising" if rising else "falling"
        records.append({"sensor": name, "conversations": convo("<sensor>\nwhich way?", answer)})
    data = llava_file(tmp_path, records)
    recipe = {
        "model": {
            "architecture": "multimodal",
            "preset": "gpt-nano",
            "n_layer": 1,
            "block_size": 32,
            "encoders": {"sensor": {"type": "test-sensor", "num_tokens": 2}},
            "projector": {"type": "linear"},
        },
        "tokenizer": {"name": "bpe", "vocab_size": 280},
        "data": {"name": "llava", "path": str(data), "eval_fraction": 0},
        "objective": {"name": "sft"},
        "train": {
            "lr": 3e-3,
            "warmup_steps": 2,
            "max_steps": 40,
            "batch_size": 8,
            "eval_every": 0,
            "save_every": 0,
            "log_every": 100,
            "seed": 0,
            "progress": False,
            "tensorboard": False,
        },
    }
    run_training(recipe, out=tmp_path / "run")
    write_sensor(tmp_path / "up.sensor", HIGH)
    write_sensor(tmp_path / "down.sensor", LOW)
    return {
        "dir": tmp_path,
        "model": tmp_path / "run" / "model",
        "up": tmp_path / "up.sensor",
        "down": tmp_path / "down.sensor",
    }


def test_a_recipe_with_model_encoders_learns_from_the_files(sensor_run, capsys) -> None:
    from mmgpt.cli import main

    config = json.loads((sensor_run["model"] / "config.json").read_text())
    assert list(config["encoders"]) == ["sensor"]
    argv = ["generate", "--model", str(sensor_run["model"]), "--prompt", "which way?"]
    argv += ["--temperature", "0", "--max-new-tokens", "8"]
    assert main([*argv, "--input", f"sensor={sensor_run['up']}"]) == 0
    assert capsys.readouterr().out.strip() == "rising"
    assert main([*argv, "--input", str(sensor_run["down"])]) == 0  # the suffix names it
    assert capsys.readouterr().out.strip() == "falling"

    assert main([*argv, "--input", f"smell={sensor_run['up']}"]) == 2
    assert "no loader reads 'smell' files" in capsys.readouterr().err
    assert main([*argv, "--image", str(sensor_run["up"])]) == 2  # the model reads no images
    assert "no encoder for image inputs (it reads sensor)" in capsys.readouterr().err


def test_eval_and_the_demo_take_the_modality(sensor_run, tmp_path: Path) -> None:
    from demos.common import DemoModel, ModalityItem, Settings, UserInputError, user_message
    from mmgpt.eval.run import run_eval

    data = sensor_run["dir"] / "held_out.json"
    held_out = [("up.sensor", "rising"), ("down.sensor", "falling")]
    data.write_text(
        json.dumps([{"sensor": f, "conversations": convo("which way?", a)} for f, a in held_out])
    )
    metrics = run_eval(sensor_run["model"], data, "vqa", max_new_tokens=8)
    assert metrics["num_samples"] == 2 and metrics["exact_match"] == 1.0, metrics

    demo = DemoModel.load(sensor_run["model"])
    assert demo.input_modalities == ["sensor"] and demo.file_types == [".sensor"]
    message = user_message("which way?", [str(sensor_run["down"])])
    assert message.text == "<sensor>\nwhich way?"
    turns, items = demo.fit([message], 8)
    assert isinstance(items[0], ModalityItem) and items[0].modality == "sensor"
    settings = Settings.from_values(temperature=0, max_new_tokens=8)
    assert "".join(demo.stream_reply(turns, items, settings, 0)).strip() == "falling"
    png = tmp_path / "a.png"
    png.write_bytes(b"")
    with pytest.raises(UserInputError, match=r"'a\.png' is not a file this model reads \(sensor\)"):
        demo.fit([user_message("which way?", [str(png)])], 4)
    with pytest.raises(UserInputError, match="mentions <sensor> 2 time"):
        user_message("<sensor><sensor>", [str(sensor_run["up"])])
