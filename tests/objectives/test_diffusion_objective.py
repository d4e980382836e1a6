"""The diffusion objective: LM + image loss through the signal tokens, gradient routing, learning."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("diffusers")
mmgpt_text = pytest.importorskip("mmgpt_text")

from mmgpt.data.sample import Sample, Turn  # noqa: E402
from mmgpt.imagegen import gather_signal_states  # noqa: E402
from mmgpt.multimodal import MultimodalGPT  # noqa: E402
from mmgpt.processor import IGNORE_INDEX  # noqa: E402
from mmgpt.registry import create  # noqa: E402

K = 4
SIZE = 16
COLOURS = {"red": (220, 30, 30), "blue": (30, 70, 225)}
CORPUS = "User: draw a red square\nUser: draw a blue square\nAssistant: a red one\n" * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=280, num_signal_tokens=K)


def build(tok, **decoder_kwargs) -> MultimodalGPT:
    torch.manual_seed(0)
    kwargs = {"condition_dim": 16, "num_condition_tokens": 2, "image_size": SIZE, **decoder_kwargs}
    return MultimodalGPT.build(
        "gpt-nano",
        tok,
        encoder=None,
        block_size=48,
        image_decoder="diffusion",
        image_decoder_kwargs=kwargs,
        output_projector="signal_mlp",
    )


def square(colour: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (250, 250, 250))
    image.paste(COLOURS[colour], (3, 3, 13, 13))
    return image


def draw_sample(colour: str, text: str = "<image_out>") -> Sample:
    return Sample(
        [Turn("user", f"draw a {colour} square"), Turn("assistant", text)],
        output_images=[square(colour)],
    )


def test_loss_is_the_weighted_sum_computed_by_hand(tok) -> None:
    model = build(tok).eval()  # eval: no condition dropout, so the draws are noise + timesteps
    batch = model.processor()([draw_sample("red"), draw_sample("blue", "here: <image_out>")])
    assert batch.output_images.shape == (2, 3, SIZE, SIZE)
    objective = create(
        "objective", "diffusion", lm_weight=0.7, diffusion_weight=2.0, backprop_into_gpt=True
    )
    torch.manual_seed(11)
    out = objective(model, batch)

    with torch.no_grad():
        full = model(batch)
        lm = F.cross_entropy(
            full.logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100
        )
        states = full.hidden_states[
            batch.signal_positions[:, :1], batch.signal_positions[:, 1:] + torch.arange(K)
        ]  # (2, K, C) by advanced indexing, independent of gather_signal_states
        torch.manual_seed(11)
        diffusion = model.image_decoder.training_loss(
            model.output_projector(states), batch.output_images
        )
    torch.testing.assert_close(out.loss.detach(), 0.7 * lm + 2.0 * diffusion)
    assert out.metrics["lm_loss"] == pytest.approx(float(lm), rel=1e-5)
    assert out.metrics["diffusion_loss"] == pytest.approx(float(diffusion), rel=1e-5)
    assert out.weight == 2.0
    # the signal tokens are learned targets (the model must learn to emit them)
    labelled = batch.labels[batch.labels != IGNORE_INDEX].tolist()
    assert labelled.count(tok.signal_token_ids[0]) == 2

    # learn_forced_tokens=False: [IMG1].. (forced at generation) leave the LM loss
    masked = batch.labels.clone()
    masked[torch.isin(masked, torch.tensor(tok.signal_token_ids[1:]))] = IGNORE_INDEX
    with torch.no_grad():
        lm_first = F.cross_entropy(
            full.logits[:, :-1].flatten(0, 1), masked[:, 1:].flatten(), ignore_index=-100
        )
    first_only = create("objective", "diffusion", learn_forced_tokens=False)
    assert first_only(model, batch).metrics["lm_loss"] == pytest.approx(float(lm_first), rel=1e-5)
    assert float(lm_first) != pytest.approx(float(lm))

    # lm_reduction=sample: each sample's mean over its labelled tokens, then their mean
    with torch.no_grad():
        rows = F.cross_entropy(
            full.logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], reduction="none"
        )
        counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(1)
    assert counts[0] != counts[1]  # "here: " makes the second reply longer
    by_sample = (rows.sum(1) / counts).mean()
    per_sample = create("objective", "diffusion", lm_reduction="sample")
    assert per_sample(model, batch).metrics["lm_loss"] == pytest.approx(float(by_sample), rel=1e-5)
    assert float(by_sample) != pytest.approx(float(lm))
    with pytest.raises(ValueError, match="diffusion objective: the loss reduction"):
        create("objective", "diffusion", lm_reduction="batch")


def _gpt_grads(model: MultimodalGPT) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.gpt.parameters()]


def test_backprop_into_gpt_false_keeps_the_image_loss_out_of_the_gpt(tok) -> None:
    model = build(tok, p_uncond=0.0).train()
    batch = model.processor()([draw_sample("red"), draw_sample("blue")])

    image_only = create("objective", "diffusion", lm_weight=0.0, backprop_into_gpt=False)
    image_only(model, batch).loss.backward()
    assert all(g is None for g in _gpt_grads(model))
    assert all(p.grad is not None for p in model.output_projector.parameters())
    assert all(p.grad is not None for p in model.image_decoder.unet.parameters())

    # with the LM term on, the GPT's gradient is exactly the LM gradient
    model.zero_grad(set_to_none=True)
    create("objective", "diffusion", backprop_into_gpt=False)(model, batch).loss.backward()
    combined = _gpt_grads(model)
    model.zero_grad(set_to_none=True)
    create("objective", "diffusion", diffusion_weight=0.0)(model, batch).loss.backward()
    for got, lm_only in zip(combined, _gpt_grads(model)):
        torch.testing.assert_close(got, lm_only)

    # and with backprop on, the image loss alone reaches the GPT
    model.zero_grad(set_to_none=True)
    create("objective", "diffusion", lm_weight=0.0)(model, batch).loss.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _gpt_grads(model))


def test_at_diffusion_weight_zero_the_decoder_is_not_run(tok) -> None:
    # a text stage's drawing prompts teach the GPT to answer with [IMG0]..; the UNet must not
    # run (a forward and a zero backward for every drawing)
    model = build(tok, p_uncond=0.0).train()
    batch = model.processor()([draw_sample("red"), draw_sample("blue")])
    calls, training_loss = [], model.image_decoder.training_loss

    def counted(*args):
        calls.append(1)
        return training_loss(*args)

    model.image_decoder.training_loss = counted
    out = create("objective", "diffusion", diffusion_weight=0.0)(model, batch)
    out.loss.backward()
    assert not calls and out.metrics["images"] == 2 and out.metrics["diffusion_loss"] == 0
    assert all(p.grad is None for p in model.image_decoder.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in _gpt_grads(model))
    create("objective", "diffusion")(model, batch).loss.backward()
    assert calls  # with weight, it runs


def test_short_training_lowers_the_diffusion_loss(tok) -> None:
    """40 steps of the real objective on two prompts: the held-out diffusion loss drops."""
    small_unet = {"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 2}
    model = build(tok, p_uncond=0.1, unet_config=small_unet)
    processor = model.processor()
    objective = create("objective", "diffusion")
    train = processor([draw_sample(c) for c in ["red", "blue"] * 4])
    held = processor([draw_sample(c) for c in ["blue", "red"] * 4])

    def held_out() -> dict[str, float]:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)  # same noise and timesteps every time
            return objective(model, held).metrics

    before = held_out()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    torch.manual_seed(1)
    for _ in range(40):
        model.train()
        out = objective(model, train)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = held_out()
    assert after["diffusion_loss"] < 0.6 * before["diffusion_loss"], (before, after)
    assert after["lm_loss"] < 0.1 * before["lm_loss"]  # it learned to answer with the span


def test_mixed_batches_and_bad_inputs(tok) -> None:
    model = build(tok)
    processor = model.processor()
    caption_only = processor(
        [Sample([Turn("user", "draw a red square"), Turn("assistant", "a red one")])]
    )
    out = create("objective", "diffusion")(model, caption_only)
    assert out.metrics["diffusion_loss"] == 0.0 and out.metrics["images"] == 0.0
    out.loss.backward()  # the LM term alone

    mixed = processor(
        [draw_sample("red"), Sample([Turn("user", "draw"), Turn("assistant", "a red one")])]
    )
    assert create("objective", "diffusion")(model, mixed).metrics["images"] == 1.0

    no_targets = processor([Sample([Turn("user", "draw"), Turn("assistant", "<image_out>")])])
    with pytest.raises(ValueError, match="no output images"):
        create("objective", "diffusion")(model, no_targets)
    shifted = processor([draw_sample("red")])
    shifted.signal_positions = shifted.signal_positions - torch.tensor([0, 1])
    with pytest.raises(ValueError, match="do not point at"):
        create("objective", "diffusion")(model, shifted)
    with pytest.raises(TypeError, match="MultimodalBatch"):
        create("objective", "diffusion")(model, {"input_ids": shifted.input_ids})
    with pytest.raises(ValueError, match="lm_weight must be a number >= 0"):
        create("objective", "diffusion", lm_weight=-1)
    plain = MultimodalGPT.build("gpt-nano", tok, encoder=None, block_size=48)
    with pytest.raises(ValueError, match="cannot generate images"):
        create("objective", "diffusion")(plain, shifted)
    assert gather_signal_states(
        torch.zeros(1, 5, 2), torch.zeros(0, 2, dtype=torch.long), K
    ).shape == (
        0,
        K,
        2,
    )


def test_the_t2i_recipe_trains_resumes_and_draws(tmp_path) -> None:
    from mmgpt.imagegen import ImageGenerationConfig, generate_images
    from mmgpt.recipe import run_training

    small = [
        "data.size=48",
        "data.image_size=16",
        "model.image_decoder.image_size=16",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.save_every=1",
        "train.log_every=1",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    out = tmp_path / "run"
    first = run_training("t2i", out=out, overrides=[*small, "train.max_steps=2"])
    assert first["step"] == 2 and set(first["train"]) >= {"lm_loss", "diffusion_loss"}
    with pytest.warns(RuntimeWarning, match="changed recipe"):  # max_steps grew
        resumed = run_training("t2i", out=out, resume=True, overrides=[*small, "train.max_steps=3"])
    assert resumed["step"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the resumed run continued the log, it did not start over

    model = MultimodalGPT.from_pretrained(out / "model")
    assert type(model.output_projector).__name__ == "StandardizedSignalProjector"
    drawn = generate_images(
        model,
        ["draw a large red circle on the left"],
        ImageGenerationConfig(steps=2, seed=0),
        force_image=True,
    )
    assert drawn[0][0][0].size == (16, 16)


def test_check_data_refuses_data_without_drawing_samples() -> None:
    from mmgpt.data.errors import DataError
    from mmgpt.data.shapes import ShapesWorld

    objective = create("objective", "diffusion")
    objective.check_data(ShapesWorld(size=40, task="t2i", image_size=8))
    objective.check_data(ShapesWorld(size=40, task="mixed", image_size=8))
    captions = ShapesWorld(size=40, task=["caption", "vqa"], image_size=8)
    with pytest.raises(DataError) as info:
        objective.check_data(captions)
    message = str(info.value)
    assert message.startswith(
        "diffusion objective: no drawing samples in ShapesWorld (task=['caption', 'vqa']): none "
        "of its 40 samples asks the model to draw"
    )
    assert "data.task=t2i" in message and info.value.reason == "no_drawing_samples"
    # an objective that does not train the decoder needs no drawing samples
    create("objective", "diffusion", diffusion_weight=0).check_data(captions)
    objective.check_data(iter(()))  # an iterable dataset cannot be inspected: not refused
