"""Training an ``AutoencoderKL`` on images (objective ``"autoencoder"``, ``mmgpt train
autoencoder``).

The loss of a batch of images ``x`` in [-1, 1] with posterior ``q(z|x) = N(μ, σ²)``:

    loss = mean |x − D(z)|   (or the mean squared error: reconstruction="l2")
         + kl_weight · KL(q(z|x) ‖ N(0, I)) / (number of values of x)

with ``z`` sampled from the posterior in training and its mean ``μ`` in evaluation. The KL
term is summed over a sample's latent and divided by the size of its image, so
``kl_weight`` means what it means in Stable Diffusion's VAE training (1e-6 there, where both
terms are sums per sample): a small pull towards a smooth latent space, not a strong prior.
The perceptual and adversarial terms of that recipe are left out: they need a pretrained
network (LPIPS) and a discriminator, and the latents here only have to carry small images.

The objective builds its own trainer (:class:`~mmgpt.interfaces.BuildsTrainer`): its batches
are image tensors (every input and output image of each sample, center-cropped and resized
to the VAE's ``sample_size``, :func:`~mmgpt_diffusion.images.images_to_tensor`), and the final
model directory is diffusers' own (``config.json`` + ``diffusion_pytorch_model.safetensors``)
with ``shift_factor`` and ``scaling_factor`` measured on the training images
(:func:`~mmgpt_diffusion.autoencoder.latent_statistics`), so that the diffusion decoder's
``vae=OUT/model`` sees latents of unit variance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmgpt.distributed import unwrap_model
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.registry import register
from mmgpt_diffusion.autoencoder import latent_statistics
from mmgpt_diffusion.images import images_to_tensor

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from mmgpt.trainer import TrainConfig, Trainer

RECONSTRUCTIONS = ("l1", "l2")


def _check_autoencoder(model: Any) -> Any:
    base = unwrap_model(model)
    if not (hasattr(base, "encode") and hasattr(base, "decode") and hasattr(base, "config")):
        raise TypeError(
            f"autoencoder objective: expected a diffusers AutoencoderKL (a recipe with "
            f"model.architecture: autoencoder), got {type(base).__name__}"
        )
    return base


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, of images in [-1, 1] (peak 1 on [0, 1])."""
    mse = ((images.float() - reference.float()) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


class ImageBatchCollator:
    """Samples → ``(N, channels, size, size)`` in [-1, 1]: every image of every sample (its
    input images, then the images it draws); a sample without any is an error naming it."""

    def __init__(self, size: int, channels: int = 3) -> None:
        self.size = int(size)
        self.channels = int(channels)

    def __call__(self, samples: Sequence[Any]) -> torch.Tensor:
        images = []
        for i, sample in enumerate(samples):
            found = list(getattr(sample, "images", []) or []) + list(
                getattr(sample, "output_images", []) or []
            )
            if not found:
                meta = getattr(sample, "meta", None) or {}
                source = meta.get("source", f"sample {i} of the batch")
                line = f" line {meta['line']}" if meta.get("line") else ""
                raise ValueError(f"autoencoder objective: {source}{line} has no image")
            images.extend(found)
        return images_to_tensor(images, self.size, self.channels, what="training images")


@register("objective", "autoencoder")
class AutoencoderObjective:
    """Reconstruction + KL loss of an ``AutoencoderKL`` on image batches (module docstring).

    Args:
        reconstruction: ``"l1"`` (mean absolute error, Stable Diffusion's) or ``"l2"``.
        kl_weight: weight of the KL term (per image value, see the module docstring).
        scale_images: how many training images measure the latent shift and scale saved
            with the final model.

    Metrics: ``reconstruction``, ``kl`` (per latent value) and ``psnr`` (dB). ``weight`` is
    the number of images of the batch.
    """

    def __init__(
        self, reconstruction: str = "l1", kl_weight: float = 1e-6, scale_images: int = 256
    ) -> None:
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(
                f"autoencoder objective: reconstruction must be one of {RECONSTRUCTIONS}, "
                f"got {reconstruction!r}"
            )
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or kl_weight < 0:
            raise ValueError(
                f"autoencoder objective: kl_weight must be a number >= 0, got {kl_weight!r}"
            )
        if isinstance(scale_images, bool) or not isinstance(scale_images, int) or scale_images < 1:
            raise ValueError(
                f"autoencoder objective: scale_images must be an int >= 1, got {scale_images!r}"
            )
        self.reconstruction = reconstruction
        self.kl_weight = float(kl_weight)
        self.scale_images = scale_images

    def __call__(self, model: Any, batch: torch.Tensor) -> ObjectiveOutput:
        vae = _check_autoencoder(model)
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise TypeError(
                "autoencoder objective: expected images (N, C, H, W) in [-1, 1] (collate the "
                f"samples with ImageBatchCollator), got {type(batch).__name__}"
            )
        images = batch.to(next(vae.parameters()).device)
        posterior = vae.encode(images).latent_dist
        z = posterior.sample() if vae.training else posterior.mode()
        recon = vae.decode(z).sample
        diff = recon.float() - images.float()
        rec = diff.abs().mean() if self.reconstruction == "l1" else diff.pow(2).mean()
        kl = posterior.kl().float()  # (N,): summed over each sample's latent
        values_per_image = images[0].numel()
        loss = rec + self.kl_weight * kl.mean() / values_per_image
        latent_values = z[0].numel()
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "reconstruction": float(rec.detach()),
                "kl": float(kl.detach().mean()) / latent_values,
                "psnr": float(psnr(recon.detach(), images).mean()),
            },
            weight=float(images.size(0)),
        )

    def collator(self, model: Any) -> ImageBatchCollator:
        config = _check_autoencoder(model).config
        size = config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return ImageBatchCollator(int(size), int(config.in_channels))

    def build_trainer(
        self,
        model: Any,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> Trainer:
        """A :class:`~mmgpt.trainer.Trainer` over image batches whose final model directory
        is diffusers' own, with the latent statistics of the training images.
        ``truncation`` (text) does not apply."""
        from mmgpt.trainer import TrainConfig, Trainer  # the loop sits above its objectives

        if not isinstance(config, TrainConfig):
            config = TrainConfig.from_dict(dict(config))
        if config.strategy != "none":
            # The loss calls encode/decode, not the wrapper's forward, so DDP would not
            # synchronize the gradients: refuse rather than train diverging replicas.
            raise ValueError(
                f"autoencoder objective: train.strategy={config.strategy} is not supported; "
                "the autoencoder trains in one process (train.strategy=none)"
            )
        collate = self.collator(model)
        if not (hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__")):
            raise ValueError(
                "autoencoder objective: the training data must be a map-style dataset (an "
                "imagefolder, LLaVA JSON, parquet or datasets directory), not a stream"
            )
        if len(train_data) == 0:
            raise ValueError("autoencoder objective: the training data holds no samples")

        def scale_batches() -> Iterator[torch.Tensor]:
            n = min(self.scale_images, len(train_data))
            chunk = 32
            for start in range(0, n, chunk):
                yield collate([train_data[i] for i in range(start, min(n, start + chunk))])

        def save(vae: Any, directory: Path) -> None:
            shift, scale = latent_statistics(vae, scale_batches())
            if not (math.isfinite(shift) and math.isfinite(scale)):
                raise ValueError(
                    f"autoencoder: latent statistics are not finite ({shift}, {scale})"
                )
            vae.register_to_config(shift_factor=shift, scaling_factor=scale)
            vae.save_pretrained(directory)

        return Trainer(
            model,
            self,
            train_data,
            config,
            eval_data=eval_data,
            collate_fn=collate,
            out_dir=out_dir,
            save_model_fn=save,
        )


def reconstruct(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """``images`` in [-1, 1] through the autoencoder (posterior mean), in [-1, 1]."""
    with torch.no_grad():
        return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)


def bilinear_round_trip(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The trivial codec at the same spatial compression: down-sample by ``factor``
    (area average) and up-sample back (bilinear)."""
    size = images.shape[-1]
    small = F.interpolate(images, size=size // factor, mode="area")
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)
