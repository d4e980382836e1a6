"""Reward-hacking guards of PPO, GRPO and RLOO: the detector, early stopping that keeps the best
policy, the hard KL stop, reward whitening and the format penalty."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mmgpt.rlhf.group_trainer import GroupTrainer, GRPOConfig, RLOOConfig
from mmgpt.rlhf.guards import EarlyStopping, RewardHackingDetector
from mmgpt.rlhf.ppo import PPOConfig
from mmgpt.rlhf.ppo_trainer import PPOTrainer


class ContainsRed(nn.Module):
    """Toy reward model: +1 when the answer contains "red" (a stand-in for a RewardModel)."""

    def score(self, conversations, answers, images=None, **kwargs) -> torch.Tensor:
        return torch.tensor([float("red" in a) for a in answers])

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


class ScriptedScores(ContainsRed):
    def __init__(self, values) -> None:
        super().__init__()
        self.values = values

    def score(self, conversations, answers, images=None, **kwargs) -> torch.Tensor:
        return torch.tensor(self.values[: len(answers)], dtype=torch.float)


class ContainsBlue(ContainsRed):
    def score(self, conversations, answers, images=None, **kwargs) -> torch.Tensor:
        return torch.tensor([float("blue" in a) for a in answers])


def says_red(prompts, answers) -> dict[str, float]:
    """The held-out "quality" of the hacked toy: the true answer is red (the starting
    policy's greedy answer)."""
    return {"exact_match": sum(a == "red" for a in answers) / len(answers)}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ppo_settings(**overrides):
    settings = dict(
        max_new_tokens=4,
        ppo_epochs=2,
        minibatch_size=8,
        init_kl_coef=0.02,
        target_kl=None,
        normalize_reward=False,
    )
    return {**settings, **overrides}


# -- the detector and early stopping, on scripted evaluations ------------------------------
def test_detector_flags_reward_up_while_quality_falls() -> None:
    detector = RewardHackingDetector(quality_drop=0.02, ref_logp_drop=0.5)
    assert detector.update(0, reward=0.0, quality=0.30, ref_logp=-1.0) == []
    assert detector.update(10, reward=1.0, quality=0.50, ref_logp=-1.1) == []  # real progress
    assert detector.update(20, reward=1.5, quality=0.49, ref_logp=-1.2) == []  # within tolerance
    reasons = detector.update(30, reward=2.0, quality=0.40, ref_logp=-1.3)
    assert len(reasons) == 1 and "quality 0.500 -> 0.400" in reasons[0] and "step 10" in reasons[0]
    # quality down but the reward down too: the policy got worse, it is not gaming the reward
    assert detector.update(40, reward=0.5, quality=0.40, ref_logp=-1.3) == []
    assert detector.warnings == 1


def test_detector_flags_reward_up_while_the_reference_finds_answers_implausible() -> None:
    detector = RewardHackingDetector(quality_drop=0.02, ref_logp_drop=0.5)
    detector.update(0, reward=0.0, ref_logp=-1.0)  # no quality metric: the first evaluation
    assert detector.update(1, reward=0.5, ref_logp=-1.4) == []
    reasons = detector.update(2, reward=0.7, ref_logp=-1.6)
    assert len(reasons) == 1 and "log-likelihood -1.00 -> -1.60" in reasons[0]
    again = RewardHackingDetector()
    again.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert again.update(3, reward=0.7, ref_logp=-1.6) == reasons  # same reference point


def test_early_stopping_tracks_the_best_and_its_patience() -> None:
    stopper = EarlyStopping("exact_match", patience=2)
    assert stopper.update(0, {"exact_match": 0.2})
    assert stopper.update(5, {"exact_match": 0.4})
    assert not stopper.update(10, {"exact_match": 0.4})  # equal is no improvement
    assert not stopper.should_stop
    assert not stopper.update(15, {"exact_match": 0.3})
    assert stopper.should_stop and (stopper.best, stopper.best_step) == (0.4, 5)
    with pytest.raises(ValueError, match="'accuracy' is not among the evaluation's metrics"):
        EarlyStopping("accuracy").update(0, {"exact_match": 0.1, "reward": 0.0})


@pytest.mark.parametrize(
    ("config", "settings", "message"),
    [
        (PPOConfig, {"kl_stop": 0}, r"PPOConfig.kl_stop: expected a number > 0"),
        (PPOConfig, {"early_stop_patience": -1}, r"early_stop_patience: expected an integer"),
        (PPOConfig, {"early_stop_metric": ""}, r"early_stop_metric: expected the name"),
        (PPOConfig, {"whiten_rewards": "yes"}, r"PPOConfig.whiten_rewards: expected true or"),
        (GRPOConfig, {"format_penalty": -1.0}, r"GRPOConfig.format_penalty: expected a number"),
        (RLOOConfig, {"restore_best": 1}, r"RLOOConfig.restore_best: expected true or false"),
    ],
)
def test_guard_settings_are_validated(config, settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        config(**settings)


# -- in a PPO run ------------------------------------------------------------------------
def test_ppo_warns_of_hacking_and_keeps_the_best_policy(red_or_blue_policy, rl, tmp_path) -> None:
    """The reward model likes "blue", the held-out truth is "red": PPO raises the reward and
    exact match falls. The detector must say so in metrics.jsonl and the progress bar, early
    stopping must end the run, and the saved policy must be the starting one (the best)."""
    torch.manual_seed(0)
    policy = copy.deepcopy(red_or_blue_policy)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = PPOTrainer(
        policy,
        ContainsBlue(),
        rl.colour_prompts(64, seed=4),
        rl.quiet(max_steps=12, batch_size=16, lr=1e-3, eval_every=2, eval_batches=2),
        ppo_settings(early_stop_metric="exact_match", early_stop_patience=3),
        eval_prompts=rl.colour_prompts(32, seed=5),
        out_dir=tmp_path,
        eval_fn=says_red,
    )
    result = trainer.fit()
    log = records(trainer.metrics_path)
    evals = [r for r in log if r["split"] == "eval" and "reward" in r]
    assert evals[0]["step"] == 0  # the starting policy, evaluated before the first rollout
    assert evals[-1]["reward"] > evals[0]["reward"]  # the toy reward was climbed...
    assert evals[-1]["exact_match"] < evals[0]["exact_match"]  # ...while quality fell
    flagged = [r for r in evals if r["hacking_warning"] == 1.0]
    assert flagged and "quality" in flagged[0]["hacking_reasons"]
    assert all("hacking_warning" in r for r in evals)
    assert "reward hacking?" in trainer._bar.desc
    # early stopping: three evaluations without beating the start end the run
    assert result["step"] == 6 < 12 and "has not improved" in trainer.stopped_early
    assert log[-1]["restored_best_step"] == 0
    saved = type(policy).from_pretrained(tmp_path / "model")
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(value, start[key], msg=key)


def test_ppo_hard_kl_stop_ends_the_run_without_training_on_the_rollout(
    red_or_blue_policy, rl, tmp_path
) -> None:
    torch.manual_seed(0)
    policy = copy.deepcopy(red_or_blue_policy)
    trainer = PPOTrainer(
        policy,
        ContainsRed(),
        rl.colour_prompts(64, seed=4),
        rl.quiet(max_steps=10, batch_size=16, lr=3e-3),
        ppo_settings(kl_stop=1e-3),
        out_dir=tmp_path,
    )
    steps_taken = []
    original = trainer.update_on

    def counting_update_on(*args, **kwargs):
        steps_taken.append(trainer.step)
        return original(*args, **kwargs)

    trainer.update_on = counting_update_on
    result = trainer.fit()
    train = [r for r in records(trainer.metrics_path) if r["split"] == "train"]
    # rollout 1 is the reference itself (KL 0): trained on; rollout 2 has drifted: stop
    assert train[0]["kl_stop"] == 0.0 and train[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert train[-1]["kl_stop"] == 1.0 and train[-1]["kl"] > 1e-3
    assert result["step"] == len(train) == 2 and steps_taken == [0]
    assert "policy_loss" not in train[-1]
    assert "kl_stop" in trainer.stopped_early


def test_grpo_shares_the_kl_stop(red_or_blue_policy, rl, tmp_path) -> None:
    torch.manual_seed(0)
    trainer = GroupTrainer(
        copy.deepcopy(red_or_blue_policy),
        ContainsRed(),
        rl.colour_prompts(64, seed=4),
        rl.quiet(max_steps=10, batch_size=8, lr=3e-3),
        GRPOConfig(max_new_tokens=4, minibatch_size=16, normalize_reward=False, kl_stop=1e-3),
        out_dir=tmp_path,
    )
    assert trainer.fit()["step"] == 2


def test_whitened_clipped_and_format_penalised_scores(red_or_blue_policy, rl, tmp_path) -> None:
    values = [0.0, 1.0, 2.0, 3.0, 10.0, -4.0]
    prompts = rl.colour_prompts(6, seed=1)
    answers = ["red", "blue", "red", "bleu", "red", "red red"]
    ended = [True, True, True, True, True, False]

    def trainer(**settings):
        return PPOTrainer(
            copy.deepcopy(red_or_blue_policy),
            ScriptedScores(values),
            prompts,
            rl.quiet(max_steps=1, batch_size=6, lr=1e-3),
            ppo_settings(**settings),
            out_dir=tmp_path / str(len(settings)),
            format_fn=lambda prompt, answer: answer in ("red", "blue"),
        )

    raw, shaped, stats = trainer(whiten_rewards=True).shaped_scores(prompts, answers, ended)
    torch.testing.assert_close(raw, torch.tensor(values))
    assert float(shaped.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(shaped.std()) == pytest.approx(1.0, abs=1e-4)
    settings = dict(reward_clip=2.5, format_penalty=0.5, missing_eos_penalty=1.0)
    _, shaped, stats = trainer(**settings).shaped_scores(prompts, answers, ended)
    # clip to ±2.5, then −0.5 for "bleu" and "red red" (off format), −1 for the unfinished one
    expected = torch.tensor([0.0, 1.0, 2.0, 2.5 - 0.5, 2.5, -2.5 - 0.5 - 1.0])
    torch.testing.assert_close(shaped, expected)
    assert stats["format_violations"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="format_penalty is set but the trainer has no format_fn"):
        PPOTrainer(
            copy.deepcopy(red_or_blue_policy),
            ContainsRed(),
            prompts,
            rl.quiet(max_steps=1, batch_size=6, lr=1e-3),
            ppo_settings(format_penalty=1.0),
            out_dir=tmp_path / "no_fn",
        )
