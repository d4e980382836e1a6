"""GRPO and RLOO: group-relative advantages and losses by hand, and toy-reward runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mmgpt.checkpoint import checkpoint_name
from mmgpt.registry import create
from mmgpt.rlhf.group import (
    as_groups,
    grpo_advantages,
    grpo_loss,
    k3_kl,
    rloo_advantages,
    rloo_loss,
)
from mmgpt.rlhf.group_trainer import GroupTrainer, GRPOConfig, RLOOConfig
from mmgpt.rlhf.losses import masked_mean
from mmgpt.rlhf.rollout import response_forward


class ContainsRed(torch.nn.Module):
    """Toy reward: +1 when the answer contains "red", else 0 (stands in for a RewardModel)."""

    def score(self, conversations, answers, images=None, **kwargs) -> torch.Tensor:
        return torch.tensor([float("red" in a) for a in answers])

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


REWARDS = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])  # two groups of 4


def test_grpo_advantages_by_hand() -> None:
    # group 1: mean 3, deviations -2 -1 0 3, sample variance (4 + 1 + 0 + 9) / 3
    std = math.sqrt(14 / 3)
    expected = torch.tensor([[-2.0, -1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]) / (std + 1e-4)
    expected[1] = 0.0  # equal rewards: no preference inside the group
    torch.testing.assert_close(grpo_advantages(REWARDS, eps=1e-4), expected)


def test_grpo_advantages_batch_and_no_scaling_keep_a_small_spread_small() -> None:
    # an "all equally wrong" group whose rewards differ only by noise, beside a decided one
    rewards = torch.tensor([[-5.0, -5.01, -4.99, -5.0], [0.0, 0.0, -5.0, -5.0]])
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    by_group = grpo_advantages(rewards, eps=1e-4)
    assert by_group[0].abs().max() > 1.0  # the group std turns 0.01 of noise into ±1.2
    whole = rewards.flatten().std()  # population of all 8 rewards, Bessel-corrected
    torch.testing.assert_close(
        grpo_advantages(rewards, eps=1e-4, scale="batch"), centred / (whole + 1e-4)
    )
    assert grpo_advantages(rewards, scale="batch")[0].abs().max() < 0.01
    torch.testing.assert_close(grpo_advantages(rewards, scale="none"), centred)
    with pytest.raises(ValueError, match="scale: expected one of group, batch, none"):
        grpo_advantages(rewards, scale="rollout")
    with pytest.raises(ValueError, match="GRPOConfig.scale_rewards: expected one of"):
        GRPOConfig(scale_rewards="std")


def test_rloo_advantages_by_hand() -> None:
    # r_i minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
    expected = torch.tensor([[-8 / 3, -4 / 3, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rloo_advantages(REWARDS), expected)


def test_flat_rewards_group_consecutively() -> None:
    flat = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    torch.testing.assert_close(as_groups(flat, 4), REWARDS)
    with pytest.raises(ValueError, match="multiple of the group size 3"):
        as_groups(flat, 3)


def test_group_size_one_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least 2 answers per prompt"):
        grpo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="at least 2 answers per prompt"):
        rloo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="group_size"):
        as_groups(torch.ones(3), 1)
    for name in ("grpo", "rloo"):
        with pytest.raises(ValueError, match="Config.samples_per_prompt: .* at least 2"):
            create("objective", name, samples_per_prompt=1)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['bta'\] \(did you mean 'beta'"):
        create("objective", "grpo", bta=0.1)
    with pytest.raises(ValueError, match="RLOOConfig.kl_coef"):
        RLOOConfig(kl_coef=-1.0)


# tiny tensors: 2 answers of 3 positions, the second one 2 tokens long
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
OLD = torch.tensor([[-1.1, -0.9, -2.0], [-0.3, -0.8, 0.0]])
REF = torch.tensor([[-1.3, -0.4, -1.0], [-0.2, -1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([0.7, -1.5])


@pytest.mark.parametrize("clip_high", [None, 0.5])  # 0.5: DAPO's clip-higher upper bound
def test_grpo_loss_against_a_hand_written_reference(clip_high) -> None:
    clip, beta = 0.2, 0.1
    high = clip if clip_high is None else clip_high
    logp = LOGP.clone().requires_grad_(True)
    loss, clip_fraction, kl = grpo_loss(logp, OLD, REF, ADV, MASK, clip, beta, clip_high)

    lp, old, ref, adv = LOGP.tolist(), OLD.tolist(), REF.tolist(), ADV.tolist()
    total, clipped_tokens, kls, tokens = 0.0, 0, 0.0, 0
    for i in range(2):
        n = int(MASK[i].sum())
        row, row_kl = 0.0, 0.0
        for t in range(n):
            ratio = math.exp(lp[i][t] - old[i][t])
            a = adv[i]
            clipped = min(max(ratio, 1 - clip), 1 + high)
            surrogate = min(ratio * a, clipped * a)
            k3 = math.exp(ref[i][t] - lp[i][t]) - (ref[i][t] - lp[i][t]) - 1
            row += -surrogate + beta * k3
            row_kl += k3
            clipped_tokens += clipped * a < ratio * a
            tokens += 1
        total += row / n
        kls += row_kl / n
    assert float(loss.detach()) == pytest.approx(total / 2, rel=1e-6)
    assert float(kl) == pytest.approx(kls / 2, rel=1e-6)
    assert float(clip_fraction) == pytest.approx(clipped_tokens / tokens)
    assert 0 < clipped_tokens < tokens  # both branches of the min are exercised
    # the first token's ratio is e^0.4 ≈ 1.49 with a positive advantage: clipped at 1.2 only
    assert (clipped_tokens == 2) == (clip_high is None)
    loss.backward()
    assert logp.grad[1, 2] == 0  # padding gets no gradient
    # k3 is 0 where π = π_ref and positive elsewhere
    assert float(k3_kl(LOGP, LOGP).abs().max()) == 0.0
    assert bool((k3_kl(LOGP, REF) >= 0).all())


def test_rloo_loss_against_a_hand_written_reference() -> None:
    logp = LOGP.clone().requires_grad_(True)
    loss = rloo_loss(logp, ADV, MASK)
    # -(0.7 * (-1 - 0.5 - 2) + (-1.5) * (-0.3 - 1.2)) / 2
    assert float(loss.detach()) == pytest.approx(-(0.7 * -3.5 + -1.5 * -1.5) / 2, rel=1e-6)
    loss.backward()
    expected_grad = torch.tensor([[-0.35, -0.35, -0.35], [0.75, 0.75, 0.0]])
    torch.testing.assert_close(logp.grad, expected_grad)


def settings(name: str, **overrides):
    base = dict(samples_per_prompt=4, max_new_tokens=4, normalize_reward=False)
    if name == "grpo":
        base.update(epochs=2, minibatch_size=8, beta=0.02)
    else:
        base.update(epochs=2, minibatch_size=8, kl_coef=0.02)
    return {**base, **overrides}


def test_rollout_groups_answers_of_one_prompt(red_or_blue_policy, rl, tmp_path) -> None:
    policy = copy.deepcopy(red_or_blue_policy)
    trainer = GroupTrainer(
        policy,
        ContainsRed(),
        rl.colour_prompts(8, seed=4),
        rl.quiet(max_steps=1, batch_size=4, lr=1e-3),
        create("objective", "rloo", **settings("rloo", temperature=0.7)),
        out_dir=tmp_path,
    )
    prompts = [p for p in rl.colour_prompts(3, seed=8) for _ in range(4)]
    torch.manual_seed(1)
    batch, stats = trainer.rollout(prompts)
    assert batch.advantages.shape == (12,)
    # leave-one-out advantages sum to zero within each group (the KL term is 0 at step 0)
    torch.testing.assert_close(
        batch.advantages.view(3, 4).sum(1), torch.zeros(3), atol=1e-5, rtol=0
    )
    with torch.no_grad():
        tempered = response_forward(policy, batch, temperature=0.7).logprobs
    torch.testing.assert_close(batch.old_logprobs, tempered)
    torch.testing.assert_close(batch.ref_logprobs, tempered)  # the first rollout IS the reference
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)
    picked = batch.select([5, 0])
    torch.testing.assert_close(picked.ref_logprobs, batch.ref_logprobs[[5, 0]])
    torch.testing.assert_close(picked.advantages, batch.advantages[[5, 0]])


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_objective_raises_a_toy_reward(name, red_or_blue_policy, rl, tmp_path) -> None:
    torch.manual_seed(0)
    policy = copy.deepcopy(red_or_blue_policy)
    objective = create("objective", name, **settings(name))
    assert isinstance(objective.config, GRPOConfig if name == "grpo" else RLOOConfig)
    trainer = GroupTrainer(
        policy,
        ContainsRed(),
        rl.colour_prompts(64, seed=4),
        rl.quiet(max_steps=10, batch_size=4, lr=1e-3, eval_every=10, eval_batches=2),
        objective,
        eval_prompts=rl.colour_prompts(32, seed=5),
        out_dir=tmp_path,
    )
    before = trainer.evaluate()
    result = trainer.fit()
    log = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    train = [r for r in log if r["split"] == "train"]
    first = sum(r["reward"] for r in train[:3]) / 3
    last = sum(r["reward"] for r in train[-3:]) / 3
    assert last > first + 0.25, [round(r["reward"], 2) for r in train]
    assert result["eval"]["reward"] >= before["reward"]
    for key in ("kl", "entropy", "group_reward_std", "response_length"):
        assert key in train[-1]
    if name == "grpo":
        assert "clip_fraction" in train[-1] and "k3_kl" in train[-1]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    saved = tmp_path / "model"
    assert (saved / "model.safetensors").is_file()
    assert not (saved / "value_head.safetensors").exists()  # no value model


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_recipe_runs_from_the_command_line(name, tok, rl, tmp_path, capsys) -> None:
    from mmgpt import cli
    from mmgpt.rlhf.reward_model import RewardModel
    from mmgpt.rlhf.shapes import write_shapes_preferences

    torch.manual_seed(0)
    sft = tmp_path / "sft"
    rl.build(tok, block_size=128).save_pretrained(sft)
    RewardModel(rl.build(tok, block_size=128)).save_pretrained(tmp_path / "rm")
    prefs = write_shapes_preferences(tmp_path / "prefs", 12, seed=0, image_size=32, max_shapes=1)
    quick = ["train.progress=false", "train.tensorboard=false", "train.warmup_steps=0"]
    argv = ["train", name, "--model", str(sft), "--reward-model", str(tmp_path / "rm")]
    argv += ["--data", str(prefs), "--out", str(tmp_path / "run"), *quick]
    argv += ["train.max_steps=1", "train.batch_size=2", "objective.max_new_tokens=3"]
    assert cli.main([*argv, "objective.samples_per_prompt=2"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward", "kl", "group_reward_std", "entropy"} <= set(record)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    capsys.readouterr()
    # a group of one answer stops with the field named
    bad = [*argv, "objective.samples_per_prompt=1"]
    bad[bad.index(str(tmp_path / "run"))] = str(tmp_path / "bad")
    assert cli.main(bad) == 2
    assert "samples_per_prompt" in capsys.readouterr().err


@pytest.mark.parametrize("target, direction", [(1e-3, 1), (50.0, -1)])
def test_grpo_adaptive_beta_follows_ppos_controller(
    target, direction, red_or_blue_policy, rl, tmp_path
) -> None:
    """With target_kl, GRPO's k3 weight moves after every rollout exactly as PPO's controller
    would from that rollout's KL: up while the KL is above the target, down while below; the
    loss uses the moved weight, and a resumed run continues from it."""
    from mmgpt.rlhf.losses import AdaptiveKLController

    torch.manual_seed(0)
    cfg = settings("grpo", beta=0.05, target_kl=target, kl_horizon=64)

    def build() -> GroupTrainer:
        return GroupTrainer(
            copy.deepcopy(red_or_blue_policy),
            ContainsRed(),
            rl.colour_prompts(64, seed=4),
            rl.quiet(max_steps=6, batch_size=4, lr=3e-3, save_every=6),
            create("objective", "grpo", **cfg),
            out_dir=tmp_path,
        )

    trainer = build()
    trainer.fit()
    train = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    reference = AdaptiveKLController(0.05, target, 64)
    assert train[0]["beta"] == pytest.approx(0.05)
    for record in train:  # each rollout logs the weight its updates used, then moves it
        assert record["beta"] == pytest.approx(reference.beta, rel=1e-9)
        reference.update(record["kl"], 16)  # 4 prompts × 4 answers
    assert trainer.objective.beta == pytest.approx(reference.beta, rel=1e-9)
    assert (trainer.objective.beta - 0.05) * direction > 0
    assert trainer.kl_controller.state_dict()["beta"] == trainer.objective.beta
    # the loss weighs the k3 term with the moved beta, not the configured one
    batch, _ = trainer.rollout([p for p in rl.colour_prompts(2, seed=9) for _ in range(4)])
    out = trainer.objective(trainer.wrapped_model, batch)
    logprobs, _ = trainer.wrapped_model(batch, with_entropy=False)
    expected, _, _ = grpo_loss(
        logprobs,
        batch.old_logprobs,
        batch.ref_logprobs,
        batch.advantages,
        batch.response_mask,
        0.2,
        trainer.objective.beta,
    )
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # entropy_coef subtracts that multiple of the answers' mean per-token entropy
    _, entropy = trainer.wrapped_model(batch, with_entropy=True)
    trainer.objective.config.entropy_coef = 0.1
    bonus = trainer.objective(trainer.wrapped_model, batch)
    trainer.objective.config.entropy_coef = 0.0
    mean_entropy = float(masked_mean(entropy, batch.response_mask).detach())
    assert mean_entropy > 0
    assert float(bonus.loss.detach()) == pytest.approx(
        float(expected.detach()) - 0.1 * mean_entropy, rel=1e-5
    )
    # resume: the controller's beta comes back from the checkpoint
    resumed = build()
    resumed.load_checkpoint(trainer.checkpoint_dir / checkpoint_name(6))
    assert resumed.objective.beta == pytest.approx(trainer.objective.beta, rel=1e-9)


def test_grpo_adaptive_beta_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="GRPOConfig.target_kl"):
        GRPOConfig(target_kl=0.0)
    with pytest.raises(ValueError, match="GRPOConfig.beta: an adaptive beta"):
        GRPOConfig(beta=0.0, target_kl=2.0)
    with pytest.raises(ValueError, match="GRPOConfig.kl_horizon"):
        GRPOConfig(kl_horizon=0)
    assert GRPOConfig().target_kl is None  # a fixed beta stays the default
