"""Per-part learning rates: ``TrainConfig.lr_multipliers`` and ``warmup_steps_by_part``.

A small module with the attribute names of a MultimodalGPT's parts (``encoders``,
``projectors``, ``gpt``) stands in for one: the trainer finds the parts by parameter names.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmgpt.config import GPTConfig
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.model import GPT
from mmgpt.multimodal import PARTS
from mmgpt.trainer import LR_PARTS, TrainConfig, Trainer, learning_rate, parameter_part


class Parts(nn.Module):
    """encoder → projector → "gpt" (with dropout, so the RNG state matters on resume)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoders = nn.ModuleDict({"image": nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12))})
        self.projectors = nn.ModuleDict({"image": nn.Linear(12, 12)})
        self.gpt = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt(self.projectors["image"](self.encoders["image"](x)))


class Points(Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class Classify:
    def __init__(self, crash_at: int | None = None) -> None:
        self.calls, self.crash_at = 0, crash_at

    def __call__(self, model, batch) -> ObjectiveOutput:
        if model.training:
            self.calls += 1
            if self.calls == self.crash_at:
                raise KeyboardInterrupt("simulated crash")
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        return ObjectiveOutput(loss, {"loss": float(loss.detach())}, weight=float(len(batch["y"])))


def save_weights(model: nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "weights.pt")


def make(model: nn.Module, cfg: TrainConfig, out: Path, objective=None) -> Trainer:
    objective = Classify() if objective is None else objective
    return Trainer(model, objective, Points(), cfg, out_dir=out, save_model_fn=save_weights)


def config(**overrides) -> TrainConfig:
    base = dict(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=10, batch_size=4,
                weight_decay=0.1, eval_every=0, save_every=0, log_every=1, progress=False,
                tensorboard=False, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def cosine(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """The schedule written out: linear warmup, then cosine from lr to min_lr."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / (max_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr_multipliers", {"encodr": 0.1}, r"unknown part 'encodr' \(did you mean 'encoder'\?\); "
         r"valid parts: encoder, projector, gpt, image_decoder, output_projector"),
        ("lr_multipliers", {"vision": 0.1}, r"unknown part 'vision'; valid parts: encoder, "),
        ("lr_multipliers", {"encoder": 0}, r"encoder: expected a positive number"),
        ("lr_multipliers", {"encoder": "0.1"}, r"encoder: expected a positive number"),
        ("lr_multipliers", {"encoder": math.inf}, r"encoder: expected a positive number"),
        ("lr_multipliers", [0.1], r"expected a mapping of part to value"),
        ("warmup_steps_by_part", {"gpt": -1}, r"gpt: expected an integer >= 0"),
        ("warmup_steps_by_part", {"gpt": 2.5}, r"gpt: expected an integer >= 0"),
        ("warmup_steps_by_part", {"text": 3}, r"unknown part 'text'"),
    ],
)  # fmt: skip
def test_bad_parts_and_values_name_the_field(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: {match}"):
        TrainConfig(**{field: value})


def test_config_round_trips_and_accepts_recipe_values() -> None:
    cfg = TrainConfig.from_dict(
        {"lr_multipliers": {"encoder": 0.1, "gpt": 2}, "warmup_steps_by_part": None}
    )
    assert cfg.lr_multipliers == {"encoder": 0.1, "gpt": 2}
    assert cfg.warmup_steps_by_part == {}
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_the_parts_are_the_multimodal_models_attributes() -> None:
    assert set(LR_PARTS.values()) <= set(PARTS.values())
    assert parameter_part("encoders.image.model.blocks.0.attn.qkv.weight") == "encoder"
    assert parameter_part("module.backbone.projectors.image.fc1.weight") == "projector"
    assert parameter_part("gpt.transformer.h.0.attn.c_attn.weight") == "gpt"
    assert parameter_part("image_head.weight") is None
    assert parameter_part("transformer.h.0.attn.c_attn.weight") is None  # a text GPT


# -- parameter groups and the schedule ------------------------------------------------------


def test_multipliers_reach_the_groups_and_scale_the_schedule(tmp_path: Path) -> None:
    cfg = config(
        lr_multipliers={"encoder": 0.1, "projector": 3.0},
        warmup_steps_by_part={"encoder": 5},
    )
    model = Parts()
    trainer = make(model, cfg, tmp_path)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == [
        "decay",
        "no_decay",
        "encoder.decay",
        "encoder.no_decay",
        "projector.decay",
        "projector.no_decay",
    ]
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members["decay"] == {"gpt.2.weight"}
    assert members["no_decay"] == {"gpt.2.bias"}
    assert members["encoder.decay"] == {"encoders.image.0.weight"}
    assert members["encoder.no_decay"] == {
        "encoders.image.0.bias",
        "encoders.image.1.weight",  # a norm's weight: 1-D, no decay
        "encoders.image.1.bias",
    }
    assert members["projector.decay"] == {"projectors.image.weight"}
    assert {k: g["weight_decay"] for k, g in groups.items()} == {
        k: 0.1 if k.endswith(".decay") or k == "decay" else 0.0 for k in groups
    }

    trainer.fit()
    logged = records(tmp_path)
    assert len(logged) == 10
    for step, record in enumerate(logged):  # the record of step k holds the lrs of update k
        base = cosine(step, lr=1e-2, min_lr=1e-3, warmup=2, max_steps=10)
        encoder = 0.1 * cosine(step, lr=1e-2, min_lr=1e-3, warmup=5, max_steps=10)
        assert record["lr"] == pytest.approx(base, rel=1e-12)
        assert record["lr_encoder"] == pytest.approx(encoder, rel=1e-12)
        assert record["lr_projector"] == pytest.approx(3.0 * base, rel=1e-12)
        assert "lr_gpt" not in record
        for part, lr in (("encoder", encoder), (None, base), ("projector", 3 * base)):
            assert learning_rate(step, cfg, part) == pytest.approx(lr, rel=1e-12)
    assert logged[0]["lr_encoder"] == pytest.approx(0.1 * 1e-2 / 6)  # its own warmup
    assert logged[5]["lr_encoder"] == pytest.approx(0.1 * 1e-2)  # its peak, three steps later
    # the optimizer holds the next update's lrs
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["encoder.decay"] == lrs["encoder.no_decay"] == pytest.approx(0.1 * 1e-3)
    assert lrs["decay"] == pytest.approx(1e-3)


def test_a_multiplier_scales_the_parts_update_and_nothing_else(tmp_path: Path) -> None:
    """One AdamW step: the update (gradient step and decoupled decay) is proportional to the
    lr, so the encoder moves exactly half as far with a multiplier of 0.5."""

    def one_step(out: Path, **overrides) -> dict[str, torch.Tensor]:
        model = Parts()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        make(model, config(max_steps=1, **overrides), out).fit()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    plain = one_step(tmp_path / "plain")
    half = one_step(tmp_path / "half", lr_multipliers={"encoder": 0.5})
    for name, delta in half.items():
        if name.startswith("encoders."):
            assert delta.abs().sum() > 0
            # float32 rounding of the parameters (~1e-8) against updates of ~2e-3
            torch.testing.assert_close(delta, 0.5 * plain[name], rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(delta, plain[name]), name


def test_text_models_keep_their_groups_and_reject_parts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8))
    trainer = Trainer(gpt, Classify(), Points(), config(), out_dir=tmp_path / "a")
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["decay", "no_decay"]
    assert trainer.group_lrs() == {}
    with pytest.raises(
        ValueError,
        match=r"TrainConfig\.lr_multipliers: this model \(GPT\) has no encoder \(parameters "
        r"named encoders\.\*\); its parts: none",
    ):
        Trainer(
            gpt, Classify(), Points(), config(lr_multipliers={"encoder": 0.1}), out_dir=tmp_path
        )


def test_a_frozen_part_may_have_a_multiplier(tmp_path: Path) -> None:
    model = Parts()
    model.encoders.requires_grad_(False)
    cfg = config(lr_multipliers={"encoder": 0.1}, max_steps=2)
    trainer = make(model, cfg, tmp_path)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["decay", "no_decay"]
    trainer.fit()
    assert "lr_encoder" not in records(tmp_path)[-1]


def test_lr_is_the_unscaled_schedule_when_every_part_is_scaled(tmp_path: Path) -> None:
    cfg = config(lr_multipliers={"encoder": 0.5, "projector": 0.5, "gpt": 0.5}, max_steps=4)
    trainer = make(Parts(), cfg, tmp_path)
    assert trainer.optimizer.param_groups[0]["name"] == "encoder.decay"
    trainer.fit()
    for step, record in enumerate(records(tmp_path)):
        base = cosine(step, lr=1e-2, min_lr=1e-3, warmup=2, max_steps=4)
        assert record["lr"] == pytest.approx(base, rel=1e-12)
        assert record["lr_gpt"] == pytest.approx(0.5 * base, rel=1e-12)


# -- exact resume -----------------------------------------------------------------------------


def trainer(out: Path, crash_at: int | None = None, **overrides) -> Trainer:
    cfg = config(
        max_steps=9,
        batch_size=3,
        grad_accum_steps=2,
        save_every=4,
        keep_last=1,
        lr_multipliers={"encoder": 0.1, "gpt": 2.0},
        warmup_steps_by_part={"encoder": 6},
        **overrides,
    )
    return make(Parts(dropout=0.3), cfg, out, Classify(crash_at))


def test_a_resumed_run_with_multipliers_is_bit_identical(tmp_path: Path) -> None:
    ref = trainer(tmp_path / "ref")
    ref.fit()
    crashed = trainer(tmp_path / "run", crash_at=2 * 6 + 1)  # during step 7: resumes from 4
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    saved = json.loads((tmp_path / "run/checkpoints/step_00000004/optimizer.json").read_text())
    assert [g["name"] for g in saved["param_groups"]][2:] == [
        "encoder.decay",
        "encoder.no_decay",
        "gpt.decay",
        "gpt.no_decay",
    ]
    resumed = trainer(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an unchanged config resumes silently
        resumed.fit(resume=True)
    assert resumed.step == 9
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.scheduler.state_dict() == ref.scheduler.state_dict()
    a, b = ref.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(tmp_path / "ref")]
    again = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(tmp_path / "run")]
    assert again == strip


def test_resuming_with_other_parts_is_a_clear_error(tmp_path: Path) -> None:
    trainer(tmp_path / "run").fit()
    cfg = config(max_steps=12, batch_size=3, grad_accum_steps=2, save_every=4,
                 lr_multipliers={"projector": 0.1, "gpt": 2.0},
                 warmup_steps_by_part={"projector": 6})  # fmt: skip
    other = make(Parts(dropout=0.3), cfg, tmp_path / "run")
    with pytest.raises(ValueError, match=r"parameter groups are .*'encoder\.decay'.*this run's "
                       r".*'projector\.decay'.*train\.lr_multipliers"):  # fmt: skip
        other.fit(resume=True)
    # the same parts with another value resume (the schedule follows the new config) and warn
    changed = trainer(tmp_path / "run")
    changed.config.lr_multipliers = {"encoder": 0.2, "gpt": 2.0}
    changed.config.max_steps = 11
    with pytest.warns(RuntimeWarning, match=r"lr_multipliers: .*'encoder': 0\.1.*-> .*0\.2"):
        changed.fit(resume=True)
    last = records(tmp_path / "run")[-1]
    expected = 0.2 * cosine(10, lr=1e-2, min_lr=1e-3, warmup=6, max_steps=11)
    assert last["step"] == 11 and last["lr_encoder"] == pytest.approx(expected, rel=1e-12)
