"""Reward model: last-token head, Bradley-Terry learning with images, save/load, image outputs."""

from __future__ import annotations

import random

import pytest
import torch

from mmgpt.data.sample import Turn
from mmgpt.rlhf.data import ImageOutputPair, PreferenceCollator, select_rows
from mmgpt.rlhf.reward_model import RewardModel, last_token_index, reward_statistics
from mmgpt.trainer import Trainer


def test_last_token_index_for_right_and_left_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]
    with pytest.raises(ValueError, match="all 0"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_reward_head_reads_the_last_non_pad_token_and_ignores_padding(tok, rl) -> None:
    model = RewardModel(rl.build(tok)).eval()
    pairs = rl.colour_pairs(3, seed=1)
    # answers of different lengths, so the shorter rows are right-padded
    pairs[0].chosen = "it is red, not blue"
    batch = PreferenceCollator(model.processor())(pairs).pairs
    mask = batch.attention_mask
    assert not bool(mask.all()), "the batch should contain padding"
    with torch.no_grad():
        scores = model(batch)
        # garbage in the padded positions changes nothing
        noisy = select_rows(batch, range(len(batch)))
        noisy.input_ids = batch.input_ids.masked_fill(mask == 0, tok.encode(" red")[0])
        torch.testing.assert_close(model(noisy), scores)
        # each score is the head applied to the hidden state of that row's last real token
        for row in range(len(batch)):
            alone = select_rows(batch, [row])
            n = int(alone.attention_mask.sum())
            alone.input_ids, alone.attention_mask = (
                alone.input_ids[:, :n],
                alone.attention_mask[:, :n],
            )
            hidden = model.backbone(alone, return_logits=False).hidden_states[0, -1]
            expected = model.head(hidden).squeeze(-1)
            torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=1e-5)


def test_reward_model_learns_a_preference_and_round_trips(tok, rl, tmp_path) -> None:
    """A toy preference ("red" beats "blue", whatever the image) learned from pairs with
    images; held-out pair accuracy is the eval metric; save/load keeps scores and stats."""

    def pairs(n: int, seed: int):
        out = rl.colour_pairs(n, seed)
        for pair in out:
            pair.chosen, pair.rejected = "red", "blue"
        return out

    torch.manual_seed(0)
    model = RewardModel(rl.build(tok))
    collate = PreferenceCollator(model.processor())
    train, held_out = pairs(64, seed=2), pairs(32, seed=3)
    trainer = Trainer(
        model,
        "reward",
        train,
        rl.quiet(max_steps=12, batch_size=8, lr=2e-3, eval_every=12),
        eval_data=held_out,
        collate_fn=collate,
        out_dir=tmp_path / "run",
    )
    before = trainer.evaluate()
    result = trainer.fit()
    assert result["eval"]["accuracy"] >= 0.9, (before, result["eval"])
    assert result["eval"]["loss"] < before["loss"]

    model.normalization = reward_statistics(model, train, collate)
    assert model.normalization["count"] == 2 * len(train)
    model.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.normalization == pytest.approx(model.normalization)
    conversations = [[Turn("user", rl.QUESTION)]] * 2
    images = [p.images for p in held_out[:2]]
    answers = ["red", "blue"]
    model.eval()
    raw = loaded.score(conversations, answers, images)
    torch.testing.assert_close(raw, model.score(conversations, answers, images))
    assert raw[0] > raw[1]
    stats = loaded.normalization
    torch.testing.assert_close(
        loaded.score(conversations, answers, images, normalize=True),
        (raw - stats["mean"]) / stats["std"],
    )
    with pytest.raises(FileNotFoundError, match="not a reward model directory"):
        RewardModel.from_pretrained(tmp_path / "run")


def test_reward_model_scores_generated_images(tok, rl, tmp_path) -> None:
    """Preference over image OUTPUTS: the answer is "<image>", read by the image encoder."""
    torch.manual_seed(0)

    def pairs(n: int, seed: int) -> list[ImageOutputPair]:
        rng = random.Random(seed)
        return [
            ImageOutputPair("draw a red square", [], rl.square("red", rng), rl.square("blue", rng))
            for _ in range(n)
        ]

    model = RewardModel(rl.build(tok))
    collate = PreferenceCollator(model.processor())
    batch = collate(pairs(2, seed=0)).pairs
    # one output image per row, in the assistant turn: after the prompt, before <eos>
    assert batch.images.shape[0] == 4
    prompt_len = len(model.processor().encode_prompt([Turn("user", "draw a red square")]).input_ids)
    assert (batch.image_positions[:, 1] >= prompt_len).all()
    trainer = Trainer(
        model,
        "reward",
        pairs(64, seed=4),
        rl.quiet(max_steps=12, batch_size=8, lr=2e-3, eval_every=12),
        eval_data=pairs(32, seed=5),
        collate_fn=collate,
        out_dir=tmp_path,
    )
    result = trainer.fit()
    assert result["eval"]["accuracy"] >= 0.9, result["eval"]
    # score() takes generated images beside empty answers
    rng = random.Random(9)
    conversation = [Turn("user", "draw a red square")]
    scores = model.score(
        [conversation, conversation],
        ["", ""],
        answer_images=[[rl.square("red", rng)], [rl.square("blue", rng)]],
    )
    assert scores[0] > scores[1]


def test_reward_statistics_over_an_even_subset_of_the_pairs(tok, rl) -> None:
    """Ranked lists make many pairs per prompt: the statistics read at most ``max_pairs``,
    evenly spread, and equal the moments of exactly those pairs' scores."""
    torch.manual_seed(0)
    model = RewardModel(rl.build(tok)).eval()
    pairs = rl.colour_pairs(10, seed=3)
    collate = PreferenceCollator(model.processor())
    with torch.no_grad():
        scores = model(collate(pairs).pairs).double()  # (20,): chosen, then rejected
    full = reward_statistics(model, pairs, collate, batch_size=3, max_pairs=None)
    assert full["count"] == 20
    assert full["mean"] == pytest.approx(float(scores.mean()), abs=1e-5)
    assert full["std"] == pytest.approx(float(scores.std(unbiased=False)), abs=1e-5)
    subset = reward_statistics(model, pairs, collate, max_pairs=4)
    picked = torch.cat([scores[[0, 2, 5, 7]], scores[[10, 12, 15, 17]]])  # pairs 0, 2, 5, 7
    assert subset["count"] == 8
    assert subset["mean"] == pytest.approx(float(picked.mean()), abs=1e-5)
    assert subset["std"] == pytest.approx(float(picked.std(unbiased=False)), abs=1e-5)
    with pytest.raises(ValueError, match="max_pairs must be >= 1"):
        reward_statistics(model, pairs, collate, max_pairs=0)


def test_likelihood_term_adds_the_answers_log_likelihood(tok, rl, tmp_path) -> None:
    """score = head(h_last) + w · Σ log p(answer token) under the backbone's own LM head,
    counted over exactly the answer's tokens; w learns, and the directory round-trips."""
    torch.manual_seed(0)
    backbone = rl.build(tok).eval()
    plain = RewardModel(backbone).eval()
    model = RewardModel(backbone, head=plain.head, likelihood_weight=0.7).eval()
    pairs = rl.colour_pairs(3, seed=1)
    pairs[0].chosen = "it is red, not blue"  # rows of different lengths: padding
    batch = PreferenceCollator(model.processor())(pairs).pairs
    with torch.no_grad():
        scores, head_only = model(batch), plain(batch)
        logits = backbone(batch).logits.float()
    for row in range(len(batch)):
        ids = batch.input_ids[row].tolist()
        answer = [t for t in range(len(ids)) if int(batch.labels[row, t]) != -100]
        # the labelled tokens are the answer and its end of turn, nothing of the prompt
        text = tok.decode([ids[t] for t in answer])
        expected_answer = ([p.chosen for p in pairs] + [p.rejected for p in pairs])[row]
        assert text.strip().startswith(expected_answer), text
        logp = sum(float(torch.log_softmax(logits[row, t - 1], -1)[ids[t]]) for t in answer)
        assert float(scores[row]) == pytest.approx(float(head_only[row]) + 0.7 * logp, abs=1e-4)

    model.train()
    from mmgpt.rlhf.losses import bradley_terry_loss

    out = model(batch)
    B = len(pairs)
    bradley_terry_loss(out[:B], out[B:]).backward()
    assert model.likelihood_weight.grad is not None and model.likelihood_weight.grad != 0

    model.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert float(loaded.likelihood_weight.detach()) == pytest.approx(0.7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model.eval()(batch))
    plain.save_pretrained(tmp_path / "plain")
    assert RewardModel.from_pretrained(tmp_path / "plain").likelihood_weight is None
    # a config that promises the term without the weight in the head file is refused
    config = tmp_path / "plain" / "reward_config.json"
    config.write_text(config.read_text().replace('"likelihood": false', '"likelihood": true'))
    with pytest.raises(ValueError, match="likelihood_weight"):
        RewardModel.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="likelihood_weight: expected a number"):
        RewardModel(backbone, likelihood_weight="1")
    batch.labels = None
    with pytest.raises(ValueError, match="no labels"):
        model(batch)


def test_reward_objective_builds_a_model_with_the_likelihood_term(tok, rl, tmp_path) -> None:
    """``objective.likelihood_weight`` (what ``mmgpt train reward`` passes): the trainer's
    reward model adds the learned, weighted log-likelihood of the answer to its score."""
    from mmgpt.objectives.reward import RewardObjective

    torch.manual_seed(0)
    backbone = rl.build(tok)
    pairs = rl.colour_pairs(8, seed=2)
    trainer = RewardObjective(likelihood_weight=0.5).build_trainer(
        backbone, pairs, rl.quiet(max_steps=1, batch_size=4), out_dir=tmp_path / "run"
    )
    model = trainer.model
    assert isinstance(model, RewardModel) and model.likelihood_weight is not None
    assert model.likelihood_weight.item() == 0.5
    assert any(p is model.likelihood_weight for p in model.parameters())  # it is learned
    plain = RewardObjective().build_trainer(
        backbone, pairs, rl.quiet(max_steps=1, batch_size=4), out_dir=tmp_path / "plain"
    )
    assert plain.model.likelihood_weight is None
    with pytest.raises(ValueError, match="likelihood_weight must be a number or null"):
        RewardObjective(likelihood_weight="yes")
