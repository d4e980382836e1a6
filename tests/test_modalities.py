"""Modalities beyond images: placeholders from the encoders, shared slot id, per-modality
positions, fusion of several modalities, checkpoints and generation with ``inputs``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from mmgpt import registry
from mmgpt.config import gpt_config
from mmgpt.data.sample import Sample, Turn
from mmgpt.generation import GenerationConfig
from mmgpt.model import GPT
from mmgpt.multimodal import MultimodalGPT
from mmgpt.processor import IGNORE_INDEX, MultimodalBatch, MultimodalProcessor
from mmgpt.projectors import LinearProjector

mmgpt_text = pytest.importorskip("mmgpt_text")

CORPUS = ("User: Listen and look.\nAssistant: a beep and a red square\n") * 20


class BeepEncoder(nn.Module):
    """A test modality: a 1-D signal of 6 samples → ``num_tokens`` vectors."""

    modality = "beep"
    placeholder = "<beep>"

    def __init__(self, num_tokens: int = 2, output_dim: int = 8) -> None:
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Linear(6, num_tokens * output_dim)

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in items])  # (N, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).view(-1, self.num_tokens, self.output_dim)

    def config_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "output_dim": self.output_dim}


class GreyEncoder(nn.Module):
    """A test image encoder: an image's first pixel → ``num_tokens`` vectors (no timm)."""

    modality = "image"

    def __init__(self, num_tokens: int = 3, output_dim: int = 8) -> None:
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Linear(1, num_tokens * output_dim)

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        return torch.tensor([[float(im.getpixel((0, 0))[0]) / 255] for im in items])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).view(-1, self.num_tokens, self.output_dim)

    def config_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "output_dim": self.output_dim}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=300, num_signal_tokens=2)


@pytest.fixture
def registered():
    registry.register("encoder", "test-beep", BeepEncoder)
    registry.register("encoder", "test-grey", GreyEncoder)
    yield
    registry.REGISTRY.unregister("encoder", "test-beep")
    registry.REGISTRY.unregister("encoder", "test-grey")


def image(value: int):
    from PIL import Image

    return Image.new("RGB", (4, 4), (value, value, value))


def beep(value: float) -> torch.Tensor:
    return torch.full((6,), value)


def model_for(tok) -> MultimodalGPT:
    torch.manual_seed(0)
    gpt = GPT(gpt_config("gpt-nano", vocab_size=tok.vocab_size, block_size=64))
    encoders = {"image": GreyEncoder(), "beep": BeepEncoder()}
    projectors = {m: LinearProjector(8, gpt.config.n_embd) for m in encoders}
    return MultimodalGPT(gpt, tok, encoders, projectors)


def mixed_samples() -> list[Sample]:
    return [
        Sample(
            [Turn("user", "A <beep> B <image> C <beep>"), Turn("assistant", "a beep")],
            images=[image(10)],
            inputs={"beep": [beep(1.0), beep(2.0)]},
        ),
        Sample([Turn("user", "<image> only"), Turn("assistant", "red")], images=[image(20)]),
    ]


def test_placeholders_expand_into_shared_slots_with_per_modality_positions(tok) -> None:
    proc = MultimodalProcessor(tok, {"image": GreyEncoder(), "beep": BeepEncoder()})
    batch = proc(mixed_samples())
    e, slot = tok.encode, tok.image_token_id
    ids = batch.input_ids[0].tolist()
    expected = [tok.bos_id, *e("User: A "), *[slot] * 2, *e(" B "), *[slot] * 3, *e(" C ")]
    expected += [slot] * 2
    assert ids[: len(expected)] == expected
    first_beep = 1 + len(e("User: A "))
    first_image = first_beep + 2 + len(e(" B "))
    second_beep = first_image + 3 + len(e(" C "))
    assert batch.modality_positions["beep"].tolist() == [[0, first_beep], [0, second_beep]]
    assert batch.image_positions.tolist() == [[0, first_image], [1, 1 + len(e("User: "))]]
    assert batch.modality_inputs["beep"][:, 0].tolist() == [1.0, 2.0]
    assert (batch.images * 255).round().tolist() == [[10.0], [20.0]]
    assert (batch.labels[batch.input_ids == slot] == IGNORE_INDEX).all()
    assert int((batch.input_ids == slot).sum()) == 2 * 2 + 2 * 3  # 2 beeps, 2 images
    assert tok.token_to_id("<beep>") is None  # the tokenizer needs no token for it


def test_counts_unknown_modalities_and_bad_placeholders_are_errors(tok) -> None:
    proc = MultimodalProcessor(tok, BeepEncoder())  # one encoder: keyed by its modality
    assert set(proc.modalities) == {"beep"}
    bad = Sample(
        [Turn("user", "<beep> <beep>"), Turn("assistant", "x")],
        inputs={"beep": [beep(1.0)]},
        meta={"source": "beeps.jsonl", "line": 4},
    )
    with pytest.raises(
        ValueError, match=r"beeps\.jsonl:4: .*2 '<beep>' placeholder\(s\) but 1 beep"
    ):
        proc([bad])
    text_only = MultimodalProcessor(tok)
    sample = Sample([Turn("user", "<beep>"), Turn("assistant", "x")], inputs={"beep": [beep(1)]})
    with pytest.raises(
        ValueError, match="has 'beep' inputs but the processor has no 'beep' encoder"
    ):
        text_only([sample])

    class Clash(BeepEncoder):
        placeholder = "<image>"

    with pytest.raises(ValueError, match="placeholders must be distinct"):
        MultimodalProcessor(tok, {"beep": Clash()})

    class Custom(BeepEncoder):
        placeholder = "[sound]"  # any text works: no token is needed for it

    custom = MultimodalProcessor(tok, {"beep": Custom()})
    batch = custom(
        Sample([Turn("user", "hear [sound]"), Turn("assistant", "x")], inputs={"beep": [beep(3)]})
    )
    assert batch.modality_inputs["beep"].shape == (1, 6)
    assert int((batch.input_ids == tok.image_token_id).sum()) == 2
    with pytest.raises(ValueError, match=r"Sample.inputs\['image'\]"):
        Sample([Turn("user", "x")], inputs={"image": []})
    with pytest.raises(TypeError, match=r"Sample.inputs\['beep'\] must be a list"):
        Sample([Turn("user", "x")], inputs={"beep": beep(1)})


def test_padding_and_truncation_keep_spans_whole(tok) -> None:
    encoders = {"image": GreyEncoder(), "beep": BeepEncoder()}
    sample = mixed_samples()[0]
    full = MultimodalProcessor(tok, encoders)([sample])
    left = MultimodalProcessor(tok, encoders, padding_side="left")(mixed_samples())
    pad = left.input_ids.size(1) - full.input_ids.size(1)
    assert left.modality_positions["beep"][:, 1].tolist() == [
        p + pad for p in full.modality_positions["beep"][:, 1].tolist()
    ]
    second = full.modality_positions["beep"][1, 1].item()
    cut = MultimodalProcessor(tok, encoders, max_length=second + 1, truncation=True)([sample])
    assert cut.input_ids.size(1) == second  # the second beep goes whole, with its input
    assert cut.modality_positions["beep"].tolist() == full.modality_positions["beep"][:1].tolist()
    assert cut.modality_inputs["beep"].shape == (1, 6) and cut.images.shape[0] == 1
    moved = full.to("cpu")
    assert torch.equal(moved.modality_inputs["beep"], full.modality_inputs["beep"])
    with pytest.raises(ValueError, match="images go in images"):
        MultimodalBatch(
            full.input_ids,
            full.attention_mask,
            modality_inputs={"image": full.images},
            modality_positions={"image": full.image_positions},
        )


def test_fusion_fills_every_modality_slot_with_its_own_features(tok) -> None:
    model = model_for(tok).eval()
    batch = model.processor()(mixed_samples())
    with torch.no_grad():
        fused = model.embed(batch)
        expected = model.gpt.get_input_embeddings()(batch.input_ids).clone()
        for modality, (inputs, positions) in batch.fusion_inputs().items():
            feats = model.encode(modality, inputs)
            for i, (row, start) in enumerate(positions.tolist()):
                expected[row, start : start + feats.size(1)] = feats[i]
        torch.testing.assert_close(fused, expected, rtol=0, atol=0)
        by_tensors = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            images=batch.images,
            image_positions=batch.image_positions,
            modality_inputs=batch.modality_inputs,
            modality_positions=batch.modality_positions,
        ).logits
        torch.testing.assert_close(by_tensors, model(batch).logits, rtol=0, atol=0)

    missing = batch.to("cpu")
    missing.modality_inputs, missing.modality_positions = {}, {}
    with pytest.raises(ValueError, match=r"10 image slots, but 2 item\(s\) × 3 tokens = 6"):
        model.embed(missing)
    overlap = batch.to("cpu")
    overlap.modality_positions = {"beep": batch.image_positions[:1].repeat(2, 1)}
    with pytest.raises(ValueError, match="overlap"):
        model.embed(overlap)
    shifted = batch.to("cpu")
    shifted.modality_positions = {"beep": batch.modality_positions["beep"] - torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="beep_positions do not point at beep slots"):
        model.embed(shifted)


def test_a_non_image_modality_round_trips_and_generates(tok, tmp_path, registered) -> None:
    model = model_for(tok)
    model.component_names.update({"encoders.image": "test-grey", "encoders.beep": "test-beep"})
    model.eval()
    batch = model.processor()(mixed_samples())
    with torch.no_grad():
        expected = model(batch).logits
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalGPT.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded.encoders["beep"], BeepEncoder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, expected, rtol=0, atol=0)

    config = GenerationConfig(max_new_tokens=5, temperature=0)
    prompts = [[Turn("user", "A <beep> B")], [Turn("user", "<image> <beep>")]]
    images = [[], [image(30)]]
    inputs = [{"beep": [beep(1.0)]}, {"beep": [beep(-1.0)]}]
    together = loaded.generate(prompts, images, config, inputs=inputs).tokens
    alone = [
        loaded.generate([p], [im], config, inputs=[x]).tokens[0]
        for p, im, x in zip(prompts, images, inputs)
    ]
    assert together == alone
    text = loaded.generate_text(prompts[0], (), config, inputs=inputs[0])
    assert text == loaded.generate(prompts[:1], None, config, inputs=inputs[:1]).texts[0]
    louder, _ = loaded.prepare_prompts(prompts[:1], None, [{"beep": [beep(5.0)]}])
    quieter, _ = loaded.prepare_prompts(prompts[:1], None, inputs[:1])
    assert not torch.equal(louder, quieter)  # the signal reaches the decoder
    with pytest.raises(ValueError, match=r"1 '<beep>' placeholder\(s\) but 0 beep"):
        loaded.generate(prompts[:1], None, config)
