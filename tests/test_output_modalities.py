"""An output modality added by a plugin, end to end: its decoder (registry kind ``decoder``)
gets its own signal tokens in the tokenizer and its own output projector; recipes take
``model.decoders``; LLaVA records whose assistant turn holds the modality's placeholder train
it; generation streams its items between text; ``mmgpt generate --out-dir`` writes them with
the loader's ``save``; the model directory round-trips with a second (image) decoder beside it.

The modality is ``"sensor"``: 6 readings, written to a ``.sensor`` text file. The decoder is an
MLP regressing the readings from its condition (MSE). Both are written here as a third-party
plugin would write them, against the documented contract only (docs/plugins.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmgpt import registry
from mmgpt.data.sample import Sample, Turn
from mmgpt.generation import GenerationConfig, StepState
from mmgpt.imagegen import ImageGenerationConfig, OutputEvent, TextEvent
from mmgpt.interfaces import OutputDecoder
from mmgpt.multimodal import MultimodalGPT
from mmgpt.processor import IGNORE_INDEX

mmgpt_text = pytest.importorskip("mmgpt_text")

READINGS = 6
K = 2  # the sensor decoder's signal tokens
CORPUS = "User: draw rising\nAssistant: here\nUser: draw falling\nAssistant: here\n" * 30
HIGH, LOW = [0.8] * READINGS, [-0.8] * READINGS


class SensorDecoder(nn.Module):
    """condition (M, 2, 8) → 6 readings; loss: MSE against the target readings."""

    modality = "sensor"
    signal_prefix = "SEN"
    num_signal_tokens = K

    def __init__(self, condition_dim: int = 8, num_condition_tokens: int = 2) -> None:
        super().__init__()
        self.condition_dim, self.num_condition_tokens = condition_dim, num_condition_tokens
        self.mlp = nn.Sequential(
            nn.Linear(condition_dim * num_condition_tokens, 32), nn.GELU(), nn.Linear(32, READINGS)
        )

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in items])  # (M, 6)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.mlp(condition.flatten(1))  # (M, 6)

    def training_loss(self, condition: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(condition), targets)

    def generate(self, condition: torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
        return list(self(condition).detach().cpu())  # deterministic: the seed is not needed

    def config_dict(self) -> dict[str, Any]:
        return {
            "condition_dim": self.condition_dim,
            "num_condition_tokens": self.num_condition_tokens,
        }


class SensorLoader:
    modality = "sensor"
    extensions = (".sensor",)

    def load(self, path: Path) -> torch.Tensor:
        values = [float(v) for v in path.read_text().split(",")]
        if len(values) != READINGS:
            raise ValueError(f"expected {READINGS} readings, got {len(values)}")
        return torch.tensor(values)

    def save(self, item: Any, path: Path) -> Path:
        path = Path(path).with_suffix(".sensor")
        path.write_text(",".join(repr(float(v)) for v in item))
        return path


@pytest.fixture(scope="module")
def sensor():
    registry.register("decoder", "test-sensor-out", SensorDecoder)
    registry.register("loader", "sensor", SensorLoader)
    yield
    registry.REGISTRY.unregister("decoder", "test-sensor-out")
    registry.REGISTRY.unregister("loader", "sensor")


def write_sensor(path: Path, values: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(str(v) for v in values))
    return path


def train_tokenizer(tmp_path: Path) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    return mmgpt_text.TextTokenizer.train([corpus], vocab_size=280, num_signal_tokens=4)


def build(tok: Any, *, image: bool = False) -> MultimodalGPT:
    decoders: dict[str, Any] = {"sensor": ("test-sensor-out", {})}
    if image:
        pytest.importorskip("diffusers")
        decoders["image"] = (
            "diffusion",
            {"condition_dim": 16, "num_condition_tokens": 2, "image_size": 16},
        )
    torch.manual_seed(0)
    return MultimodalGPT.build(
        "gpt-nano",
        tok,
        encoder=None,
        n_layer=1,
        block_size=48,
        decoders=decoders,
        output_projectors={"image": ("signal_mlp", {})} if image else None,
    ).eval()


class Script:
    """Token hook forcing a fixed start of the reply, then letting the model choose."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def __call__(self, state: StepState) -> dict[int, int] | None:
        if state.step < len(self.tokens):
            return {0: self.tokens[state.step]}
        return None


PROMPT = [{"role": "user", "text": "draw rising"}]


# -- tokens, processor, directory --------------------------------------------------------------
def test_a_decoder_gets_its_own_signal_tokens_and_round_trips(sensor, tmp_path: Path) -> None:
    tok = train_tokenizer(tmp_path)
    before = tok.vocab_size
    model = build(tok, image=True)
    ids = model.output_signal_token_ids("sensor")
    assert [tok.id_to_token(i) for i in ids] == ["[SEN0]", "[SEN1]"]
    assert ids == [before, before + 1] and tok.vocab_size == before + K
    assert model.config.vocab_size >= tok.vocab_size
    assert model.output_signal_token_ids("image") == tok.signal_token_ids  # [IMG0].. kept
    assert not set(ids) & set(tok.signal_token_ids)
    assert tok.encode("x[SEN0][SEN1]")[-2:] == ids  # the literal text is the one token
    assert tok.decode([*tok.encode("hi"), *ids], skip_special_tokens=True) == "hi"
    assert isinstance(model.decoders["sensor"], OutputDecoder)
    assert list(model.output_modalities()) == ["image", "sensor"]

    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["decoders"]["sensor"]["name"] == "test-sensor-out"
    assert config["output_projectors"]["sensor"]["name"] == "signal_mlp"
    assert config["image_decoder"]["name"] == "diffusion"  # the image keeps its own keys
    loaded = MultimodalGPT.from_pretrained(tmp_path / "m")
    assert loaded.output_signal_token_ids("sensor") == ids
    assert list(loaded.output_modalities()) == ["image", "sensor"]
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)

    # identical outputs: the same forced reply ([SEN0] first) gives the same readings and image
    config_gen = GenerationConfig(max_new_tokens=6, temperature=0)
    image_config = ImageGenerationConfig(steps=2, seed=3)
    hook = [tok.encode(" ")[0], ids[0]]
    replies = [
        m.generate_multimodal(PROMPT, [], config_gen, image_config, token_hook=Script(hook))
        for m in (model, loaded)
    ]
    outs = [r.outputs for r in replies]
    assert len(outs[0]) == 1 and outs[0][0].modality == "sensor"
    assert torch.equal(outs[0][0].item, outs[1][0].item)
    assert replies[0].text == replies[1].text


def test_a_frozen_encoder_run_still_trains_every_output_decoder(sensor, tmp_path: Path) -> None:
    from mmgpt.recipe.build import trainable_parts

    model = build(train_tokenizer(tmp_path))
    model.trainable(trainable_parts("full", False))  # train.train_encoder=false
    assert all(p.requires_grad for p in model.decoders["sensor"].parameters())
    assert all(p.requires_grad for p in model.output_projectors["sensor"].parameters())


def test_a_model_without_the_tokens_is_refused(sensor, tmp_path: Path) -> None:
    tok = train_tokenizer(tmp_path)
    model = build(tok)
    plain = train_tokenizer(tmp_path / "other")  # no [SEN0]..
    with pytest.raises(ValueError, match="no signal tokens for output modality 'sensor'"):
        MultimodalGPT(
            model.gpt,
            plain,
            decoders={"sensor": model.decoders["sensor"]},
            output_projectors={"sensor": model.output_projectors["sensor"]},
        )
    with pytest.raises(ValueError, match="needs an output projector"):
        MultimodalGPT(model.gpt, tok, decoders={"sensor": model.decoders["sensor"]})
    with pytest.raises(ValueError, match="keyed|key decoders by their modality"):
        MultimodalGPT.build(
            "gpt-nano", tok, encoder=None, decoders={"audio": ("test-sensor-out", {})}
        )


def test_the_processor_expands_output_placeholders_with_targets(sensor, tmp_path: Path) -> None:
    tok = train_tokenizer(tmp_path)
    model = build(tok)
    ids = model.output_signal_token_ids("sensor")
    sample = Sample(
        [Turn("user", "draw rising"), Turn("assistant", "ok <sensor_out> done")],
        outputs={"sensor": [torch.tensor(HIGH)]},
    )
    batch = model.processor()([sample, sample])
    pos = batch.output_positions["sensor"]
    assert pos.shape == (2, 2) and pos[:, 0].tolist() == [0, 1]
    row, col = pos[0].tolist()
    assert batch.input_ids[row, col : col + K].tolist() == ids
    assert batch.labels[row, col : col + K].tolist() == ids  # learned: when to produce it
    assert torch.equal(batch.outputs["sensor"], torch.tensor([HIGH, HIGH]))
    assert batch.signal_positions.numel() == 0

    user_side = Sample([Turn("user", "<sensor_out>"), Turn("assistant", "no")])
    b = model.processor()([user_side])
    col = int(b.output_positions["sensor"][0, 1])
    assert (b.labels[0, col : col + K] == IGNORE_INDEX).all()
    two = Sample(
        [Turn("user", "x"), Turn("assistant", "<sensor_out>")],
        outputs={"sensor": [torch.tensor(HIGH)] * 2},
    )
    with pytest.raises(ValueError, match=r"1 '<sensor_out>' placeholder\(s\) but 2 sensor"):
        model.processor()([two])
    smell = Sample([Turn("user", "x"), Turn("assistant", "y")], outputs={"smell": [1]})
    with pytest.raises(ValueError, match=r"\['smell'\] outputs but the model has no decoder"):
        model.processor()([smell])


def test_an_output_placeholder_in_a_user_turn_is_refused(sensor, tmp_path: Path) -> None:
    from mmgpt.data.llava import read_llava

    write_sensor(tmp_path / "a.sensor", HIGH)
    turns = [{"from": "human", "value": "<sensor_out>"}, {"from": "gpt", "value": "<sensor>"}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "bad", "sensor": "a.sensor", "conversations": turns}]))
    records, problems = read_llava(path)
    assert records == [] and [p.reason for p in problems] == ["bad_value"]
    assert "'human' turn with '<sensor_out>'" in problems[0].message


# -- training by recipe, generation, the CLI --------------------------------------------------
@pytest.fixture(scope="module")
def sensor_run(sensor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``model.decoders: {sensor: ...}`` trained on LLaVA records whose assistant turn holds
    ``<sensor>`` (the file to produce): "draw rising" → HIGH readings, "draw falling" → LOW."""
    from mmgpt.recipe.run import run_training

    tmp_path = tmp_path_factory.mktemp("sensor-out")
    records = []
    for i in range(16):
        rising = i % 2 == 0
        name = f"out/{i}.sensor"
        write_sensor(tmp_path / name, HIGH if rising else LOW)
        ask = "draw rising" if rising else "draw falling"
        turns = [{"from": "human", "value": ask}, {"from": "gpt", "value": "<sensor>"}]
        records.append({"sensor": name, "conversations": turns})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    recipe = {
        "model": {
            "architecture": "multimodal",
            "preset": "gpt-nano",
            "n_layer": 1,
            "block_size": 32,
            "decoders": {"sensor": {"type": "test-sensor-out"}},
        },
        "tokenizer": {"name": "bpe", "vocab_size": 280},
        "data": {"name": "llava", "path": str(data), "eval_fraction": 0},
        "objective": {"name": "diffusion"},
        "train": {
            "lr": 3e-3,
            "warmup_steps": 2,
            "max_steps": 40,
            "batch_size": 8,
            "eval_every": 0,
            "save_every": 0,
            "log_every": 1,
            "seed": 0,
            "progress": False,
            "tensorboard": False,
        },
    }
    run_training(recipe, out=tmp_path / "run")
    return {"dir": tmp_path, "model": tmp_path / "run" / "model", "data": data}


def _logged(run_dir: Path, key: str) -> list[float]:
    rows = []
    for path in run_dir.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if key in row:
                rows.append(float(row[key]))
    return rows


def test_llava_records_with_an_output_file_give_outputs(sensor, sensor_run) -> None:
    from mmgpt.data.llava import LlavaDataset

    dataset = LlavaDataset(sensor_run["data"])
    sample = dataset[0]
    assert sample.conversation[1].text == "<sensor_out>"
    assert sample.inputs == {} and torch.equal(sample.outputs["sensor"][0], torch.tensor(HIGH))


def test_a_recipe_with_model_decoders_trains_the_decoder(sensor_run) -> None:
    losses = _logged(sensor_run["dir"] / "run", "sensor_loss")
    assert len(losses) >= 20, losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, losses

    model = MultimodalGPT.from_pretrained(sensor_run["model"])
    ids = model.output_signal_token_ids("sensor")
    config = GenerationConfig(max_new_tokens=6, temperature=0)
    for ask, sign in (("draw rising", 1), ("draw falling", -1)):
        events = list(model.stream([{"role": "user", "text": ask}], [], config))
        outputs = [e for e in events if isinstance(e, OutputEvent)]
        assert len(outputs) == 1, events  # the model chose to write [SEN0] and it was decoded
        assert all(not isinstance(e, TextEvent) or "[SEN" not in e.text for e in events)
        item = outputs[0].item
        assert item.shape == (READINGS,) and bool((item * sign > 0.3).all()), (ask, item)
    assert len(ids) == K


def test_generate_out_dir_writes_outputs_with_the_loader(
    sensor_run, tmp_path: Path, capsys
) -> None:
    from mmgpt.cli import main

    out = tmp_path / "drawings"
    argv = ["generate", "--model", str(sensor_run["model"]), "--prompt", "draw falling"]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "6", "--out-dir", str(out)]) == 0
    written = out / "sensor_0.sensor"
    assert str(written) in capsys.readouterr().out
    values = SensorLoader().load(written)
    assert values.shape == (READINGS,) and bool((values < -0.3).all()), values


def test_the_chat_demo_shows_other_outputs_as_files(sensor_run, tmp_path: Path) -> None:
    from demos.chat import to_messages
    from demos.common import DemoModel, ImageFolder, Settings, user_message

    demo = DemoModel.load(sensor_run["model"])
    assert demo.output_modalities == ["sensor"] and not demo.can_draw
    turns, items = demo.fit([user_message("draw rising")], 6)
    settings = Settings.from_values(temperature=0, max_new_tokens=6)
    events = list(demo.stream_reply(turns, items, settings, 0))
    outputs = [e for e in events if isinstance(e, OutputEvent)]
    assert len(outputs) == 1 and bool((outputs[0].item > 0.3).all())

    folder = ImageFolder(tmp_path / "shown")
    path = Path(folder.save(outputs[0]))
    assert path.suffix == ".sensor" and torch.allclose(SensorLoader().load(path), outputs[0].item)
    history = [
        {"role": "user", "content": "draw rising"},
        {"role": "assistant", "content": [{"path": str(path)}]},
    ]
    assert to_messages(history)[-1].text == "<sensor_out>"  # read back as the model's output
    text, drawn = demo.reply(turns, items, settings, 0)
    assert text.endswith("<sensor_out>") and drawn == []
    folder.close()
