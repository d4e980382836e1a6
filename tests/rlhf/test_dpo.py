"""DPO: cached reference log-probs (in memory and in the run directory), learning, IPO."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmgpt.adapters import AdapterConfig, add_adapter
from mmgpt.objectives.dpo import REFERENCE_LOGPS, DPOObjective
from mmgpt.rlhf import reference as reference_module
from mmgpt.rlhf.data import PreferenceBatch, PreferenceCollator
from mmgpt.rlhf.policy import sequence_logps


def red_beats_blue(rl, n: int, seed: int):
    pairs = rl.colour_pairs(n, seed)
    for pair in pairs:
        pair.chosen, pair.rejected = "red", "it is blue"  # answers of different lengths
    return pairs


def test_cached_reference_logps_equal_recomputed_ones(tok, rl, tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = rl.build(tok)
    start = copy.deepcopy(model)
    pairs = rl.colour_pairs(10, seed=1)
    collate = PreferenceCollator(model.processor())
    objective = DPOObjective(reference_batch_size=4)
    data = objective.prepare_data(model, {"train": pairs}, collate, cache_dir=tmp_path)["train"]
    assert (tmp_path / REFERENCE_LOGPS).is_file()
    with torch.no_grad():
        batch = collate(pairs)
        expected = sequence_logps(start.eval(), batch.pairs)
    cached = torch.stack([data[i][1] for i in range(len(pairs))])  # (N, 2)
    torch.testing.assert_close(cached[:, 0], expected[:10], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached[:, 1], expected[10:], rtol=1e-5, atol=1e-4)
    # the batches carry them, in pair order
    carried = collate([data[i] for i in (3, 7)])
    torch.testing.assert_close(carried.reference_logps, cached[[3, 7]])

    # a resumed run reads the run directory instead of running the reference again
    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed the reference log-probs")

    monkeypatch.setattr(reference_module, "compute_reference_logps", no_recompute)
    again = objective.prepare_data(start, {"train": pairs}, collate, cache_dir=tmp_path)["train"]
    torch.testing.assert_close(again.logps, cached)
    # ... but not for other data, or another starting model
    with pytest.raises(AssertionError, match="recomputed"):
        objective.prepare_data(start, {"train": pairs[:9]}, collate, cache_dir=tmp_path)
    with torch.no_grad():
        start.gpt.transformer.wte.weight.mul_(1.01)
    with pytest.raises(AssertionError, match="recomputed"):
        objective.prepare_data(start, {"train": pairs}, collate, cache_dir=tmp_path)


def test_lora_policy_without_cache_uses_the_adapters_off_reference(tok, rl) -> None:
    torch.manual_seed(0)
    model = rl.build(tok).eval()
    base = copy.deepcopy(model)
    add_adapter(model, AdapterConfig(r=4, targets=["decoder"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    collate = PreferenceCollator(model.processor())
    pairs = rl.colour_pairs(4, seed=2)
    batch = collate(pairs)
    objective = DPOObjective()
    on_the_fly = objective(model, batch)
    with torch.no_grad():
        ref = sequence_logps(base, batch.pairs)
    cached = PreferenceBatch(batch.pairs, torch.stack([ref[:4], ref[4:]], dim=1))
    assert objective(model, cached).metrics == pytest.approx(on_the_fly.metrics, rel=1e-4)
    with pytest.raises(ValueError, match="no reference log-probabilities"):
        objective(base, batch)  # no adapters, no cache: refuse rather than guess


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_run_raises_the_implicit_reward_margin(tok, rl, tmp_path, loss_type) -> None:
    torch.manual_seed(0)
    model = rl.build(tok)
    objective = DPOObjective(beta=0.1, loss_type=loss_type, reference_batch_size=32)
    trainer = objective.build_trainer(
        model,
        red_beats_blue(rl, 48, seed=3),
        rl.quiet(max_steps=8, batch_size=8, lr=2e-3, eval_every=8),
        eval_data=red_beats_blue(rl, 16, seed=4),
        out_dir=tmp_path,
    )
    before = trainer.evaluate()
    # the policy starts AS the reference: every implicit reward is exactly zero
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    result = trainer.fit()
    after = result["eval"]
    assert after["reward_margin"] > 0.5 * (1 if loss_type == "sigmoid" else 0.1), after
    assert after["reward_accuracy"] == 1.0
    assert after["loss"] < before["loss"]
    assert (tmp_path / REFERENCE_LOGPS).is_file()
    assert (tmp_path / "reference_logps_eval.safetensors").is_file()
    log = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    assert {"reward_accuracy", "reward_margin", "pairs"} <= set(log[-1])
