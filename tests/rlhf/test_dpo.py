"""DPO: cached reference log-probs (in memory and in the run directory), learning, IPO,
the loss by hand (summed or token-averaged log-probs)."""

from __future__ import annotations

import copy
import json
import math

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


@pytest.mark.parametrize(
    ("loss_type", "average_logps"),
    [("sigmoid", False), ("sigmoid", True), ("ipo", None), ("ipo", False)],
)
def test_loss_by_hand_with_summed_or_token_averaged_logps(tok, rl, loss_type, average_logps):
    """The objective's loss against log-softmax sums written out here; ``average_logps``
    divides policy AND reference log-probs by each answer's token count (its <eos> included),
    which differs between "red" and "it is blue"."""
    torch.manual_seed(0)
    model = rl.build(tok).eval()
    pairs = red_beats_blue(rl, 3, seed=5)
    batch = PreferenceCollator(model.processor())(pairs)
    reference = torch.tensor([[-2.0, -9.0], [-3.5, -7.0], [-1.0, -12.0]])
    beta, smoothing = 0.7, (0.2 if loss_type == "sigmoid" else 0.0)
    objective = DPOObjective(
        beta=beta, loss_type=loss_type, label_smoothing=smoothing, average_logps=average_logps
    )
    loss = objective(model, PreferenceBatch(batch.pairs, reference)).loss

    with torch.no_grad():
        logits = model(batch.pairs).logits[:, :-1]
    labels = batch.pairs.labels[:, 1:]
    expected = []
    averaged = loss_type == "ipo" if average_logps is None else average_logps
    for i in range(3):
        rows = []
        for row, ref in ((i, reference[i, 0]), (i + 3, reference[i, 1])):
            positions = [t for t in range(labels.shape[1]) if labels[row, t] != -100]
            logp = sum(
                float(torch.log_softmax(logits[row, t], -1)[labels[row, t]]) for t in positions
            )
            n = len(positions) if averaged else 1
            rows.append((logp / n, float(ref) / n))
        (pc, rc), (pr, rr) = rows
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            expected.append(
                -(1 - smoothing) * math.log(1 / (1 + math.exp(-beta * h)))
                - smoothing * math.log(1 / (1 + math.exp(beta * h)))
            )
        else:
            expected.append((h - 1 / (2 * beta)) ** 2)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-4)
