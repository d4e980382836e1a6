"""The lm objective: token-weighted next-token cross-entropy vs a manual reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmgpt.config import GPTConfig
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.model import GPT
from mmgpt.objectives.lm import LMObjective
from mmgpt.registry import create

V = 37


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return GPT(config).eval()


def manual_loss(model: GPT, ids: torch.Tensor, labels: torch.Tensor, mask=None) -> torch.Tensor:
    """Full forward, drop the last position, mean CE over the non-ignored targets."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    logits, targets = logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(logits[keep], targets[keep])


def test_registered() -> None:
    assert isinstance(create("objective", "lm"), LMObjective)


def test_loss_matches_manual_cross_entropy_with_labels(model: GPT) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a prompt that is not trained on
    labels[2, 7:] = -100
    out = LMObjective()(model, {"input_ids": ids, "labels": labels})
    assert isinstance(out, ObjectiveOutput)
    expected = manual_loss(model, ids, labels)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    n_targets = int((labels[:, 1:] != -100).sum())
    assert out.weight == n_targets == out.metrics["tokens"] == 3 * 8 - 3 - 2
    assert out.metrics["loss"] == pytest.approx(expected.detach().item(), rel=1e-6)


def test_padding_is_ignored_without_labels(model: GPT) -> None:
    torch.manual_seed(2)
    ids = torch.randint(0, V, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    ids[1, 5:] = 0
    out = LMObjective()(model, {"input_ids": ids, "attention_mask": mask})
    labels = ids.masked_fill(mask == 0, -100)
    expected = manual_loss(model, ids, labels, mask)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert out.weight == 7 + 4


def test_weight_gives_exact_token_average_over_micro_batches(model: GPT) -> None:
    """(w1 l1 + w2 l2) / (w1 + w2) equals the loss of the joined batch; a mean of means does not."""
    torch.manual_seed(3)
    ids = torch.randint(0, V, (4, 10))
    labels = ids.clone()
    labels[0, :8] = -100  # few targets in the first half
    lm = LMObjective()
    full = lm(model, {"input_ids": ids, "labels": labels})
    a = lm(model, {"input_ids": ids[:2], "labels": labels[:2]})
    b = lm(model, {"input_ids": ids[2:], "labels": labels[2:]})
    weighted = (a.loss * a.weight + b.loss * b.weight) / (a.weight + b.weight)
    torch.testing.assert_close(weighted, full.loss, rtol=1e-6, atol=1e-6)
    assert a.weight + b.weight == full.weight
    assert (
        abs(float((a.loss + b.loss).detach() / 2 - full.loss.detach())) > 1e-4
    )  # the naive mean differs


def test_gradient_matches_reference(model: GPT) -> None:
    torch.manual_seed(4)
    ids = torch.randint(0, V, (2, 7))
    labels = ids.clone()
    labels[1, :3] = -100
    model.zero_grad()
    LMObjective()(model, {"input_ids": ids, "labels": labels}).loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    manual_loss(model, ids, labels).backward()
    for g, ref in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_window_of_block_size_plus_one_fills_the_context(model: GPT) -> None:
    ids = torch.randint(0, V, (2, model.config.block_size + 1))
    out = LMObjective()(model, {"input_ids": ids})
    assert out.weight == 2 * model.config.block_size


def test_all_targets_ignored_gives_zero_weight(model: GPT) -> None:
    ids = torch.randint(0, V, (1, 5))
    out = LMObjective()(model, {"input_ids": ids, "labels": torch.full_like(ids, -100)})
    assert out.weight == 0 and out.loss.item() == 0.0


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"input_ids": torch.zeros(5, dtype=torch.long)}, "must be \\(batch, time\\)"),
        ({"input_ids": torch.zeros(2, 1, dtype=torch.long)}, "at least 2 tokens"),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 3)},
            "labels shape",
        ),
    ],
)
def test_bad_batches_raise(model: GPT, batch: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LMObjective()(model, batch)
