"""PPO: the reference policy, a toy-reward run whose reward rises, exact checkpoint/resume."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from mmgpt.adapters import AdapterConfig, add_adapter
from mmgpt.generation import GenerationConfig
from mmgpt.rlhf.data import PreferenceCollator
from mmgpt.rlhf.policy import VALUE_HEAD, ReferencePolicy, save_policy, sequence_logps
from mmgpt.rlhf.ppo_trainer import PPOTrainer
from mmgpt.rlhf.rollout import PolicyWithValueHead, generate_responses, response_forward


class ContainsRed(nn.Module):
    """Toy reward: +1 when the answer contains "red", else 0 (stands in for a RewardModel)."""

    def score(self, conversations, answers, images=None, **kwargs) -> torch.Tensor:
        return torch.tensor([float("red" in a) for a in answers])

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


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


def test_reference_with_adapters_disabled_is_the_base_model(tok, rl) -> None:
    torch.manual_seed(0)
    policy = rl.build(tok).eval()
    base = copy.deepcopy(policy)
    add_adapter(policy, AdapterConfig(r=4, alpha=8, targets=["decoder"]))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters change the function
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    reference = ReferencePolicy(policy)
    assert reference.shared and reference.copy is None  # no second copy of the weights

    prompts = rl.colour_prompts(3, seed=1)
    batch, _, _ = generate_responses(policy, prompts, GenerationConfig(max_new_tokens=5, seed=0))
    pairs = PreferenceCollator(policy.processor())(rl.colour_pairs(3, seed=2)).pairs
    with torch.no_grad():
        tuned = response_forward(policy, batch).logprobs
        with reference.active() as ref:
            ref_tokens = response_forward(ref, batch).logprobs
            ref_sequences = sequence_logps(ref, pairs)
        base_tokens = response_forward(base, batch).logprobs
        base_sequences = sequence_logps(base, pairs)
    torch.testing.assert_close(ref_tokens, base_tokens)
    torch.testing.assert_close(ref_sequences, base_sequences)
    assert not torch.allclose(tuned, base_tokens)  # the adapters are back on afterwards
    torch.testing.assert_close(response_forward(policy, batch).logprobs.detach(), tuned)


def test_reference_without_adapters_is_a_frozen_copy(tok, rl) -> None:
    policy = rl.build(tok)
    reference = ReferencePolicy(policy)
    assert not reference.shared
    with torch.no_grad():
        policy.gpt.transformer.wte.weight.add_(1.0)
    with reference.active() as ref:
        assert ref is not policy
        assert not torch.equal(ref.gpt.transformer.wte.weight, policy.gpt.transformer.wte.weight)
        assert not any(p.requires_grad for p in ref.parameters())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_response_logprobs_match_a_full_forward(tok, rl, temperature) -> None:
    """Answer log-probs from embed(prompt) ⧺ embed(answer) equal a plain forward's (of the
    tempered distribution at ``temperature``)."""
    policy = rl.build(tok).eval()
    prompts = rl.colour_prompts(3, seed=3)
    batch, _, _ = generate_responses(policy, prompts, GenerationConfig(max_new_tokens=6, seed=1))
    with torch.no_grad():
        scores = response_forward(policy, batch, temperature=temperature).logprobs  # (B, R)
        for row in range(len(batch)):
            n = int(batch.response_mask[row].sum())
            ids = torch.cat([batch.prompt.input_ids[row], batch.response_ids[row, :n]])
            keep = torch.cat([batch.prompt.attention_mask[row].bool(), torch.ones(n).bool()])
            ids = ids[keep][None]
            offset = int((~batch.prompt.attention_mask[row].bool()).sum())
            positions = batch.prompt.image_positions[batch.prompt.image_positions[:, 0] == row]
            positions = positions - torch.tensor([row, offset])
            logits = policy(
                input_ids=ids, images=batch.prompt.images[[row]], image_positions=positions
            ).logits[0]
            logp = torch.log_softmax(logits[-n - 1 : -1] / temperature, -1)
            expected = logp.gather(-1, ids[0, -n:, None]).squeeze(-1)
            torch.testing.assert_close(scores[row, :n], expected, rtol=1e-4, atol=1e-4)
            assert (scores[row, n:] == 0).all()


def test_rollout_scores_the_tempered_distribution_it_sampled_from(
    red_or_blue_policy, rl, tmp_path
) -> None:
    """With temperature T the rollout samples from softmax(logits / T): π_old, π and π_ref
    must all be that distribution, else the ratio and the KL penalty are off from step 0."""
    policy = copy.deepcopy(red_or_blue_policy)
    trainer = PPOTrainer(
        policy,
        ContainsRed(),
        rl.colour_prompts(8, seed=4),
        rl.quiet(max_steps=1, batch_size=8, lr=1e-3),
        ppo_settings(temperature=0.5),
        out_dir=tmp_path,
    )
    batch, stats = trainer.rollout(rl.colour_prompts(8, seed=8))
    with torch.no_grad():
        tempered = response_forward(policy, batch, temperature=0.5).logprobs
        plain = response_forward(policy, batch).logprobs
    torch.testing.assert_close(batch.old_logprobs, tempered)
    assert not torch.allclose(batch.old_logprobs, plain)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is tempered alike
    logprobs, _, _ = trainer.wrapped_model(batch)
    torch.testing.assert_close(logprobs.detach(), tempered)


def test_ppo_raises_a_toy_reward(red_or_blue_policy, rl, tmp_path) -> None:
    torch.manual_seed(0)
    policy = copy.deepcopy(red_or_blue_policy)
    trainer = PPOTrainer(
        policy,
        ContainsRed(),
        rl.colour_prompts(64, seed=4),
        rl.quiet(max_steps=10, batch_size=16, lr=1e-3, eval_every=10, eval_batches=2),
        ppo_settings(),
        eval_prompts=rl.colour_prompts(32, seed=5),
        out_dir=tmp_path,
    )
    before = trainer.evaluate()
    result = trainer.fit()
    log = [
        r for r in map(__import__("json").loads, trainer.metrics_path.read_text().split("\n")[:-1])
    ]
    train = [r for r in log if r["split"] == "train"]
    first = sum(r["reward"] for r in train[:3]) / 3
    last = sum(r["reward"] for r in train[-3:]) / 3
    assert last > first + 0.25, [round(r["reward"], 2) for r in train]
    assert result["eval"]["reward"] >= before["reward"]
    for key in ("kl", "entropy", "clip_fraction", "value_loss", "response_length", "beta"):
        assert key in train[-1]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout IS the reference
    # the saved model is the policy, with its value head beside it
    saved = tmp_path / "model"
    assert (saved / "model.safetensors").is_file() and (saved / VALUE_HEAD).is_file()


def test_ppo_resumes_exactly(red_or_blue_policy, rl, tmp_path) -> None:
    def trainer(out_dir, policy):
        return PPOTrainer(
            policy,
            ContainsRed(),
            rl.colour_prompts(32, seed=6),
            rl.quiet(max_steps=3, batch_size=8, lr=1e-3, save_every=1, keep_last=5),
            ppo_settings(target_kl=0.5, kl_horizon=20),
            out_dir=out_dir,
        )

    start = copy.deepcopy(red_or_blue_policy)
    whole = trainer(tmp_path / "whole", copy.deepcopy(start))
    whole.fit()
    # a second run that stopped after step 2: its checkpoint directory, then --resume
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "whole" / "checkpoints" / "step_00000002",
        tmp_path / "resumed" / "checkpoints" / "step_00000002",
    )
    resumed = trainer(tmp_path / "resumed", copy.deepcopy(start))
    resumed.fit(resume=True)
    assert resumed.kl_controller.beta == whole.kl_controller.beta != 0.02  # restored, then moved
    for (name, a), (_, b) in zip(
        whole.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_saved_lora_policy_holds_the_reference_and_the_tuned_policy(tok, rl, tmp_path) -> None:
    from mmgpt.multimodal import MultimodalGPT

    torch.manual_seed(0)
    policy = rl.build(tok).eval()
    base = copy.deepcopy(policy)
    add_adapter(policy, AdapterConfig(r=4, targets=["decoder"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_policy(PolicyWithValueHead(policy), tmp_path)
    assert (tmp_path / VALUE_HEAD).is_file()
    pairs = PreferenceCollator(policy.processor())(rl.colour_pairs(2, seed=7)).pairs
    with torch.no_grad():
        reference = MultimodalGPT.from_pretrained(tmp_path, adapter=None).eval()
        torch.testing.assert_close(sequence_logps(reference, pairs), sequence_logps(base, pairs))
        tuned = MultimodalGPT.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(sequence_logps(tuned, pairs), sequence_logps(policy, pairs))
