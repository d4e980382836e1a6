"""The reward, dpo and ppo recipes through `mmgpt train` (--model, --reward-model, --data)."""

from __future__ import annotations

import json

import torch

from mmgpt import cli
from mmgpt.files import load_tensors
from mmgpt.rlhf.reward_model import RewardModel
from mmgpt.rlhf.shapes import write_shapes_preferences

QUICK = ["train.progress=false", "train.tensorboard=false", "train.warmup_steps=0"]


def train(*argv: str) -> None:
    assert cli.main(["train", *argv, *QUICK]) == 0


def test_reward_then_ppo_and_dpo_from_the_command_line(tok, rl, tmp_path, capsys) -> None:
    sft = tmp_path / "sft"
    rl.build(tok, block_size=128).save_pretrained(sft)
    prefs = write_shapes_preferences(tmp_path / "prefs", 24, seed=0, image_size=32, max_shapes=1)

    train(
        "reward",
        "--model",
        str(sft),
        "--data",
        str(prefs),
        "--out",
        str(tmp_path / "rm"),
        "train.max_steps=2",
        "train.batch_size=4",
        "data.eval_fraction=0.25",
    )
    reward_model = RewardModel.from_pretrained(tmp_path / "rm" / "model")
    assert reward_model.normalization["count"] > 0  # statistics of the training answers

    def against_the_reward_model(run: str) -> list[str]:
        """The command-line arguments of an RL run from the SFT model into tmp_path/run."""
        return [
            *("--model", str(sft), "--reward-model", str(tmp_path / "rm" / "model")),
            *("--data", str(prefs), "--out", str(tmp_path / run)),
        ]

    train(
        "ppo",
        *against_the_reward_model("ppo"),
        "train.max_steps=1",
        "train.batch_size=4",
        "objective.minibatch_size=2",
        "objective.max_new_tokens=4",
        "objective.ppo_epochs=1",
    )
    record = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward", "kl", "beta", "entropy", "clip_fraction", "value_loss"} <= set(record)
    assert (tmp_path / "ppo" / "model" / "value_head.safetensors").is_file()

    train(
        "dpo",
        "--model",
        str(sft),
        "--data",
        str(prefs),
        "--out",
        str(tmp_path / "dpo"),
        "train.max_steps=2",
        "train.batch_size=4",
        "objective.loss_type=ipo",
    )
    assert (tmp_path / "dpo" / "reference_logps.safetensors").is_file()
    assert (tmp_path / "dpo" / "model" / "model.safetensors").is_file()
    train(
        "grpo",
        *against_the_reward_model("grpo"),
        "train.max_steps=1",
        "train.batch_size=2",
        "objective.minibatch_size=4",
        "objective.max_new_tokens=4",
        "objective.epochs=1",
    )
    # GRPO leaves the image encoder as the SFT model had it (train_encoder: false in the
    # grpo and rloo recipes: their sequence-level advantage wrecked its features); PPO and
    # DPO train it
    start = load_tensors(sft / "model.safetensors")
    encoder = [k for k in start if k.startswith("encoders.")]
    runs = {
        r: load_tensors(tmp_path / r / "model" / "model.safetensors")
        for r in ("grpo", "ppo", "dpo")
    }
    assert encoder and all(torch.equal(runs["grpo"][k], start[k]) for k in encoder)
    for name in ("ppo", "dpo"):
        assert any(not torch.equal(runs[name][k], start[k]) for k in encoder), name
    for name, tuned in runs.items():
        assert any(not torch.equal(tuned[k], start[k]) for k in start if k.startswith("gpt.")), name
    capsys.readouterr()

    # a recipe other than ppo has no reward model to take
    code = cli.main(
        [
            "train",
            "dpo",
            "--model",
            str(sft),
            "--reward-model",
            "x",
            "--data",
            str(prefs),
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert code == 2
    assert "reward_model" in capsys.readouterr().err
