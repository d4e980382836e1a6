"""The diffusion decoder in the latent space of a pretrained AutoencoderKL (``vae=PATH``), and
the autoencoder helpers of mmgpt_diffusion (preset, loader, latent statistics)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from mmgpt.files import load_tensors, save_tensors
from mmgpt.registry import create, get
from mmgpt.weights import load_model_state, model_state_dict
from mmgpt_diffusion import DiffusionDecoder, autoencoder_kl, load_autoencoder
from mmgpt_diffusion.autoencoder import latent_statistics

D, K, SIZE = 16, 2, 32  # condition_dim, num_condition_tokens, image side
SHIFT, SCALE = 0.3, 1.7  # a VAE's recorded latent statistics, not the defaults
UNET = {"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 2}


def tiny_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = autoencoder_kl(image_size=SIZE, block_out_channels=[8, 16], norm_num_groups=4)
    vae.register_to_config(shift_factor=SHIFT, scaling_factor=SCALE)
    return vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return path


def latent_decoder(vae_dir: Path, seed: int = 0, **kwargs) -> DiffusionDecoder:
    torch.manual_seed(seed)
    config = {"condition_dim": D, "num_condition_tokens": K, "unet_config": UNET, **kwargs}
    return DiffusionDecoder(vae=vae_dir, **config).eval()


@pytest.fixture(scope="module")
def cond() -> torch.Tensor:
    return torch.randn(2, K, D, generator=torch.Generator().manual_seed(7))


# -- the autoencoder preset and loader ---------------------------------------------------------
def test_autoencoder_preset_is_a_registry_model_entry() -> None:
    from diffusers import AutoencoderKL

    vae = create(
        "model", "autoencoder-kl", image_size=32, block_out_channels=[8, 16, 16], norm_num_groups=8
    )
    assert isinstance(vae, AutoencoderKL) and get("model", "autoencoder-kl") is autoencoder_kl
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist
    assert posterior.mean.shape == (1, 4, 8, 8)  # 3 levels: 4x per side, 4 channels
    with pytest.raises(ValueError, match="divisible by 4"):
        autoencoder_kl(image_size=30, block_out_channels=[8, 16, 16], norm_num_groups=8)
    with pytest.raises(ValueError, match="norm_num_groups=16 must divide"):
        autoencoder_kl(block_out_channels=[8, 16])


def test_loader_matches_diffusers_and_finds_the_folder(vae_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    theirs = AutoencoderKL.from_pretrained(vae_dir)
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    for where in ("pipeline/vae", "run/model"):  # a pipeline directory, a training run
        shutil.copytree(vae_dir, tmp_path / where)
    for path in (vae_dir, tmp_path / "pipeline", tmp_path / "run"):
        ours = load_autoencoder(path)
        assert not ours.training
        with torch.no_grad():
            torch.testing.assert_close(
                ours.decode(ours.encode(x).latent_dist.mode()).sample,
                theirs.decode(theirs.encode(x).latent_dist.mode()).sample,
            )


def test_a_wrong_vae_path_is_a_clear_error(vae_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"vae={missing}: not a directory"):
        DiffusionDecoder(vae=missing)
    with pytest.raises(FileNotFoundError, match="no config.json there nor in vae/ or model/"):
        DiffusionDecoder(vae=tmp_path)
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="describes 'UNet2DConditionModel', not an AutoencoderKL"):
        DiffusionDecoder(vae=unet_dir)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(vae_dir / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match=rf"vae={no_weights}: .* but no weights"):
        DiffusionDecoder(vae=no_weights)


def test_latent_statistics_standardize_the_latents() -> None:
    vae = tiny_vae()
    images = [
        torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in (1, 2)
    ]
    images = [x * 2 - 1 for x in images]
    shift, scale = latent_statistics(vae, images, seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the reference: the sampled latents, standardized by hand
        z = []
        for x in images:
            posterior = vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator)
            z.append(posterior.mean + posterior.std * noise)
    z = torch.cat(z).double()
    assert shift == pytest.approx(z.mean().item(), abs=1e-6)
    assert scale == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-5)


# -- the decoder on latents --------------------------------------------------------------------
def test_latent_decoder_shapes_and_frozen_vae(vae_dir: Path, cond: torch.Tensor) -> None:
    dec = latent_decoder(vae_dir)
    assert (dec.image_size, dec.channels, dec.latent_channels, dec.latent_size) == (32, 3, 4, 16)
    assert dec.unet.config.in_channels == 4 and dec.unet.config.sample_size == 16
    sched = dec.noise_scheduler.config
    assert (sched.prediction_type, sched.clip_sample) == ("v_prediction", False)
    # whatever a caller switches on (MultimodalGPT.trainable, .train()), the VAE stays fixed
    dec.requires_grad_(True).train()
    assert not any(p.requires_grad for p in dec.vae.parameters())
    assert not dec.vae.training and dec.unet.training
    loss = dec.training_loss(cond, torch.rand(2, 3, SIZE, SIZE) * 2 - 1)
    loss.backward()
    assert dec.unet.conv_in.weight.grad is not None
    assert all(p.grad is None for p in dec.vae.parameters())
    images = dec.eval().generate(cond, num_inference_steps=2, seed=0)
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1


def test_latents_honour_the_vae_shift_and_scale(vae_dir: Path) -> None:
    dec = latent_decoder(vae_dir)
    vae = load_autoencoder(vae_dir)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = dec.encode_images(x, torch.Generator().manual_seed(5))
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(5))
        torch.testing.assert_close(z, (raw - SHIFT) * SCALE)
        expected = ((vae.decode(raw).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(dec.decode_latents(z), expected)


def test_latent_decoder_learns_a_batch(vae_dir: Path, cond: torch.Tensor) -> None:
    """Fixed noise and timesteps: the UNet's loss on its training batch falls."""
    dec = latent_decoder(vae_dir, p_uncond=0.0).train()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    timesteps = torch.tensor([300, 700])

    def loss() -> torch.Tensor:
        return dec.training_loss(
            cond, images, noise=noise, timesteps=timesteps, generator=torch.Generator()
        )

    optimizer = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=2e-3)
    before = float(loss().detach())
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss().detach()) < 0.5 * before


def test_saved_latent_decoder_rebuilds_without_the_vae_folder(
    vae_dir: Path, cond: torch.Tensor, tmp_path: Path
) -> None:
    dec = latent_decoder(vae_dir)
    config = json.loads(json.dumps(dec.config_dict()))  # as stored in config.json
    assert "vae" not in config and config["vae_config"]["scaling_factor"] == SCALE
    save_tensors(model_state_dict(dec), tmp_path / "decoder.safetensors")
    moved = tmp_path / "moved"
    shutil.copytree(vae_dir, moved)  # the folder the decoder came from is gone
    shutil.rmtree(vae_dir)
    try:
        torch.manual_seed(123)
        rebuilt = create("decoder", "diffusion", **config).eval()
        expected = dec.generate(cond, num_inference_steps=3, seed=5)
        load_model_state(rebuilt, load_tensors(tmp_path / "decoder.safetensors"), tmp_path)
        assert torch.equal(rebuilt.generate(cond, num_inference_steps=3, seed=5), expected)
        assert rebuilt.config_dict() == dec.config_dict()
    finally:
        shutil.copytree(moved, vae_dir)


def test_latent_arguments_are_checked(vae_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        DiffusionDecoder(vae=vae_dir, vae_config={"_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="vae cannot be combined with pipeline_dir"):
        DiffusionDecoder(vae=vae_dir, pipeline_dir=tmp_path)
    # 2x VAE, then a UNet that halves once more: 34 px is not divisible by 4
    with pytest.raises(ValueError, match=r"divisible by 4 .*the VAE's 2"):
        latent_decoder(vae_dir, image_size=34)
