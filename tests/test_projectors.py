"""Projectors "linear", "mlp2x_gelu" and "pixel_shuffle": registry, math, LLaVA parameter
names, token reduction through the model and its processor, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmgpt.interfaces import Projector
from mmgpt.projectors import LinearProjector, MLPProjector, PixelShuffleProjector
from mmgpt.registry import create
from mmgpt.testing import check_entry


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_registered_and_conform(name: str) -> None:
    proj = create("projector", name, in_dim=5, out_dim=7)
    assert isinstance(proj, Projector)
    assert (proj.in_dim, proj.out_dim) == (5, 7)
    assert proj(torch.randn(2, 3, 5)).shape == (2, 3, 7)
    check_entry("projector", name)
    again = create("projector", name, **proj.config_dict())
    again.load_state_dict(proj.state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(again(x), proj(x))


def test_mlp2x_gelu_is_linear_gelu_linear_with_llava_names() -> None:
    proj = MLPProjector(in_dim=6, out_dim=4)
    # LLaVA-1.5's mm_projector: Sequential(Linear, GELU, Linear) → keys 0.* and 2.*
    assert sorted(proj.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert proj[0].weight.shape == (4, 6) and proj[2].weight.shape == (4, 4)
    x = torch.randn(3, 6)
    sd = proj.state_dict()
    expected = F.linear(
        F.gelu(F.linear(x, sd["0.weight"], sd["0.bias"])), sd["2.weight"], sd["2.bias"]
    )
    torch.testing.assert_close(proj(x), expected)
    assert len(MLPProjector(6, 4, depth=3)) == 5  # mlp3x_gelu shape


def test_linear_is_one_affine_map() -> None:
    proj = LinearProjector(in_dim=6, out_dim=4)
    assert sorted(proj.state_dict()) == ["bias", "weight"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(proj(x), x @ proj.weight.T + proj.bias)
    assert LinearProjector(6, 4, bias=False).bias is None


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_dims_raise(name: str, bad) -> None:
    with pytest.raises(ValueError, match=f"projector '{name}': in_dim must be a positive integer"):
        create("projector", name, in_dim=bad, out_dim=4)


def test_mlp2x_gelu_without_bias() -> None:
    proj = MLPProjector(in_dim=6, out_dim=4, bias=False)
    assert sorted(proj.state_dict()) == ["0.weight", "2.weight"]
    assert proj.config_dict() == {"in_dim": 6, "out_dim": 4, "depth": 2, "bias": False}
    assert "bias" not in MLPProjector(6, 4).config_dict()  # saved configs stay as they were
    assert sorted(create("projector", "mlp2x_gelu", **proj.config_dict()).state_dict()) == [
        "0.weight",
        "2.weight",
    ]


# -- pixel_shuffle -----------------------------------------------------------------------------
def reference_pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """Token by token: output token (i, j) is the s x s neighbourhood of patches
    (i*s + dy, j*s + dx), their features concatenated row by row (dy, then dx)."""
    n, tokens, dim = x.shape
    side = int(tokens**0.5)
    grid = x.reshape(n, side, side, dim)
    out = torch.empty(n, (side // s) ** 2, s * s * dim)
    for i in range(side // s):
        for j in range(side // s):
            parts = [grid[:, i * s + dy, j * s + dx] for dy in range(s) for dx in range(s)]
            out[:, i * (side // s) + j] = torch.cat(parts, dim=-1)
    return out


def idefics3_pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """Idefics3's formulation (transformers' Idefics3Connector.pixel_shuffle)."""
    bsz, seq, dim = x.size()
    height = width = int(seq**0.5)
    x = x.view(bsz, height, width, dim)
    x = x.view(bsz, height, width // s, dim * s)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(bsz, width // s, height // s, dim * s * s)
    x = x.permute(0, 2, 1, 3)
    return x.reshape(bsz, seq // (s * s), dim * s * s)


@pytest.mark.parametrize(("tokens", "scale"), [(16, 2), (36, 3), (64, 4), (36, 2)])
def test_pixel_shuffle_matches_the_reference_reshape(tokens: int, scale: int) -> None:
    torch.manual_seed(0)
    proj = PixelShuffleProjector(in_dim=5, out_dim=7, num_tokens=tokens, scale_factor=scale)
    x = torch.randn(3, tokens, 5)
    shuffled = proj.pixel_shuffle(x)
    expected = reference_pixel_shuffle(x, scale)
    torch.testing.assert_close(shuffled, expected, rtol=0, atol=0)
    torch.testing.assert_close(idefics3_pixel_shuffle(x, scale), expected, rtol=0, atol=0)
    # then one linear map, without bias (nanoVLM's and Idefics3's modality projection)
    assert sorted(proj.state_dict()) == ["proj.0.weight"]
    torch.testing.assert_close(proj(x), expected @ proj.proj[0].weight.T)
    assert proj(x).shape == (3, tokens // scale**2, 7)
    assert proj.output_tokens(tokens) == tokens // scale**2


def test_pixel_shuffle_conforms_and_round_trips() -> None:
    check_entry("projector", "pixel_shuffle")
    proj = create("projector", "pixel_shuffle", in_dim=4, out_dim=6, num_tokens=16, depth=2)
    assert isinstance(proj, Projector)
    assert [type(m).__name__ for m in proj.proj] == ["Linear", "GELU", "Linear"]
    again = create("projector", "pixel_shuffle", **proj.config_dict())
    again.load_state_dict(proj.state_dict())
    x = torch.randn(2, 16, 4)
    torch.testing.assert_close(again(x), proj(x))


def test_pixel_shuffle_errors() -> None:
    with pytest.raises(ValueError, match="17 tokens are not a square grid"):
        PixelShuffleProjector(in_dim=4, out_dim=6, num_tokens=17)  # a class token in front
    with pytest.raises(ValueError, match="36 tokens are not a square grid .* scale_factor=4"):
        PixelShuffleProjector(in_dim=4, out_dim=6, num_tokens=36, scale_factor=4)
    proj = PixelShuffleProjector(in_dim=4, out_dim=6, num_tokens=16)
    with pytest.raises(ValueError, match="built for 16 tokens per item, got input of shape"):
        proj(torch.randn(2, 64, 4))
    with pytest.raises(ValueError, match="built for 16 tokens per item, the encoder gives 64"):
        proj.output_tokens(64)
    with pytest.raises(ValueError, match="scale_factor must be a positive integer"):
        PixelShuffleProjector(in_dim=4, out_dim=6, num_tokens=16, scale_factor=0)


def test_the_model_and_its_processor_use_the_projected_token_count(tmp_path) -> None:
    """A pixel-shuffle projector turns the ViT's 16 patch tokens into 4: each "<image>"
    becomes 4 slots, filled with the projector's 4 tokens; the model saves and loads."""
    pytest.importorskip("timm")
    mmgpt_text = pytest.importorskip("mmgpt_text")
    from PIL import Image

    from mmgpt.data.sample import Sample, Turn
    from mmgpt.multimodal import MultimodalGPT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("User: What colour is the square?\nAssistant: a red square\n" * 20)
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300)
    torch.manual_seed(0)
    model = MultimodalGPT.build(
        "gpt-nano", tok, projector="pixel_shuffle", projector_kwargs={"depth": 2}
    ).eval()
    assert model.encoders["image"].num_tokens == 16
    assert model.projectors["image"].num_tokens == 16  # build passed the encoder's count
    assert model.num_slots("image") == 4
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (40, 20), (9, 9, 250))]
    samples = [
        Sample(
            [Turn("user", "<image> and <image>?"), Turn("assistant", "a red square")],
            images=images,
        )
    ]
    batch = model.processor()(samples)
    assert int((batch.input_ids == tok.image_token_id).sum()) == 8  # 2 images x 4 slots
    with torch.no_grad():
        fused = model.embed(batch)
        feats = model.encode("image", batch.images)  # (2, 4, C)
        assert feats.shape == (2, 4, model.config.n_embd)
        for i, (row, start) in enumerate(batch.image_positions.tolist()):
            torch.testing.assert_close(fused[row, start : start + 4], feats[i], rtol=0, atol=0)
        expected = model(batch).logits
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalGPT.from_pretrained(tmp_path / "m")
    assert loaded.num_slots("image") == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, expected, rtol=0, atol=0)
    # a processor built for the encoder alone would expand 16 slots: the features do not fit
    wrong = MultimodalGPT.processor(model, slot_counts={"image": 16})(samples)
    with pytest.raises(ValueError, match="32 image slots, but 2 item"):
        model.embed(wrong)
