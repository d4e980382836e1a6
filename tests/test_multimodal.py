"""MultimodalGPT: fusion, training stages, checkpoints, image-conditioned generation, learning."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

pytest.importorskip("timm")
mmgpt_text = pytest.importorskip("mmgpt_text")

from mmgpt import registry  # noqa: E402
from mmgpt.config import gpt_config  # noqa: E402
from mmgpt.data.sample import Sample, Turn  # noqa: E402
from mmgpt.generation import GenerationConfig  # noqa: E402
from mmgpt.model import GPT  # noqa: E402
from mmgpt.multimodal import MultimodalGPT  # noqa: E402
from mmgpt.processor import IGNORE_INDEX  # noqa: E402
from mmgpt.projectors import LinearProjector  # noqa: E402

CORPUS = (
    "User: What colour is the square?\nAssistant: red\nAssistant: blue\n"
    "User: Describe the image.\nAssistant: A red square on a grey background.\n"
) * 20
QUESTION = "<image>\nWhat colour is the square?"
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=300, num_signal_tokens=4)


def build(tok, **kwargs: Any) -> MultimodalGPT:
    kwargs.setdefault("block_size", 96)
    return MultimodalGPT.build("gpt-nano", tok, **kwargs)  # ViT "vit_tiny_custom": 16 tokens


def square(colour: str, rng: random.Random) -> Image.Image:
    """A red or blue square at a random place on a random grey."""
    grey = rng.randint(90, 160)
    image = Image.new("RGB", (32, 32), (grey, grey, grey))
    x, y, size = rng.randint(0, 20), rng.randint(0, 20), rng.randint(8, 12)
    ImageDraw.Draw(image).rectangle([x, y, x + size, y + size], fill=COLOURS[colour])
    return image


def two_samples() -> list[Sample]:
    rng = random.Random(0)
    return [
        Sample(
            [Turn("user", "Look: <image> and <image>"), Turn("assistant", "red and blue")],
            images=[square("red", rng), square("blue", rng)],
        ),
        Sample([Turn("user", QUESTION), Turn("assistant", "blue")], images=[square("blue", rng)]),
    ]


def test_fusion_scatters_projected_features_exactly_into_the_slots(tok) -> None:
    model = build(tok).eval()
    batch = model.processor()(two_samples())
    assert batch.images.shape == (3, 3, 32, 32)
    with torch.no_grad():
        fused = model.embed(batch)  # (B, T, C)
        feats = model.projectors["image"](model.encoders["image"](batch.images))  # (3, 16, C)
        expected = model.gpt.get_input_embeddings()(batch.input_ids).clone()
        for i, (row, start) in enumerate(batch.image_positions.tolist()):
            for k in range(feats.size(1)):
                expected[row, start + k] = feats[i, k]
        torch.testing.assert_close(fused, expected, rtol=0, atol=0)
        # forward(batch) == the decoder on those embeddings; ids + images give the same
        ref = model.gpt(inputs_embeds=expected, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(model(batch).logits, ref, rtol=0, atol=0)
        by_tensors = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            images=batch.images,
            image_positions=batch.image_positions,
        )
        torch.testing.assert_close(by_tensors.logits, ref, rtol=0, atol=0)


def test_embed_rejects_inconsistent_batches(tok) -> None:
    model = build(tok)
    batch = model.processor()(two_samples())
    shifted = batch.to("cpu")
    shifted.image_positions = batch.image_positions + torch.tensor([0, 1])
    with pytest.raises(ValueError, match="do not point at image slots"):
        model.embed(shifted)
    missing = batch.to("cpu")
    missing.images, missing.image_positions = None, torch.zeros(0, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"48 image slot\(s\) but no image inputs"):
        model.embed(missing)
    fewer = batch.to("cpu")
    fewer.images, fewer.image_positions = batch.images[:2], batch.image_positions[:2]
    with pytest.raises(ValueError, match=r"48 image slots, but 2 item\(s\) × 16 tokens"):
        model.embed(fewer)


def test_components_must_fit_together(tok) -> None:
    with pytest.raises(ValueError, match=r"vocabulary \(100\) does not cover the tokenizer's"):
        build(tok, vocab_size=100)
    model = build(tok)
    with pytest.raises(ValueError, match="projector for 'image' maps 10 → 48"):
        MultimodalGPT(
            model.gpt, tok, {"image": model.encoders["image"]}, {"image": LinearProjector(10, 48)}
        )
    with pytest.raises(ValueError, match="needs a projector"):
        MultimodalGPT(model.gpt, tok, {"image": model.encoders["image"]}, {})


def _loss(model: MultimodalGPT, batch) -> torch.Tensor:
    logits = model(batch).logits  # labels are aligned with input_ids: predict t + 1 from t
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def test_training_stages_route_gradients(tok) -> None:
    model = build(tok).trainable("projector")  # LLaVA stage 1
    model.train()
    encoder = model.encoders["image"]
    assert encoder.frozen and not encoder.model.training  # stays in eval inside .train()
    batch = model.processor()(two_samples())
    _loss(model, batch).backward()
    proj = list(model.projectors.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj)
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.gpt.parameters())

    model.zero_grad(set_to_none=True)
    model.trainable("projector+gpt+encoder")  # stage 2, encoder unfrozen too
    assert not encoder.frozen and encoder.model.training
    _loss(model, batch).backward()
    for part in (model.gpt, encoder, model.projectors):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    model.freeze("gpt")
    assert not any(p.requires_grad for p in model.gpt.parameters())
    assert all(p.requires_grad for p in model.projectors.parameters())
    with pytest.raises(ValueError, match="unknown model part 'vision'"):
        model.freeze("vision")


def test_save_and_load_give_identical_logits(tok, tmp_path) -> None:
    from safetensors import safe_open

    model = build(tok, encoder_kwargs={"feature_layer": -2, "pool": "avg", "frozen": True})
    with torch.no_grad():  # a non-zero bias everywhere, so a missed tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batch = model.processor()(two_samples())
    model.eval()
    expected = model(batch).logits
    model.save_pretrained(tmp_path / "m")

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture"] == "multimodal"
    assert config["tokenizer"]["name"] == "bpe"
    assert config["encoders"]["image"]["name"] == "vit"
    assert config["encoders"]["image"]["config"]["pool"] == "avg"
    assert config["projectors"]["image"] == {
        "name": "mlp2x_gelu",
        "config": {"in_dim": 64, "out_dim": 48, "depth": 2},
    }
    assert "image_decoder" not in config
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "gpt.lm_head.weight" not in keys  # tied to gpt.transformer.wte.weight
    assert {"gpt.transformer.wte.weight", "projectors.image.0.weight"} <= keys
    assert any(k.startswith("encoders.image.model.blocks.") for k in keys)
    assert (tmp_path / "m" / "tokenizer.json").is_file()

    loaded = MultimodalGPT.from_pretrained(tmp_path / "m").eval()
    assert loaded.encoders["image"].frozen
    assert loaded.tokenizer.encode("What colour?") == tok.encode("What colour?")
    torch.testing.assert_close(loaded(batch).logits, expected, rtol=0, atol=0)
    assert loaded.gpt.lm_head.weight is loaded.gpt.transformer.wte.weight

    model.gpt.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="architecture is 'gpt'.*GPT.from_pretrained"):
        MultimodalGPT.from_pretrained(tmp_path / "plain")


class MeanColourEncoder(nn.Module):
    """A third-party style encoder: per-image mean colour → ``num_tokens`` learned vectors."""

    modality = "image"

    def __init__(self, num_tokens: int = 2, output_dim: int = 8) -> None:
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Linear(3, num_tokens * output_dim)

    def preprocess(self, items):
        return torch.stack(
            [
                torch.tensor(im.convert("RGB").resize((4, 4)).getdata()).float().T / 255
                for im in items
            ]
        ).reshape(len(items), 3, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3))).view(-1, self.num_tokens, self.output_dim)

    def config_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "output_dim": self.output_dim}


def test_a_third_party_encoder_round_trips_through_the_registry(tok, tmp_path) -> None:
    registry.register("encoder", "test-mean-colour", MeanColourEncoder)
    try:
        model = build(tok, encoder="test-mean-colour", encoder_kwargs={"num_tokens": 3})
        model.projectors["image"] = LinearProjector(8, 48)  # swap in another registered one
        model.component_names.pop("projectors.image")  # found by its registered class
        batch = model.processor()(two_samples())
        assert batch.input_ids.eq(tok.image_token_id).sum() == 3 * 3
        expected = model.eval()(batch).logits
        model.save_pretrained(tmp_path / "m")
        loaded = MultimodalGPT.from_pretrained(tmp_path / "m").eval()
        assert isinstance(loaded.encoders["image"], MeanColourEncoder)
        assert isinstance(loaded.projectors["image"], LinearProjector)
        torch.testing.assert_close(loaded(batch).logits, expected, rtol=0, atol=0)
    finally:
        registry.REGISTRY.unregister("encoder", "test-mean-colour")

    unregistered = MultimodalGPT(
        model.gpt, tok, {"image": MeanColourEncoder()}, {"image": LinearProjector(8, 48)}
    )
    with pytest.raises(ValueError, match=r"cannot save encoders\.image .*not a registered encoder"):
        unregistered.save_pretrained(tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing half-written


def _greedy_without_cache(model: MultimodalGPT, prompt, images, steps: int) -> list[int]:
    embeds, _ = model.prepare_prompts([prompt], [images])  # (1, T, C)
    wte = model.gpt.get_input_embeddings()
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([new], dtype=torch.long)
            x = torch.cat([embeds, wte(ids)], dim=1)  # full recomputation every step
            nxt = int(model.gpt(inputs_embeds=x).logits[0, -1].argmax())
            if nxt == model.tokenizer.eos_id:
                break
            new.append(nxt)
    return new


def test_generation_with_an_image_uses_the_cache_and_matches_uncached(tok) -> None:
    model = build(tok).eval()
    rng = random.Random(1)
    prompt = [Turn("user", QUESTION)]
    image = [square("red", rng)]
    calls: list[tuple[str, int, bool]] = []
    forward = model.gpt.forward

    def spy(*args, **kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        kind = "ids" if kwargs.get("inputs_embeds") is None else "embeds"
        calls.append((kind, x.size(1), kwargs.get("past_key_values") is not None))
        return forward(*args, **kwargs)

    model.gpt.forward = spy
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    out = model.generate([prompt], [image], config)
    del model.gpt.forward
    steps = len(out.tokens[0])
    assert steps > 0
    assert calls[0][0] == "embeds" and calls[0][1] > 16  # one prefill with the fused image
    assert all(c == ("ids", 1, True) for c in calls[1:])  # then one cached token per step
    assert out.tokens[0] == _greedy_without_cache(model, prompt, image, 8)[:steps]

    # the text methods agree with the token path; the image changes what the model sees
    text = model.generate_text(prompt, image, config)
    assert text == "".join(model.stream_text(prompt, image, config)) == out.texts[0]
    blue_embeds, _ = model.prepare_prompts([prompt], [[square("blue", rng)]])
    red_embeds, _ = model.prepare_prompts([prompt], [image])
    assert not torch.equal(blue_embeds, red_embeds)


def test_batched_left_padded_generation_equals_one_by_one(tok) -> None:
    model = build(tok).eval()
    rng = random.Random(2)
    prompts = [[Turn("user", "Look: <image> and <image> here")], [Turn("user", QUESTION)]]
    images = [[square("red", rng), square("blue", rng)], [square("blue", rng)]]
    config = GenerationConfig(max_new_tokens=6, temperature=0)
    together = model.generate(prompts, images, config).tokens
    alone = [model.generate([p], [im], config).tokens[0] for p, im in zip(prompts, images)]
    assert together == alone


def test_learns_to_tell_two_colours_apart_from_the_image(tok) -> None:
    """The prompt text is the same for both answers: only the image can decide."""
    torch.manual_seed(0)
    model = build(tok, encoder_kwargs={"pool": "avg"}, block_size=64)  # 4 image tokens
    processor = model.processor()
    rng = random.Random(0)

    def sample(colour: str) -> Sample:
        return Sample(
            [Turn("user", QUESTION), Turn("assistant", colour)], images=[square(colour, rng)]
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        batch = processor([sample(rng.choice(["red", "blue"])) for _ in range(16)])
        loss = _loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    answers = ["red", "blue"] * 12
    test = [sample(c) for c in answers]
    batch = processor(test)
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits
    # loss of the colour token alone: a text-only model cannot beat ln 2 ≈ 0.69
    first = (batch.labels != IGNORE_INDEX).int().argmax(dim=1)  # first learned position
    rows = torch.arange(len(test))
    colour_loss = F.cross_entropy(logits[rows, first - 1], batch.labels[rows, first])
    assert colour_loss < 0.35  # half the text-only floor
    out = model.generate(
        [s.conversation[:1] for s in test],
        [s.images for s in test],
        GenerationConfig(max_new_tokens=4, temperature=0),
    )
    accuracy = sum(t == a for t, a in zip(out.texts, answers)) / len(answers)
    assert accuracy >= 0.9, out.texts


def test_build_accepts_configs_and_the_processor_follows_the_model(tok) -> None:
    config = gpt_config("gpt-nano", vocab_size=tok.vocab_size, block_size=80)
    a = MultimodalGPT.build(config, tok, projector="linear")
    b = MultimodalGPT.build(config.to_dict(), tok, encoder=None)
    c = MultimodalGPT.build(GPT(config), tok)
    assert isinstance(a.projectors["image"], LinearProjector)
    assert len(b.encoders) == 0 and c.config is c.gpt.config
    processor = a.processor()
    assert processor.max_length == 80 and processor.num_image_tokens == 16


def test_image_decoder_slots_round_trip(tok, tmp_path) -> None:
    pytest.importorskip("diffusers")
    if "diffusion" not in registry.names("decoder"):
        pytest.skip("the diffusion decoder plugin is not installed")
    model = build(
        tok,
        image_decoder="diffusion",
        image_decoder_kwargs={"condition_dim": 16, "num_condition_tokens": 2, "image_size": 16},
        output_projector="signal_mlp",
    )
    proj = model.output_projector
    assert (proj.in_dim, proj.out_dim) == (48, 16)  # n_embd → the decoder's condition_dim
    sample = Sample(
        [Turn("user", "Draw a red square."), Turn("assistant", "<image_out>")],
        output_images=[square("red", random.Random(0))],
    )
    batch = model.processor()(sample)
    assert batch.output_images.shape == (1, 3, 16, 16)  # the decoder's own preprocessing
    assert batch.signal_positions.shape == (1, 2)

    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["image_decoder"]["name"] == "diffusion"
    assert config["output_projector"]["name"] == "signal_mlp"
    loaded = MultimodalGPT.from_pretrained(tmp_path / "m")
    assert type(loaded.image_decoder) is type(model.image_decoder)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
