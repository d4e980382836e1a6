"""Training an AutoencoderKL (objective ``autoencoder``, ``mmgpt train autoencoder``) and
text-to-image in its latent space through the command line (``model.image_decoder.vae``)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("diffusers")
pytest.importorskip("timm")

from mmgpt.cli import main
from mmgpt.data.sample import Sample, Turn
from mmgpt.files import load_tensors
from mmgpt.imagegen import generate_images
from mmgpt.pretrained import load_model
from mmgpt.recipe import load_recipe, run_training
from mmgpt.registry import create
from mmgpt_diffusion import autoencoder_kl
from mmgpt_diffusion.autoencoder import latent_statistics
from mmgpt_diffusion.autoencoder_objective import (
    ImageBatchCollator,
    bilinear_round_trip,
    psnr,
    reconstruct,
)

SIZE = 32
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 225)}
KINDS = ("circle", "square", "triangle")
CANVASES = [(40, 40), (64, 48), (30, 50), (90, 70)]
TINY_VAE = [
    f"model.image_size={SIZE}",
    "model.block_out_channels=[8,16]",  # 2 levels: 2x per side
    "model.norm_num_groups=4",
]
QUIET = ["train.progress=false", "train.tensorboard=false", "data.eval_fraction=0"]


def draw(kind: str, colour: str, canvas: tuple[int, int], shift: int) -> Image.Image:
    image = Image.new("RGB", canvas, (245, 245, 240))
    w, h = canvas
    r = min(w, h) // 3
    cx, cy = w // 2 + shift, h // 2
    box = (cx - r, cy - r, cx + r, cy + r)
    pen = ImageDraw.Draw(image)
    if kind == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif kind == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=COLOURS[colour])
    return image


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 captioned images of several sizes: a shape of a colour, left or right of centre."""
    root = tmp_path_factory.mktemp("my_images")
    (root / "images").mkdir()
    rows = []
    i = 0
    for kind in KINDS:
        for colour in COLOURS:
            for shift in (-4, 4):
                name = f"images/{i:02d}_{colour}_{kind}.png"
                draw(kind, colour, CANVASES[i % len(CANVASES)], shift).save(root / name)
                rows.append(json.dumps({"file_name": name, "text": f"a {colour} {kind}"}))
                i += 1
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def folder_images(root: Path) -> torch.Tensor:
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(root / row["file_name"]) for row in rows]
    return ImageBatchCollator(SIZE)([Sample([Turn("user", "x")], images=[im]) for im in images])


def metrics(out: Path, split: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["split"] == split]


@pytest.fixture(scope="module")
def vae_run(imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "vae"
    argv = ["train", "autoencoder", "--data", str(imagefolder), "--out", str(out)]
    steps = [
        "train.max_steps=40",
        "train.batch_size=6",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=20",
    ]
    assert main([*argv, *TINY_VAE, *QUIET, *steps]) == 0
    return out


# -- the objective ---------------------------------------------------------------------------
def tiny_vae(seed: int = 0):
    torch.manual_seed(seed)
    return autoencoder_kl(image_size=16, block_out_channels=[8, 16], norm_num_groups=4)


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_loss_is_reconstruction_plus_weighted_kl(reconstruction: str) -> None:
    vae = tiny_vae().train()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    objective = create("objective", "autoencoder", reconstruction=reconstruction, kl_weight=0.5)
    torch.manual_seed(4)
    out = objective(vae, x)
    torch.manual_seed(4)  # the reference: the same posterior sample, the loss written out
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    recon = vae.decode(z).sample
    err = (recon - x).abs() if reconstruction == "l1" else (recon - x) ** 2
    kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3))
    expected = err.mean() + 0.5 * kl.mean() / (3 * 16 * 16)
    torch.testing.assert_close(out.loss, expected)
    assert out.weight == 3.0
    assert out.metrics["kl"] == pytest.approx(kl.mean().item() / z[0].numel(), rel=1e-5)
    mse01 = (((recon - x) / 2) ** 2).flatten(1).mean(1)
    assert out.metrics["psnr"] == pytest.approx((10 * torch.log10(1 / mse01)).mean().item())
    out.loss.backward()
    assert vae.encoder.conv_in.weight.grad is not None

    # in evaluation the posterior mean is decoded: deterministic
    vae.eval()
    with torch.no_grad():
        first, second = objective(vae, x), objective(vae, x)
    assert torch.equal(first.loss, second.loss)


def test_objective_arguments_and_batches_are_checked() -> None:
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        create("objective", "autoencoder", reconstruction="lpips")
    with pytest.raises(ValueError, match="kl_weight must be a number >= 0"):
        create("objective", "autoencoder", kl_weight=-1)
    with pytest.raises(TypeError, match="expected a diffusers AutoencoderKL"):
        create("objective", "autoencoder")(torch.nn.Linear(2, 2), torch.zeros(1, 3, 4, 4))

    with pytest.raises(ValueError, match="train.strategy=ddp is not supported"):
        create("objective", "autoencoder").build_trainer(
            tiny_vae(), [], {"strategy": "ddp"}, out_dir="unused"
        )

    collate = ImageBatchCollator(16)
    a, b = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("L", (8, 8), 0)
    drawing = Sample([Turn("user", "draw"), Turn("assistant", "<image>")], output_images=[b])
    batch = collate([Sample([Turn("user", "<image>")], images=[a]), drawing])
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert batch[1].eq(-1).all()  # black, from a greyscale image
    empty = Sample([Turn("user", "hi")], meta={"source": "meta.jsonl", "line": 3})
    with pytest.raises(ValueError, match="meta.jsonl line 3 has no image"):
        collate([empty])


def test_psnr_and_the_bilinear_baseline() -> None:
    x = torch.zeros(1, 3, 8, 8)
    assert psnr(x + 0.2, x).item() == pytest.approx(10 * math.log10(1 / 0.01))  # 0.1 on [0, 1]
    flat = torch.full((1, 3, 8, 8), 0.25)  # a constant image survives any down/up-sampling
    torch.testing.assert_close(bilinear_round_trip(flat, 4), flat)


# -- the recipe ------------------------------------------------------------------------------
def test_recipe_trains_an_autoencoder_in_diffusers_format(vae_run: Path, imagefolder: Path) -> None:
    from diffusers import AutoencoderKL

    lines = metrics(vae_run)
    assert [line["step"] for line in lines] == list(range(1, 41))
    first = sum(line["reconstruction"] for line in lines[:5]) / 5
    last = sum(line["reconstruction"] for line in lines[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert lines[-1]["psnr"] > lines[0]["psnr"] + 3
    saved = sorted(p.name for p in (vae_run / "checkpoints").iterdir())
    assert saved == ["step_00000020", "step_00000040"]

    vae = AutoencoderKL.from_pretrained(vae_run / "model")  # diffusers' own loader
    # the recorded shift and scale standardize the latents of the training images
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    x = folder_images(imagefolder)
    mean, inverse_std = latent_statistics(vae, [x], seed=11)
    assert abs(mean - shift) * scale < 0.05
    assert inverse_std / scale == pytest.approx(1.0, abs=0.05)
    # the saved weights are the trained ones: far better reconstructions than at the start
    torch.manual_seed(0)
    fresh = autoencoder_kl(image_size=SIZE, block_out_channels=[8, 16], norm_num_groups=4)
    gain = psnr(reconstruct(vae, x), x).mean() - psnr(reconstruct(fresh, x), x).mean()
    assert gain > 4, gain


def test_resumed_run_equals_the_uninterrupted_one(imagefolder: Path, tmp_path: Path) -> None:
    settings = [*TINY_VAE, *QUIET, "train.batch_size=4", "train.log_every=1", "train.save_every=3"]

    def run(out: Path, steps: int, *extra: str) -> list[dict]:
        argv = ["train", "autoencoder", "--data", str(imagefolder), "--out", str(out), *extra]
        assert main([*argv, *settings, f"train.max_steps={steps}", "train.eval_every=0"]) == 0
        return metrics(out)

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "split", 3)
    with pytest.warns(RuntimeWarning, match="changed recipe"):
        resumed = run(tmp_path / "split", 6, "--resume")
    assert [line["loss"] for line in resumed] == [line["loss"] for line in whole]


def test_autoencoder_recipe_keys_are_checked(imagefolder: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "autoencoder", "--data", str(imagefolder), "--out", str(tmp_path / "run")]
    assert main([*argv, "model.image_sise=32"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key 'model.image_sise' (did you mean model.image_size?)" in err
    assert main([*argv, "tokenizer.name=bpe"]) == 2
    assert "an autoencoder recipe has no tokenizer" in capsys.readouterr().err
    recipe = load_recipe("autoencoder")
    recipe["objective"] = {"name": "sft"}  # a token objective
    with pytest.raises(ValueError, match="needs an objective for image batches"):
        run_training(recipe, data=imagefolder, out=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_wrong_vae_path_stops_the_t2i_recipe(imagefolder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    missing = tmp_path / "no-such-vae"
    argv = ["train", "t2i", "--data", str(imagefolder), "--out", str(out), "data.task=t2i"]
    assert main([*argv, f"model.image_decoder.vae={missing}", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"vae={missing}: not a directory" in err and "mmgpt train autoencoder" in err
    assert not (out / "metrics.jsonl").exists()


def test_t2i_in_the_latent_space_of_the_trained_vae(
    vae_run: Path, imagefolder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "latent-t2i"
    argv = ["train", "t2i", "--data", str(imagefolder), "--out", str(out), "data.task=t2i"]
    settings = [
        f"model.image_decoder.vae={vae_run / 'model'}",
        f"model.image_decoder.image_size={SIZE}",
        "model.image_decoder.unet_config.block_out_channels=[8,16]",
        "train.max_steps=12",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.log_every=1",
        "data.prompt_template=draw {text}",
        *QUIET,
    ]
    assert main([*argv, *settings]) == 0
    lines = metrics(out)
    assert all(line["images"] == 4 and line["diffusion_loss"] > 0 for line in lines)

    # the model directory holds the VAE: its config and the trained weights, frozen
    config = json.loads((out / "model" / "config.json").read_text())["image_decoder"]["config"]
    assert "vae" not in config and config["vae_config"]["block_out_channels"] == [8, 16]
    trained = load_tensors(vae_run / "model" / "diffusion_pytorch_model.safetensors")
    saved = load_tensors(out / "model" / "model.safetensors")
    assert all(torch.equal(saved[f"image_decoder.vae.{k}"], v) for k, v in trained.items())
    vae_config = json.loads((vae_run / "model" / "config.json").read_text())
    assert config["vae_config"]["scaling_factor"] == vae_config["scaling_factor"]

    # another machine: the VAE's folder is gone; two loads draw the same images by seed
    moved = tmp_path / "vae-elsewhere"
    shutil.move(vae_run / "model", moved)
    try:
        drawn = []
        for _ in range(2):
            model = load_model(out / "model")
            assert model.image_decoder.latent_size == SIZE // 2
            drawn.append(generate_images(model, ["draw a red circle"], seeds=[3], force_image=True))
        (first,), (second,) = drawn[0][0], drawn[1][0]
        assert first[0].size == (SIZE, SIZE)
        assert list(first[0].getdata()) == list(second[0].getdata())

        drawings = tmp_path / "drawings"
        command = ["generate", "--model", str(out / "model"), "--prompt", "draw a red circle"]
        assert main([*command, "--out-dir", str(drawings), "--steps", "4"]) == 0
        png = drawings / "image_0.png"
        assert str(png) in capsys.readouterr().out
        with Image.open(png) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    finally:
        shutil.move(moved, vae_run / "model")
