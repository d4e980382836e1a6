"""The latent space of the diffusion decoder: a diffusers ``AutoencoderKL``.

Three jobs, all on diffusers' own class and file format (``config.json`` +
``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes them):

* :func:`autoencoder_kl`, registry entry ``("model", "autoencoder-kl")``: a small fresh
  AutoencoderKL for ``mmgpt train autoencoder`` (a model preset with overrides, like
  ``gpt-nano``). Every level but the last halves the resolution.
* :func:`load_autoencoder`: a pretrained one from a local directory — an AutoencoderKL
  folder, a pipeline directory's ``vae/``, or a training run's ``model/`` — with errors that
  name the path and what was expected. The decoder's ``vae=PATH`` uses it.
* :func:`latent_statistics`: the shift and scale that standardize a VAE's latents over some
  images, recorded as the config's ``shift_factor`` and ``scaling_factor`` (what Stable
  Diffusion's 0.18215 is for its VAE), so that a diffusion model's noise schedule sees
  latents of unit variance whatever the autoencoder learned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmgpt.registry import register
from mmgpt_diffusion._deps import require_diffusers
from mmgpt_diffusion.pipeline_dir import WEIGHT_PREFIX, _read_json, json_config

__all__ = [
    "autoencoder_folder",
    "autoencoder_from_config",
    "autoencoder_kl",
    "json_config",
    "latent_statistics",
    "load_autoencoder",
]

AUTOENCODER_CLASS = "AutoencoderKL"


@register("model", "autoencoder-kl")
def autoencoder_kl(
    *,
    image_size: int = 64,
    channels: int = 3,
    block_out_channels: Sequence[int] = (32, 64, 64),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 16,
    mid_block_attention: bool = False,
) -> Any:
    """A fresh ``diffusers.AutoencoderKL``: ``len(block_out_channels)`` levels, so the
    latents are ``image_size / 2**(levels - 1)`` wide with ``latent_channels`` channels.

    The defaults (0.9M parameters) compress 64 px RGB images 4× per side into 4 channels
    and train on a CPU; ``mid_block_attention`` (off: its cost grows with the square of the
    latent area) adds diffusers' self-attention block in the middle.
    """
    diffusers = require_diffusers()
    levels = list(block_out_channels)
    if not levels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in levels):
        raise ValueError(
            f"autoencoder-kl: block_out_channels must be a list of positive ints, got "
            f"{block_out_channels!r}"
        )
    bad_groups = [c for c in levels if c % norm_num_groups]
    if bad_groups:
        raise ValueError(
            f"autoencoder-kl: norm_num_groups={norm_num_groups} must divide every entry of "
            f"block_out_channels={levels}"
        )
    factor = 2 ** (len(levels) - 1)
    if image_size % factor:
        raise ValueError(
            f"autoencoder-kl: image_size {image_size} must be divisible by {factor} "
            f"({len(levels)} levels halve it {len(levels) - 1} times)"
        )
    return diffusers.AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(levels),
        up_block_types=("UpDecoderBlock2D",) * len(levels),
        block_out_channels=tuple(levels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=mid_block_attention,
    )


def autoencoder_folder(path: str | Path) -> Path:
    """The folder of ``path`` that holds the AutoencoderKL: ``path`` itself, ``path/vae``
    (a pipeline directory) or ``path/model`` (a training run); a clear error otherwise."""
    root = Path(path).expanduser()
    expected = (
        "expected an AutoencoderKL directory (config.json + "
        f"{WEIGHT_PREFIX}.safetensors, as written by AutoencoderKL.save_pretrained or by "
        "`mmgpt train autoencoder` in OUT/model), or a pipeline directory with vae/"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"vae={path}: not a directory; {expected}")
    for folder in (root, root / "vae", root / "model"):
        if (folder / "config.json").is_file():
            break
    else:
        raise FileNotFoundError(
            f"vae={path}: no config.json there nor in vae/ or model/; {expected}"
        )
    config = _read_json(folder / "config.json")
    class_name = config.get("_class_name")
    if class_name != AUTOENCODER_CLASS:
        raise ValueError(
            f"vae={path}: {folder / 'config.json'} describes {class_name!r}, not an "
            f"{AUTOENCODER_CLASS}; {expected}"
        )
    if not any(folder.glob(f"{WEIGHT_PREFIX}*")):
        raise FileNotFoundError(
            f"vae={path}: {folder} has a config.json but no weights ({WEIGHT_PREFIX}.safetensors)"
        )
    return folder


def load_autoencoder(path: str | Path) -> Any:
    """A pretrained ``AutoencoderKL`` from a local directory (see :func:`autoencoder_folder`),
    in eval mode; never the network."""
    diffusers = require_diffusers()
    folder = autoencoder_folder(path)
    return diffusers.AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval()


def autoencoder_from_config(config: dict[str, Any]) -> Any:
    """An ``AutoencoderKL`` of the architecture ``config`` (a saved ``config.json``'s
    content) with fresh weights: a model directory's weights are loaded into it after."""
    diffusers = require_diffusers()
    if config.get("_class_name", AUTOENCODER_CLASS) != AUTOENCODER_CLASS:
        raise ValueError(
            f"vae_config describes {config.get('_class_name')!r}, not an {AUTOENCODER_CLASS}"
        )
    return diffusers.AutoencoderKL.from_config(config)


@torch.no_grad()
def latent_statistics(
    vae: Any, batches: Iterable[torch.Tensor], *, seed: int = 0
) -> tuple[float, float]:
    """``(shift, scale)`` with ``(latents - shift) * scale`` of zero mean and unit variance
    over ``batches`` of images in [-1, 1] (latents sampled from the posterior, as the
    diffusion model sees them in training)."""
    generator = torch.Generator().manual_seed(seed)
    was_training = vae.training
    vae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    device = next(vae.parameters()).device
    try:
        for images in batches:
            latents = vae.encode(images.to(device)).latent_dist
            noise = torch.randn(latents.mean.shape, generator=generator).to(device)
            z = (latents.mean + latents.std * noise).double()
            total += float(z.sum())
            total_sq += float((z * z).sum())
            count += z.numel()
    finally:
        vae.train(was_training)
    if count == 0:
        raise ValueError("latent_statistics: no images")
    mean = total / count
    var = max(total_sq / count - mean * mean, 1e-12)
    return mean, 1.0 / var**0.5
