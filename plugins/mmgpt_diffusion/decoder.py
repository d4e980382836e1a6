"""The diffusion image decoder: a diffusers UNet conditioned on the GPT's signal tokens.

The GPT's signal-token hidden states go through an output projector (``signal_mlp`` or
``signal_resampler``) into ``condition`` of shape ``(B, num_condition_tokens, condition_dim)``;
the UNet cross-attends to it. Three ways to build the decoder:

* **Pixel space, from scratch** (default): a tiny ``UNet2DConditionModel`` on ``(B, 3, H, W)``
  images that trains on a CPU. Noise schedule: cosine (``squaredcos_cap_v2``) with
  v-prediction and "trailing" timesteps. Why: at 16–64 px the linear schedule destroys the
  image within the first third of the timesteps, so most training steps are spent on pure
  noise; the cosine schedule spreads the signal-to-noise ratio evenly (Nichol & Dhariwal,
  2021). Its last timestep has (almost) zero SNR, so sampling starts from exactly the pure
  noise it was trained on ("trailing" spacing begins at t = T−1, Lin et al., 2023), and
  there ε-prediction is ill-conditioned (x₀ = (x − σε)/α with α → 0) while v-prediction
  stays well-conditioned (x₀ = αx − σv). Every choice is a constructor argument.
* **A pretrained pipeline directory** (``from_pipeline_dir``): the UNet, VAE and noise
  schedule of e.g. a Stable Diffusion folder; diffusion runs in the VAE's latent space and
  the conditioning space is the text-embedding space (e.g. 77 × 768). A saved decoder
  records the folder's configs (``pipeline_config``), not its path.
* **Latent space, a fresh UNet** (``vae``): the from-scratch UNet, trained in the latent
  space of a pretrained ``AutoencoderKL`` from a local directory (Stable Diffusion's
  ``vae/``, or one trained by ``mmgpt train autoencoder``). The VAE is frozen; training
  targets are encoded through it without gradients, scaled by its config's
  ``shift_factor``/``scaling_factor``. A 4× VAE makes each UNet step work on 16× fewer
  positions, which is what makes 64–256 px images trainable on a CPU. The model directory
  holds the VAE itself (its weights in ``model.safetensors``, its config as ``vae_config``
  in ``config.json``), so it loads on a machine without the VAE's folder.

Classifier-free guidance: during training the condition of each sample is replaced, with
probability ``p_uncond``, by a learned null condition; at sampling time
``guidance_scale > 1`` mixes conditional and null predictions (one batched UNet call).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmgpt.registry import register
from mmgpt_diffusion._deps import require_diffusers
from mmgpt_diffusion.autoencoder import autoencoder_from_config, load_autoencoder
from mmgpt_diffusion.images import images_to_tensor
from mmgpt_diffusion.pipeline_dir import (
    DEFAULT_TEXT_TOKENS,
    PipelineParts,
    json_config,
    load_pipeline_parts,
    pipeline_parts_from_config,
)

if TYPE_CHECKING:
    from PIL import Image

# The from-scratch UNet: two resolutions, cross-attention only at the lower one where it
# costs 4× less (16×16 tokens for 32 px images). ~1M parameters.
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    # diffusers' historical name: this is the number of heads (64 channels / 4 = 16 per head)
    "attention_head_dim": 4,
    "norm_num_groups": 32,
}
# Set through the decoder's own arguments, so they cannot disagree with it.
_DERIVED_UNET_KEYS = ("sample_size", "in_channels", "out_channels", "cross_attention_dim")

PIXEL_DEFAULTS: dict[str, Any] = {
    "condition_dim": 128,
    "num_condition_tokens": 8,
    "image_size": 32,
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
SAMPLERS = ("dpm", "ddim", "ddpm")
OUTPUT_TYPES = ("pt", "pil", "latent")


def _randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, so a seed gives the same noise anywhere."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


@register("decoder", "diffusion")
class DiffusionDecoder(nn.Module):
    """Conditional diffusion image decoder over ``diffusers.UNet2DConditionModel``.

    Args:
        condition_dim: width D of the conditioning vectors (the UNet's cross_attention_dim).
        num_condition_tokens: number K of conditioning vectors per image.
        image_size: side of the generated square images, in pixels.
        channels: image channels (3, RGB).
        unet_config: ``UNet2DConditionModel`` arguments merged over ``TINY_UNET_CONFIG``
            (pixel space only; sample_size, in/out_channels, cross_attention_dim are derived).
        num_train_timesteps, beta_schedule, prediction_type, timestep_spacing: the DDPM
            training noise schedule (``diffusers.DDPMScheduler``); the samplers reuse it.
        p_uncond: probability, in training mode, of replacing a sample's condition by the
            learned null condition (classifier-free guidance); at 0 the null condition is
            frozen (``requires_grad=False``), as no loss would ever train it.
        channels_last: run the UNet in NHWC memory format. ``None`` = on CUDA only: cuDNN's
            NHWC convolutions are faster there, while on CPU it measured no gain (0.9–1.0×,
            tiny UNet, 16 and 32 px).
        pipeline_dir: build from a local diffusers pipeline directory instead (see
            ``from_pipeline_dir``); then schedule arguments left at ``None`` come from its
            ``scheduler/`` folder and ``condition_dim`` is the UNet's cross_attention_dim.
        vae: a local ``AutoencoderKL`` directory (``save_pretrained``'s, a pipeline's
            ``vae/``, or ``mmgpt train autoencoder``'s ``OUT/model``): the fresh UNet then
            denoises its latents (``image_size`` default: the VAE's ``sample_size``).
        vae_config: the VAE's architecture alone, as ``config_dict()`` records it: how a
            saved model directory rebuilds the decoder before loading its weights (the VAE
            would otherwise keep random weights; give ``vae`` to train).
        pipeline_config: likewise for a pipeline directory's decoder: the configs of its
            ``unet/``, ``vae/`` and ``scheduler/``, so that a saved model loads without the
            folder.

    ``config_dict()`` returns arguments that rebuild an identical module with
    ``mmgpt.registry.create("decoder", "diffusion", **config)``.
    """

    modality = "image"

    def __init__(
        self,
        *,
        condition_dim: int | None = None,
        num_condition_tokens: int | None = None,
        image_size: int | None = None,
        channels: int = 3,
        unet_config: dict[str, Any] | None = None,
        num_train_timesteps: int | None = None,
        beta_schedule: str | None = None,
        prediction_type: str | None = None,
        timestep_spacing: str | None = None,
        p_uncond: float = 0.1,
        channels_last: bool | None = None,
        pipeline_dir: str | Path | None = None,
        vae: str | Path | None = None,
        vae_config: dict[str, Any] | None = None,
        pipeline_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        diffusers = require_diffusers()
        self._check_p_uncond(p_uncond)
        self.channels_last = channels_last
        self._unet_channels_last = False
        self.pipeline_dir = None if pipeline_dir is None else str(pipeline_dir)

        given = (num_train_timesteps, beta_schedule, prediction_type, timestep_spacing)
        schedule_keys = (
            "num_train_timesteps",
            "beta_schedule",
            "prediction_type",
            "timestep_spacing",
        )
        schedule = {k: v for k, v in zip(schedule_keys, given) if v is not None}
        if vae is not None and vae_config is not None:
            raise ValueError("give vae (a directory) or vae_config (a saved model's), not both")
        latent_vae = None
        if vae is not None:
            latent_vae = load_autoencoder(vae)
        elif vae_config is not None:
            latent_vae = autoencoder_from_config(dict(vae_config))
        if pipeline_dir is not None and pipeline_config is not None:
            raise ValueError("give pipeline_dir or pipeline_config (a saved model's), not both")
        pipeline = pipeline_dir if pipeline_dir is not None else pipeline_config
        if pipeline is not None and latent_vae is not None:
            raise ValueError(
                "vae cannot be combined with pipeline_dir: a pipeline directory brings its "
                f"own vae/ ({pipeline_dir or 'pipeline_config'})"
            )
        if pipeline is None:
            self._build_pixel_unet(
                diffusers,
                condition_dim,
                num_condition_tokens,
                image_size,
                channels,
                unet_config,
                latent_vae,
            )
            scheduler_config: dict[str, Any] = {k: PIXEL_DEFAULTS[k] for k in schedule_keys}
            if latent_vae is None:
                # pixels live in [-1, 1]: clipping the predicted x0 there keeps samplers in range
                scheduler_config.update(clip_sample=True, clip_sample_range=1.0)
            else:
                scheduler_config.update(clip_sample=False)  # scaled latents are unbounded
        else:
            source = str(pipeline_dir) if pipeline_dir is not None else "pipeline_config"
            if unet_config is not None:
                raise ValueError(
                    "unet_config cannot be combined with pipeline_dir: the UNet comes from "
                    f"{source}/unet"
                )
            parts = (
                load_pipeline_parts(pipeline_dir)
                if pipeline_dir is not None
                else pipeline_parts_from_config(dict(pipeline_config or {}))
            )
            scheduler_config = self._load_pipeline(
                parts, source, condition_dim, num_condition_tokens, image_size
            )
        scheduler_config.update(schedule)
        self._check_schedule(scheduler_config)
        self.noise_scheduler = diffusers.DDPMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        # The unconditional ("null") condition of classifier-free guidance; zeros make the
        # cross-attention values identical, i.e. "no information", before it is learned.
        self.null_condition = nn.Parameter(
            torch.zeros(self.num_condition_tokens, self.condition_dim)
        )
        self.p_uncond = p_uncond

    # -- construction ------------------------------------------------------------------
    def _build_pixel_unet(
        self,
        diffusers: Any,
        condition_dim: int | None,
        num_condition_tokens: int | None,
        image_size: int | None,
        channels: int,
        unet_config: dict[str, Any] | None,
        vae: Any = None,
    ) -> None:
        """A fresh UNet over pixels, or over the latents of ``vae`` (frozen) when given."""
        self.condition_dim = int(condition_dim or PIXEL_DEFAULTS["condition_dim"])
        self.num_condition_tokens = int(
            num_condition_tokens or PIXEL_DEFAULTS["num_condition_tokens"]
        )
        if vae is None:
            self.image_size = int(image_size or PIXEL_DEFAULTS["image_size"])
            self.channels = int(channels)
            self.vae_scale_factor = 1
            unet_channels = self.channels
        else:
            self._set_vae(vae)
            sample_size = vae.config.sample_size
            if isinstance(sample_size, (list, tuple)):
                sample_size = sample_size[0]
            self.image_size = int(image_size or sample_size)
            unet_channels = int(vae.config.latent_channels)
        overrides = dict(unet_config or {})
        derived = sorted(set(overrides) & set(_DERIVED_UNET_KEYS))
        if derived:
            raise ValueError(
                f"unet_config must not set {derived}: they follow from image_size, channels "
                f"and condition_dim"
            )
        accepted = set(inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters)
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise ValueError(
                f"unet_config has keys that UNet2DConditionModel does not accept: {unknown}"
            )
        overrides = self._global_condition_config(overrides)
        # JSON-friendly (lists, not tuples) so config_dict() survives config.json unchanged
        self.unet_config = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in {**TINY_UNET_CONFIG, **overrides}.items()
        }
        unet_factor = 2 ** (len(self.unet_config["block_out_channels"]) - 1)
        factor = unet_factor * self.vae_scale_factor
        if self.image_size % factor:
            vae_part = f" × the VAE's {self.vae_scale_factor}" if vae is not None else ""
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {factor} (the UNet "
                f"downsamples {len(self.unet_config['block_out_channels']) - 1} times"
                f"{vae_part})"
            )
        self.unet = diffusers.UNet2DConditionModel(
            sample_size=self.image_size // self.vae_scale_factor,
            in_channels=unet_channels,
            out_channels=unet_channels,
            cross_attention_dim=self.condition_dim,
            **self.unet_config,
        )
        if vae is None:
            self.vae = None

    def _global_condition_config(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """``class_embed_type: projection``: the K condition vectors, flattened, also shift the
        UNet's time embedding, which every ResNet block reads. Cross-attention alone leaves a
        small UNet slow to learn attributes that hold for the whole image (colour, kind); the
        projection reaches every block at once. Its input width follows from K and D."""
        kind = overrides.get("class_embed_type")
        if kind is None:
            return overrides
        if kind != "projection":
            raise ValueError(
                f"unet_config.class_embed_type must be 'projection' (the condition vectors feed "
                f"the time embedding) or null, got {kind!r}: the other kinds take class ids, "
                "which a decoder conditioned on hidden states does not have"
            )
        width = self.condition_dim * self.num_condition_tokens
        given = overrides.get("projection_class_embeddings_input_dim")
        if given is not None and given != width:
            raise ValueError(
                f"unet_config.projection_class_embeddings_input_dim must be condition_dim × "
                f"num_condition_tokens = {width} (or left out), got {given!r}"
            )
        return {**overrides, "projection_class_embeddings_input_dim": width}

    def _set_vae(self, vae: Any) -> None:
        """Attach ``vae`` as the fixed codec: frozen, in eval mode (see ``train``)."""
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = int(vae.config.in_channels)

    def _load_pipeline(
        self,
        parts: PipelineParts,
        pipeline_dir: str,
        condition_dim: int | None,
        num_condition_tokens: int | None,
        image_size: int | None,
    ) -> dict[str, Any]:
        self.unet = parts.unet
        self.unet_config = None
        width = int(self.unet.config.cross_attention_dim)
        if condition_dim is not None and condition_dim != width:
            raise ValueError(
                f"condition_dim={condition_dim} does not match {pipeline_dir}/unet's "
                f"cross_attention_dim={width}"
            )
        self.condition_dim = width
        self.num_condition_tokens = int(
            num_condition_tokens or parts.text_tokens or DEFAULT_TEXT_TOKENS
        )
        self.vae = None
        if parts.vae is not None:
            self._set_vae(parts.vae)  # a fixed codec: only the UNet (and the projector) learn
        else:
            self.vae_scale_factor = 1
            self.channels = int(self.unet.config.in_channels)
        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        if image_size is None and sample_size is None:
            raise ValueError(f"{pipeline_dir}/unet/config.json has no sample_size; pass image_size")
        self.image_size = int(image_size or sample_size * self.vae_scale_factor)
        if self.image_size % self.vae_scale_factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by the VAE's downsampling "
                f"factor {self.vae_scale_factor}"
            )
        config = {k: v for k, v in parts.scheduler_config.items() if not k.startswith("_")}
        if self.vae is not None:
            # Scaled VAE latents are not confined to [-1, 1]; a PNDM config (Stable
            # Diffusion's) has no clip_sample key and DDPM's default (True) would clip them.
            config["clip_sample"] = False
        return config

    @staticmethod
    def _check_p_uncond(value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"p_uncond must be a number in [0, 1], got {value!r}")

    @property
    def p_uncond(self) -> float:
        """Probability of training a sample on the null condition (classifier-free guidance)."""
        return self._p_uncond

    @p_uncond.setter
    def p_uncond(self, value: float) -> None:
        self._check_p_uncond(value)
        self._p_uncond = float(value)
        # At 0 the null condition never enters a training loss: freeze it so optimizers skip
        # it and it keeps the value it was given (e.g. an empty-prompt text embedding).
        self.null_condition.requires_grad_(self._p_uncond > 0)

    @staticmethod
    def _check_schedule(config: dict[str, Any]) -> None:
        for key, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if config.get(key) is not None and config[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {config[key]!r}")

    @classmethod
    def from_pipeline_dir(cls, path: str | Path, **kwargs: Any) -> DiffusionDecoder:
        """Drive a pretrained diffusers pipeline from a local directory (no network).

        ``path`` holds ``unet/`` (UNet2DConditionModel), ``scheduler/`` and, for a latent
        model, ``vae/`` (AutoencoderKL), as written by ``save_pretrained``. The conditioning
        is the UNet's text-embedding space: ``condition_dim`` = its cross_attention_dim and
        ``num_condition_tokens`` = the text encoder's context length (77 when unknown).
        The null condition starts at zeros; ``set_null_condition`` can load the text
        encoder's empty-prompt embedding for guidance before any fine-tuning.
        """
        return cls(pipeline_dir=path, **kwargs)

    def config_dict(self) -> dict[str, Any]:
        """Arguments that rebuild this decoder with ``create("decoder", "diffusion", **cfg)``."""
        sched = self.noise_scheduler.config
        config: dict[str, Any] = {
            "condition_dim": self.condition_dim,
            "num_condition_tokens": self.num_condition_tokens,
            "image_size": self.image_size,
            "channels": self.channels,
            "num_train_timesteps": int(sched.num_train_timesteps),
            "beta_schedule": sched.beta_schedule,
            "prediction_type": sched.prediction_type,
            "timestep_spacing": sched.timestep_spacing,
            "p_uncond": self.p_uncond,
            "channels_last": self.channels_last,
        }
        # architectures only, never paths: the weights are in the model's safetensors
        if self.unet_config is not None:
            config["unet_config"] = dict(self.unet_config)
            if self.vae is not None:
                config["vae_config"] = json_config(self.vae)
        else:
            config["pipeline_config"] = {
                "unet": json_config(self.unet),
                "vae": None if self.vae is None else json_config(self.vae),
                "scheduler": {k: v for k, v in sched.items() if not k.startswith("_")},
            }
        return config

    # -- the frozen VAE ------------------------------------------------------------------
    def train(self, mode: bool = True) -> DiffusionDecoder:
        """As ``nn.Module.train``; the VAE, a fixed codec, stays in eval mode."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> DiffusionDecoder:
        """As ``nn.Module.requires_grad_`` (``MultimodalGPT.trainable`` calls it), except
        that what no loss reaches stays frozen: the VAE (targets are encoded without
        gradients) and, at ``p_uncond=0``, the null condition."""
        super().requires_grad_(requires_grad)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.null_condition.requires_grad_(requires_grad and self._p_uncond > 0)
        return self

    @classmethod
    def conformance_example(cls) -> DiffusionDecoder:
        """A small instance for :mod:`mmgpt.testing` (p_uncond=0: one loss reaches every
        trainable parameter)."""
        return cls(condition_dim=16, num_condition_tokens=2, image_size=16, p_uncond=0.0)

    def example_targets(self, n: int) -> torch.Tensor:
        """``n`` random training images in [-1, 1] of the size this decoder works at."""
        g = torch.Generator().manual_seed(0)
        shape = (n, self.channels, self.image_size, self.image_size)
        return torch.rand(shape, generator=g) * 2 - 1

    # -- helpers -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.null_condition.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    def set_null_condition(self, embedding: torch.Tensor) -> None:
        """Set the null condition, e.g. to a text encoder's embedding of the empty prompt."""
        expected = (self.num_condition_tokens, self.condition_dim)
        if embedding.dim() == 3 and embedding.shape[0] == 1:
            embedding = embedding[0]
        if tuple(embedding.shape) != expected:
            raise ValueError(
                f"null condition must have shape {expected} (num_condition_tokens, "
                f"condition_dim), got {tuple(embedding.shape)}"
            )
        with torch.no_grad():
            self.null_condition.copy_(embedding)

    def _check_condition(self, condition: torch.Tensor) -> torch.Tensor:
        if not isinstance(condition, torch.Tensor) or condition.dim() != 3:
            got = tuple(condition.shape) if isinstance(condition, torch.Tensor) else condition
            raise ValueError(
                f"condition must be a tensor of shape (batch, num_condition_tokens="
                f"{self.num_condition_tokens}, condition_dim={self.condition_dim}), got {got}"
            )
        if condition.shape[1:] != (self.num_condition_tokens, self.condition_dim):
            raise ValueError(
                f"condition has shape {tuple(condition.shape)}; expected (batch, "
                f"num_condition_tokens={self.num_condition_tokens}, "
                f"condition_dim={self.condition_dim})"
            )
        return condition.to(device=self.device, dtype=self.dtype)

    def _channels_last_active(self, device: torch.device) -> bool:
        enabled = self.channels_last if self.channels_last is not None else device.type == "cuda"
        if enabled and not self._unet_channels_last:
            # Converted once, in place (the Parameter objects and optimizer links stay).
            # inference_mode(False): when first reached inside generate(), the new storage
            # must still be usable for training afterwards.
            with torch.inference_mode(False), torch.no_grad():
                self.unet.to(memory_format=torch.channels_last)
            self._unet_channels_last = True
        return enabled

    def _unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor
    ) -> torch.Tensor:
        if self._channels_last_active(sample.device):
            sample = sample.contiguous(memory_format=torch.channels_last)
        extra = {}
        if self.unet.config.class_embed_type == "projection":
            extra["class_labels"] = condition.flatten(1)
        return self.unet(
            sample, timestep, encoder_hidden_states=condition, return_dict=False, **extra
        )[0]

    # -- images <-> model space ----------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → ``(B, channels, image_size, image_size)`` in [-1, 1] (center crop)."""
        return images_to_tensor(images, self.image_size, self.channels)

    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] → the space the UNet denoises (pixels, or scaled VAE latents)."""
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"images must have shape (batch, {self.channels}, H, W), got {tuple(images.shape)}"
            )
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} pixels; this decoder works at "
                f"{self.image_size}×{self.image_size} (resize with preprocess())"
            )
        lo, hi = torch.aminmax(images.detach())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"images must be scaled to [-1, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]"
            )
        images = images.to(device=self.device, dtype=self.dtype)
        if self.vae is None:
            return images
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample(generator)
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space samples → images in [0, 1]."""
        if self.vae is not None:
            shift = self.vae.config.shift_factor or 0.0
            latents = latents / self.vae.config.scaling_factor + shift
            latents = self.vae.decode(latents, return_dict=False)[0]
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """``(B, C, H, W)`` or ``(C, H, W)`` in [0, 1] → list of PIL images."""
        from PIL import Image

        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W) in [0, 1], got {tuple(images.shape)}")
        arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out = []
        for a in arrays.transpose(0, 2, 3, 1):
            out.append(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a))
        return out

    # -- training ------------------------------------------------------------------------
    def drop_condition(
        self, condition: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """In training mode, replace each sample's condition by the null one w.p. ``p_uncond``."""
        if not self.training or self.p_uncond <= 0.0:
            return condition
        gen_device = generator.device if generator is not None else condition.device
        drop = torch.rand(condition.shape[0], generator=generator, device=gen_device)
        drop = (drop < self.p_uncond).to(condition.device)[:, None, None]
        return torch.where(drop, self.null_condition.to(condition.dtype), condition)

    def training_loss(
        self,
        condition: torch.Tensor,
        images: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error of the UNet's prediction (ε, v or x₀, per the schedule).

        Args:
            condition: ``(B, num_condition_tokens, condition_dim)``.
            images: ``(B, channels, image_size, image_size)`` in [-1, 1].
            noise, timesteps: fixed values instead of random draws (evaluation, tests).
            generator: source of the random timesteps, noise and condition dropout.
        """
        condition = self._check_condition(condition)
        x0 = self.encode_images(images, generator)
        if x0.shape[0] != condition.shape[0]:
            raise ValueError(
                f"condition has batch {condition.shape[0]} but images have batch {x0.shape[0]}"
            )
        batch = x0.shape[0]
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        if timesteps is None:
            gen_device = generator.device if generator is not None else x0.device
            timesteps = torch.randint(
                0, self.num_train_timesteps, (batch,), generator=generator, device=gen_device
            )
        timesteps = timesteps.to(x0.device).long()
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must have shape ({batch},), got {tuple(timesteps.shape)}")
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, timesteps)
        else:  # "sample"
            target = x0
        condition = self.drop_condition(condition, generator)
        prediction = self._unet(noisy, timesteps, condition)
        return F.mse_loss(prediction.float(), target.float())

    # -- sampling ------------------------------------------------------------------------
    def predict(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        condition: torch.Tensor,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The UNet's output at one step, with classifier-free guidance when scale > 1.

        ``guidance_scale <= 1`` (1 or 0 alike, diffusers' convention) is one conditional pass;
        ``> 1`` is ``uncond + scale · (cond − uncond)`` from a single UNet call on the
        concatenated batch ``[cond; null]``.
        """
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        condition = self._check_condition(condition)
        if guidance_scale <= 1.0:
            return self._unet(sample, timestep, condition)
        null = self.null_condition.to(condition.dtype).expand_as(condition)
        both = self._unet(torch.cat([sample, sample]), timestep, torch.cat([condition, null]))
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def make_sampler(self, sampler: str = "dpm") -> Any:
        """A fresh inference scheduler sharing the training noise schedule.

        "dpm": DPM-Solver++ (2nd order multistep), good in 10–25 steps; "ddim":
        deterministic DDIM (eta=0 by default); "ddpm": ancestral DDPM (stochastic).
        """
        diffusers = require_diffusers()
        config = self.noise_scheduler.config
        if sampler == "dpm":
            pixel = self.vae is None and config.clip_sample
            return diffusers.DPMSolverMultistepScheduler.from_config(
                config,
                algorithm_type="dpmsolver++",
                solver_order=2,
                # DPM-Solver has no clip_sample; thresholding at sample_max_value=1 clips the
                # predicted x0 to [-1, 1] exactly like DDIM's clip_sample in pixel space.
                thresholding=bool(pixel),
                sample_max_value=float(config.clip_sample_range) if pixel else 1.0,
            )
        if sampler == "ddim":
            return diffusers.DDIMScheduler.from_config(config)
        if sampler == "ddpm":
            return diffusers.DDPMScheduler.from_config(config)
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    def generate(
        self,
        condition: torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        sampler: str = "dpm",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        *,
        eta: float = 0.0,
        output_type: str = "pt",
    ) -> Any:
        """Sample images for ``condition`` ``(B, num_condition_tokens, condition_dim)``.

        Returns ``(B, channels, image_size, image_size)`` in [0, 1] (``output_type="pt"``),
        PIL images (``"pil"``) or the undecoded model-space samples (``"latent"``). ``seed``
        (or an explicit ``generator``) makes sampling reproducible; ``eta`` is DDIM's noise.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.num_train_timesteps}], "
                f"got {num_inference_steps}"
            )
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        with torch.inference_mode():
            latents = self._sample(
                condition, num_inference_steps, guidance_scale, sampler, generator, eta
            )
            if output_type == "latent":
                return latents
            images = self.decode_latents(latents)
        return self.to_pil(images) if output_type == "pil" else images

    def _sample(
        self,
        condition: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        sampler: str,
        generator: torch.Generator | None,
        eta: float,
    ) -> torch.Tensor:
        condition = self._check_condition(condition)
        scheduler = self.make_sampler(sampler)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (condition.shape[0], self.latent_channels, self.latent_size, self.latent_size)
        x = _randn(shape, generator, self.device, self.dtype) * scheduler.init_noise_sigma
        step_kw: dict[str, Any] = {"generator": generator}
        if sampler == "ddim":
            # Recompute the noise from the clipped x0: otherwise DDIM mixes a clipped x0 with
            # the unclipped noise, an inconsistency that grows with the number of steps (near-
            # white backgrounds drifted darker and the judged accuracy fell from 0.59 at 10
            # steps to 0.19 at 50, while DPM-Solver++, which updates in x0, stayed at 0.97).
            step_kw.update(eta=eta, use_clipped_model_output=True)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            output = self.predict(model_input, t, condition, guidance_scale)
            x = scheduler.step(output, t, x, return_dict=False, **step_kw)[0]
        return x
