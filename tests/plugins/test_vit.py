"""The "vit" image encoder: parity with timm, weight loading, tokens, preprocessing, freezing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")

from mmgpt.interfaces import ModalityEncoder  # noqa: E402
from mmgpt.registry import create, get  # noqa: E402
from mmgpt.testing import check_encoder, check_entry  # noqa: E402
from mmgpt_vit import ViTEncoder  # noqa: E402

# A real timm architecture, shrunk so it runs in milliseconds (no download: random init).
NAMED = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _timm_named(**kwargs) -> torch.nn.Module:
    kw = {k: v for k, v in NAMED.items() if k != "name"}
    return timm.create_model(NAMED["name"], pretrained=False, **{**kw, **kwargs}).eval()


def test_registered_and_conforms() -> None:
    assert get("encoder", "vit") is ViTEncoder
    enc = create("encoder", "vit")
    assert isinstance(enc, ModalityEncoder)
    assert (enc.modality, enc.num_tokens, enc.output_dim) == ("image", 16, 64)
    check_entry("encoder", "vit")


@pytest.mark.parametrize("include_prefix", [False, True])
def test_final_features_equal_timm_forward_features(include_prefix: bool) -> None:
    enc = ViTEncoder(**NAMED, include_prefix_tokens=include_prefix).eval()
    x = _images()
    with torch.no_grad():
        ours = enc(x)
        theirs = enc.model.forward_features(x)  # (N, 1 + 16, 192), after the final norm
    if not include_prefix:
        theirs = theirs[:, 1:]
    assert ours.shape == (3, enc.num_tokens, enc.output_dim) == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_penultimate_layer_equals_block_output_from_a_hook() -> None:
    enc = ViTEncoder(**NAMED, feature_layer=-2).eval()
    captured = {}
    handle = enc.model.blocks[-2].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("x", out)
    )
    x = _images()
    with torch.no_grad():
        enc.model.forward_features(x)  # the reference pass fills the hook
        handle.remove()
        ours = enc(x)
    torch.testing.assert_close(ours, captured["x"][:, 1:], rtol=0, atol=0)
    assert not enc.feature_norm  # raw residual stream, as LLaVA reads hidden_states[-2]
    normed = ViTEncoder(**NAMED, feature_layer=-2, feature_norm=True).eval()
    normed.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(normed(x), enc.model.norm(captured["x"])[:, 1:])


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_timm_state_dict_loads_with_identical_outputs(tmp_path, suffix: str) -> None:
    from safetensors.torch import save_file

    # saved by timm with a classifier head: the head is dropped, everything else must match
    reference = _timm_named(num_classes=10)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    enc = ViTEncoder(**NAMED, pretrained_path=path, include_prefix_tokens=True).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), reference.forward_features(x), rtol=0, atol=0)


def test_custom_configuration_loads_a_local_file(tmp_path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).eval()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": ref.state_dict()}, path)  # a training checkpoint layout
    enc = ViTEncoder("vit_tiny_custom", pretrained_path=path).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref.forward_features(x)[:, 1:], rtol=0, atol=0)

    other = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: .*shape"):
        ViTEncoder("vit_tiny_custom", pretrained_path=tmp_path / "bad.pth")


def test_pooling_reduces_tokens_exactly() -> None:
    plain = ViTEncoder().eval()  # 4x4 grid of 64-d tokens
    avg = ViTEncoder(pool="avg").eval()
    shuffle = ViTEncoder(pool="pixel_shuffle").eval()
    for enc in (avg, shuffle):
        enc.load_state_dict(plain.state_dict())
    assert (avg.num_tokens, avg.output_dim) == (4, 64)
    assert (shuffle.num_tokens, shuffle.output_dim) == (4, 256)
    x = _images(2)
    with torch.no_grad():
        grid = plain(x).reshape(2, 4, 4, 64)  # (N, H, W, D), row-major patches
        a, s = avg(x), shuffle(x)
    assert a.shape == (2, 4, 64) and s.shape == (2, 4, 256)
    # output token 1 covers patch rows 0-1, columns 2-3
    block = grid[:, 0:2, 2:4]  # (N, 2, 2, D)
    torch.testing.assert_close(a[:, 1], block.mean(dim=(1, 2)))
    torch.testing.assert_close(s[:, 1], block.reshape(2, 4 * 64))
    with_cls = ViTEncoder(pool="avg", include_prefix_tokens=True)
    assert with_cls.num_tokens == 5 and with_cls(x).shape == (2, 5, 64)


def test_preprocess_matches_timm_transform_and_accepts_any_mode() -> None:
    enc = ViTEncoder(**NAMED)
    assert enc.input_size == (3, 32, 32)  # follows img_size, not the pretrained 224
    assert enc.data_config["mean"] == (0.5, 0.5, 0.5)  # from the model's pretrained config
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    config = timm.data.resolve_data_config({}, model=enc.model)
    config["input_size"] = (3, 32, 32)
    expected = timm.data.create_transform(**config)(rgb)
    torch.testing.assert_close(enc.preprocess([rgb])[0], expected)

    gray = Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8))
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    palette = Image.new("P", (32, 32), 3)
    deep = Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))
    batch = enc.preprocess([rgb, gray, clear, palette, deep, np.asarray(rgb)])
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[2], torch.ones(3, 32, 32))  # composited over white
    torch.testing.assert_close(batch[5], batch[0])  # numpy array == the same PIL image
    assert torch.allclose(batch[1][0], batch[1][1])  # gray: equal channels
    assert 0.0 < float(batch[4].mean()) < 1.0  # 16-bit scaled, not saturated
    # preprocessed tensors pass through; wrong-size tensors are refused
    torch.testing.assert_close(enc.preprocess([batch[0]])[0], batch[0])
    with pytest.raises(ValueError, match=r"image 0 .*shape"):
        enc.preprocess([torch.zeros(3, 16, 16)])
    with pytest.raises(TypeError, match="image 1"):
        enc.preprocess([rgb, 42])


def test_custom_preprocessing_keeps_the_whole_image() -> None:
    enc = ViTEncoder()  # crop_pct=1: a 32x32 image is not cropped
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    x = enc.preprocess([img])[0]
    assert float(x[0, 0, 0]) == pytest.approx(1.0)  # corner pixel survives, in [-1, 1]
    assert float(x[0, 5, 5]) == pytest.approx(-1.0)


def test_frozen_encoder_has_no_grads_and_stays_in_eval_mode() -> None:
    enc = ViTEncoder(frozen=True, drop_rate=0.5, drop_path_rate=0.5)
    torch.nn.ModuleDict({"enc": enc}).train()  # a parent switching to training mode
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    x = _images(2)
    out1, out2 = enc(x), enc(x)
    torch.testing.assert_close(out1, out2)  # no dropout although the parent is training
    assert not out1.requires_grad
    enc.frozen = False
    assert enc.model.training and all(p.requires_grad for p in enc.parameters())
    assert enc(x).requires_grad


def test_config_dict_round_trips_through_the_registry() -> None:
    enc = ViTEncoder(**NAMED, feature_layer=-2, pool="avg", data_config={"crop_pct": 1.0})
    config = json.loads(json.dumps(enc.config_dict()))  # JSON, as config.json stores it
    assert "pretrained_path" not in config and "pretrained" not in config
    again = create("encoder", "vit", **config)
    again.load_state_dict(enc.state_dict())
    assert again.data_config == enc.data_config
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), enc.eval()(x), rtol=0, atol=0)


def test_penultimate_pixel_shuffle_conforms() -> None:
    enc = ViTEncoder(**NAMED, feature_layer=-2, pool="pixel_shuffle")
    # blocks after the feature layer and the final norm are never run
    check_encoder(enc, allow_unused=("model.blocks.2.", "model.norm."))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"feature_layer": 2}, ValueError, r"feature_layer=2 .* 2-block"),
        ({"pool": "max"}, ValueError, "pool must be one of"),
        ({"name": "vit_tiny_patch16_22"}, ValueError, "did you mean 'vit_tiny_patch16_224'"),
        ({"pretrained": True}, ValueError, "no hub weights"),
        ({"pretrained_path": "/nonexistent/w.safetensors"}, FileNotFoundError, "not found"),
        ({"pool": "pixel_shuffle", "include_prefix_tokens": True}, ValueError, "pixel_shuffle"),
        ({"data_config": {"resize": 3}}, ValueError, "unknown data_config"),
        ({"num_classes": 10}, ValueError, "num_classes"),
    ],
)
def test_bad_arguments_raise_clearly(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ViTEncoder(**kwargs)


def test_forward_checks_the_input_shape() -> None:
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\)"):
        ViTEncoder()(torch.zeros(1, 3, 64, 64))
