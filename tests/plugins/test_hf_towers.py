"""The "clip" and "siglip" encoders: features and preprocessing against transformers on tiny
random towers saved by the tests, feature selection, freezing, self-contained saving, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from mmgpt.data.sample import Sample, Turn  # noqa: E402
from mmgpt.hf_fixtures import build_hf_vision_dir  # noqa: E402
from mmgpt.interfaces import ModalityEncoder  # noqa: E402
from mmgpt.multimodal import MultimodalGPT  # noqa: E402
from mmgpt.registry import create, get  # noqa: E402
from mmgpt.testing import check_entry  # noqa: E402
from mmgpt_vit.hf_towers import (  # noqa: E402
    KNOWN_TOWERS,
    CLIPVisionTower,
    SiglipVisionTower,
)

ATOL = 1e-5
CLASSES = {"clip": ("CLIPVisionModel", "CLIPModel"), "siglip": ("SiglipVisionModel", "SiglipModel")}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """A tiny tower of each family, as a vision model and as a dual encoder."""
    root = tmp_path_factory.mktemp("towers")
    return {
        (family, dual): build_hf_vision_dir(
            root / f"{family}-{'dual' if dual else 'vision'}", family, dual=dual, seed=3
        )
        for family in ("clip", "siglip")
        for dual in (False, True)
    }


def images(seed: int = 0) -> list[Image.Image]:
    """Odd sizes (landscape, portrait, smaller than the crop, exact) and modes."""
    rng = np.random.default_rng(seed)
    out = []
    for (h, w), mode in [((40, 57), "RGB"), ((71, 33), "RGB"), ((20, 26), "RGB"), ((32, 32), "L")]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(Image.fromarray(pixels).convert(mode))
    rgba = Image.fromarray(rng.integers(0, 256, (35, 45, 4), dtype=np.uint8), "RGBA")
    return [*out, rgba]


def their_vision_model(directory: Path, family: str, dual: bool) -> torch.nn.Module:
    vision_cls, dual_cls = CLASSES[family]
    if dual:
        return getattr(transformers, dual_cls).from_pretrained(directory).vision_model.eval()
    return getattr(transformers, vision_cls).from_pretrained(directory).eval()


def their_pixels(directory: Path, items: list[Image.Image]) -> torch.Tensor:
    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    return processor(items, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_registered_and_conforms(name: str) -> None:
    assert get("encoder", name) is {"clip": CLIPVisionTower, "siglip": SiglipVisionTower}[name]
    tower = get("encoder", name).conformance_example()
    assert isinstance(tower, ModalityEncoder) and tower.modality == "image"
    check_entry("encoder", name)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("dual", [False, True], ids=["vision-model", "dual-encoder"])
def test_preprocessing_matches_transformers_image_processor(dirs, family, dual) -> None:
    tower = create("encoder", family, path=dirs[family, dual])
    items = images()
    ours = tower.preprocess(items)
    theirs = their_pixels(dirs[family, dual], items)
    assert ours.shape == theirs.shape == (len(items), 3, 32, 32)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    # one image alone is preprocessed as in a batch, and a preprocessed tensor passes through
    torch.testing.assert_close(tower.preprocess(items[1]), ours[1:2], rtol=0, atol=0)
    torch.testing.assert_close(tower.preprocess(list(ours)), ours, rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings",
    [
        # bilinear, a crop smaller than the resize, no normalisation
        dict(resample=2, size={"shortest_edge": 45}, do_normalize=False),
        # a resize that changes the aspect ratio, then a crop with zero padding
        dict(size={"height": 24, "width": 40}, do_center_crop=True, crop_size=32),
        # nearest, no rescale
        dict(resample=0, do_rescale=False, image_mean=[100.0, 110.0, 120.0], image_std=60.0),
    ],
    ids=["bilinear-crop", "squash-pad", "nearest-raw"],
)
def test_preprocessing_options_match_transformers(dirs, tmp_path, settings) -> None:
    directory = tmp_path / "clip"
    shutil.copytree(dirs["clip", False], directory)
    path = directory / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    tower = create("encoder", "clip", path=directory)
    torch.testing.assert_close(
        tower.preprocess(images(1)), their_pixels(directory, images(1)), rtol=0, atol=ATOL
    )


@pytest.mark.parametrize(
    ("family", "dual", "select_layer", "select_feature"),
    [
        ("clip", False, -2, "patch"),  # LLaVA's
        ("clip", False, -1, "cls_patch"),
        ("clip", True, 0, "patch"),  # the embeddings (after CLIP's pre-norm)
        ("clip", True, 1, "cls_patch"),
        ("siglip", False, -2, "patch"),
        ("siglip", True, 3, "patch"),
    ],
)
def test_features_equal_transformers_hidden_states(
    dirs, family, dual, select_layer, select_feature
) -> None:
    directory = dirs[family, dual]
    tower = create(
        "encoder", family, path=directory, select_layer=select_layer, select_feature=select_feature
    )
    pixels = their_pixels(directory, images())
    with torch.no_grad():
        out = tower(pixels)
        hidden = their_vision_model(directory, family, dual)(pixels, output_hidden_states=True)
    expected = hidden.hidden_states[select_layer]
    if family == "clip" and select_feature == "patch":
        expected = expected[:, 1:]
    assert out.shape == (len(pixels), tower.num_tokens, tower.output_dim) == expected.shape
    assert tower.num_tokens == 16 + (select_feature == "cls_patch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=ATOL)


def test_layers_after_the_selected_one_are_kept_but_not_run(dirs) -> None:
    tower = create("encoder", "clip", path=dirs["clip", False], select_layer=1, trainable=True)
    pixels = tower.preprocess(images())
    before = tower(pixels)
    with torch.no_grad():  # layers 1, 2 and the final norm do not reach the features
        for module in (*tower.encoder.layers[1:], tower.post_layernorm):
            for p in module.parameters():
                p.add_(1.0)
    torch.testing.assert_close(tower(pixels), before, rtol=0, atol=0)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    used = ("embeddings.", "pre_layrnorm.", "encoder.layers.0.")
    assert trainable and all(n.startswith(used) for n in trainable)
    assert "encoder.layers.0.mlp.fc2.weight" in trainable
    # the whole tower is in its state dict (a LLaVA export writes it)
    theirs = transformers.CLIPVisionModel.from_pretrained(dirs["clip", False]).state_dict()
    assert set(tower.state_dict()) == set(theirs)


def test_frozen_by_default_and_switched_by_the_model(dirs) -> None:
    tower = create("encoder", "clip", path=dirs["clip", False])
    assert tower.frozen and not tower.trainable
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not any(m.training for m in tower.modules() if m is not tower)
    with torch.enable_grad():
        assert not tower(tower.preprocess(images()[:1])).requires_grad

    tokenizer = create("tokenizer", "bpe", files=[str(_corpus())], vocab_size=300)
    model = MultimodalGPT.build(
        "gpt-nano", tokenizer, encoder="clip", encoder_kwargs={"path": str(dirs["clip", False])}
    )
    model.trainable("projector+gpt+encoder")
    assert model.encoders["image"].trainable
    assert model.encoders["image"].config_dict()["trainable"] is True
    model.trainable("projector")
    assert model.encoders["image"].frozen
    assert not any(p.requires_grad for p in model.encoders["image"].parameters())


def _corpus() -> Path:
    from mmgpt.testing import EXAMPLE_CORPUS

    return Path(EXAMPLE_CORPUS[0])


def test_saved_model_is_self_contained(dirs, tmp_path) -> None:
    """The tower's weights are saved in the model's own safetensors: the model loads with
    the source directory gone, with the same outputs; config.json records where they came
    from."""
    source = tmp_path / "siglip"
    shutil.copytree(dirs["siglip", True], source)
    tokenizer = create("tokenizer", "bpe", files=[str(_corpus())], vocab_size=300)
    torch.manual_seed(0)
    model = MultimodalGPT.build(
        "gpt-nano", tokenizer, encoder="siglip", encoder_kwargs={"path": str(source)}
    ).eval()
    turns = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a square")]
    batch = model.processor()([Sample(turns, images()[:1])])
    with torch.no_grad():
        expected = model(batch).logits
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(source)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    tower = config["encoders"]["image"]
    assert tower["name"] == "siglip" and tower["config"]["source"] == str(source)
    assert tower["config"]["vision_config"]["hidden_size"] == 32
    assert tower["config"]["image_processor"]["size"] == {"height": 32, "width": 32}
    loaded = MultimodalGPT.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(KNOWN_TOWERS))
def test_known_architectures_have_transformers_shapes(name) -> None:
    """name= builds a published architecture without files (random weights; on the meta
    device for planning): the same tensors, of the same shapes, as transformers'."""
    family, config = KNOWN_TOWERS[name]
    vision_cls = CLASSES[family][0]
    config_cls = vision_cls.replace("Model", "Config")
    with torch.device("meta"):
        ours = create("encoder", family, name=name)
        theirs = getattr(transformers, vision_cls)(getattr(transformers, config_cls)(**config))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    grid = config["image_size"] // config["patch_size"]
    assert (ours.num_tokens, ours.output_dim) == (grid * grid, config["hidden_size"])


def test_a_directory_on_the_meta_device_reads_no_weights(dirs, tmp_path) -> None:
    directory = tmp_path / "clip"
    shutil.copytree(dirs["clip", False], directory)
    (directory / "model.safetensors").unlink()  # plan reads the configs only
    with torch.device("meta"):
        tower = create("encoder", "clip", path=directory)
    assert tower.num_tokens == 16
    with pytest.raises(FileNotFoundError, match="no weights found"):
        create("encoder", "clip", path=directory)


def test_errors_name_the_problem(dirs, tmp_path) -> None:
    clip, siglip = dirs["clip", False], dirs["siglip", False]
    with pytest.raises(ValueError, match="a siglip model .*use the encoder 'siglip'"):
        create("encoder", "clip", path=siglip)
    with pytest.raises(ValueError, match="cls_patch' needs a class token; siglip has none"):
        create("encoder", "siglip", path=siglip, select_feature="cls_patch")
    with pytest.raises(ValueError, match="select_layer=4 is out of range for a 3-layer tower"):
        create("encoder", "clip", path=clip, select_layer=4)
    with pytest.raises(ValueError, match="exactly one of path=.*got path, name"):
        create("encoder", "clip", path=clip, name="openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="exactly one of path=.*got none"):
        create("encoder", "clip")
    with pytest.raises(ValueError, match="'vit_tiny_custom' is not a known clip architecture"):
        create("encoder", "clip", name="vit_tiny_custom")

    bad = tmp_path / "bad"
    shutil.copytree(clip, bad)
    processor = bad / "preprocessor_config.json"
    settings = json.loads(processor.read_text())
    processor.write_text(json.dumps({**settings, "crop_size": {"height": 24, "width": 24}}))
    with pytest.raises(
        ValueError,
        match="preprocessor_config.json: the image preprocessing gives 24x24 images, the tower takes 32x32",
    ):
        create("encoder", "clip", path=bad)
    processor.write_text(json.dumps({**settings, "do_pad": True}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: do_pad not supported"):
        create("encoder", "clip", path=bad)
    processor.write_text(json.dumps({**settings, "resample": 1}))
    with pytest.raises(ValueError, match="resample=1 is not supported"):
        create("encoder", "clip", path=bad)
    processor.unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json: not found"):
        create("encoder", "clip", path=bad)
    config = json.loads((clip / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    shutil.copy(clip / "preprocessor_config.json", processor)
    with pytest.raises(ValueError, match="config.json: hidden_act 'relu' is not supported"):
        create("encoder", "clip", path=bad)
    tower = create("encoder", "clip", path=clip)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\)"):
        tower(torch.zeros(1, 3, 24, 24))
