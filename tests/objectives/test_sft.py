"""The sft objective: loss on the reply tokens only, token-weighted, for multimodal and text GPTs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmgpt.config import gpt_config
from mmgpt.data.sample import Sample, Turn
from mmgpt.model import GPT
from mmgpt.objectives.sft import SFTObjective
from mmgpt.processor import IGNORE_INDEX, MultimodalBatch
from mmgpt.registry import create

CORPUS = "User: Describe the image.\nAssistant: a red square on the left\n" * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    mmgpt_text = pytest.importorskip("mmgpt_text")
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=290, num_signal_tokens=2)


def manual_loss(logits: torch.Tensor, positions: list[tuple[int, int]], targets: list[int]):
    """Mean of -log p(target) where position (row, t) is predicted from logits[row, t - 1]."""
    terms = [
        -F.log_softmax(logits[row, t - 1].double(), dim=-1)[target]
        for (row, t), target in zip(positions, targets)
    ]
    return torch.stack(terms).mean()


def test_registered_and_text_gpt_loss_is_the_reply_cross_entropy() -> None:
    assert isinstance(create("objective", "sft"), SFTObjective)
    model = GPT(gpt_config("gpt-nano", vocab_size=40, block_size=16)).eval()
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2, 0], [1, 11, 12, 13, 14, 2, 0, 0]])
    mask = (torch.arange(8) < torch.tensor([[7], [6]])).long()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    answer = [(0, 4), (0, 5), (0, 6), (1, 4), (1, 5)]  # reply tokens + eos, prompt ignored
    for row, t in answer:
        labels[row, t] = input_ids[row, t]
    out = SFTObjective()(model, {"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    expected = manual_loss(logits, answer, [int(input_ids[r, t]) for r, t in answer])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.weight == 5 and out.metrics["tokens"] == 5
    # leakage check: scoring every real token would give a different number
    leaked = [(r, t) for r in range(2) for t in range(1, int(mask[r].sum()))]
    other = manual_loss(logits, leaked, [int(input_ids[r, t]) for r, t in leaked])
    assert abs(other.item() - expected.item()) > 1e-3


def test_multimodal_loss_covers_exactly_the_answer_and_eos(tok) -> None:
    pytest.importorskip("timm")
    from mmgpt.multimodal import MultimodalGPT

    model = MultimodalGPT.build("gpt-nano", tok, block_size=64).eval()
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    samples = [
        Sample(
            [Turn("user", "<image>\nDescribe the image."), Turn("assistant", "a red square")],
            [image],
        ),
        Sample(
            [
                Turn("user", "<image>\nDescribe the image."),
                Turn("assistant", "a red square on the left"),
            ],
            [image],
        ),
    ]
    batch = model.processor()(samples)
    out = SFTObjective()(model, batch)

    # the targets, found independently of the labels: " reply" + eos at the end of each row
    positions, targets = [], []
    for row, sample in enumerate(samples):
        reply = [*tok.encode(" " + sample.conversation[1].text), tok.eos_id]
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        end = len(ids) - 1  # the template's trailing newline follows eos
        start = end - len(reply)
        assert ids[start:end] == reply
        positions += [(row, t) for t in range(start, end)]
        targets += reply
    with torch.no_grad():
        logits = model(batch).logits
    expected = manual_loss(logits, positions, targets)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.weight == len(targets) == out.metrics["tokens"]
    assert 0.0 <= out.metrics["token_accuracy"] <= 1.0

    # gradients reach the projector and the encoder through the image slots
    model.train()
    SFTObjective()(model, batch).loss.backward()
    assert model.projectors["image"][0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())


def test_weighting_makes_accumulation_exact_and_padding_side_irrelevant() -> None:
    torch.manual_seed(0)
    model = GPT(gpt_config("gpt-nano", vocab_size=40, block_size=16)).eval()
    lengths = [8, 5, 6, 3]
    rows = [torch.randint(3, 40, (n,)) for n in lengths]

    def batch(idx: list[int], side: str) -> dict[str, torch.Tensor]:
        T = max(lengths[i] for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for r, i in enumerate(idx):
            n = lengths[i]
            sl = slice(T - n, T) if side == "left" else slice(0, n)
            ids[r, sl], mask[r, sl] = rows[i], 1
            labels[r, sl] = torch.where(torch.arange(n) >= 2, rows[i], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    sft = SFTObjective()
    whole = sft(model, batch([0, 1, 2, 3], "right"))
    parts = [sft(model, batch([0, 1], "right")), sft(model, batch([2, 3], "right"))]
    accumulated = sum(p.loss * p.weight for p in parts) / sum(p.weight for p in parts)
    assert accumulated.item() == pytest.approx(whole.loss.item(), rel=1e-5)
    assert whole.weight == sum(n - 2 for n in lengths)
    left = sft(model, batch([0, 1, 2, 3], "left"))
    assert left.loss.item() == pytest.approx(whole.loss.item(), rel=1e-4)
    alone = [sft(model, batch([i], "right")) for i in range(4)]
    mean = sum(a.loss * a.weight for a in alone) / sum(a.weight for a in alone)
    assert mean.item() == pytest.approx(whole.loss.item(), rel=1e-5)


def test_token_accuracy_counts_argmax_hits() -> None:
    # a fake model whose prediction at every position is token 3
    logits = torch.full((1, 5, 6), -5.0)
    logits[..., 3] = 5.0
    fake = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    ids = torch.tensor([[1, 3, 4, 3, 2]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 3, 2]])
    out = SFTObjective()(fake, {"input_ids": ids, "labels": labels})
    assert out.metrics["token_accuracy"] == pytest.approx(1 / 3)
    assert out.metrics["tokens"] == 3
    expected = (3 * math.log(math.exp(5) + 5 * math.exp(-5)) - 5 - 5 - 5 + 10 + 10) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_bad_batches_are_clear_errors() -> None:
    model = GPT(gpt_config("gpt-nano", vocab_size=40, block_size=16))
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="no labels"):
        SFTObjective()(model, {"input_ids": ids})
    with pytest.raises(ValueError, match="labels shape"):
        SFTObjective()(model, {"input_ids": ids, "labels": ids[:, :2]})
    batch = MultimodalBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids,
        images=torch.zeros(1, 3, 32, 32),
        image_positions=torch.tensor([[0, 1]]),
    )
    with pytest.raises(ValueError, match="has no image encoder"):
        SFTObjective()(model, batch)
    batch.images, batch.image_positions = None, torch.zeros(0, 2, dtype=torch.long)
    assert SFTObjective()(model, batch).weight == 2  # a text-only MultimodalBatch works


def test_sample_reduction_weighs_every_sample_the_same() -> None:
    """``reduction="sample"``: the mean over samples of each sample's mean token loss, so a
    one-token answer beside a long reply counts half, not one token in six."""
    model = GPT(gpt_config("gpt-nano", vocab_size=40, block_size=16)).eval()
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2, 0], [1, 11, 12, 13, 2, 0, 0, 0]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    long_reply, short_reply = [(0, 2), (0, 3), (0, 4), (0, 5), (0, 6)], [(1, 4)]
    for row, t in long_reply + short_reply:
        labels[row, t] = input_ids[row, t]
    batch = {"input_ids": input_ids, "labels": labels}
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    ids = lambda spots: [int(input_ids[r, t]) for r, t in spots]  # noqa: E731
    per_sample = (
        manual_loss(logits, long_reply, ids(long_reply))
        + manual_loss(logits, short_reply, ids(short_reply))
    ) / 2
    out = SFTObjective(reduction="sample")(model, batch)
    assert out.loss.item() == pytest.approx(per_sample.item(), rel=1e-5)
    assert out.weight == 2 and out.metrics["tokens"] == 6
    token = SFTObjective()(model, batch)
    every = long_reply + short_reply
    assert token.loss.item() == pytest.approx(
        manual_loss(logits, every, ids(every)).item(), rel=1e-5
    )
    assert abs(token.loss.item() - out.loss.item()) > 1e-3
    # a row without targets is not a sample of the mean; no target at all: zero, weight 0
    labels[1] = IGNORE_INDEX
    alone = SFTObjective(reduction="sample")(model, {"input_ids": input_ids, "labels": labels})
    expected = manual_loss(logits, long_reply, ids(long_reply))
    assert alone.loss.item() == pytest.approx(expected.item(), rel=1e-5) and alone.weight == 1
    labels[0] = IGNORE_INDEX
    empty = SFTObjective(reduction="sample")(model, {"input_ids": input_ids, "labels": labels})
    assert empty.loss.item() == 0.0 and empty.weight == 0
    with pytest.raises(ValueError, match="sft objective: the loss reduction must be one of"):
        SFTObjective(reduction="mean")
