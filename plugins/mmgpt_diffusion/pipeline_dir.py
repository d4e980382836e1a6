"""Load the parts of a local diffusers pipeline directory (e.g. a Stable Diffusion folder).

Only what the image decoder drives is loaded: ``unet/`` (a ``UNet2DConditionModel``),
``scheduler/`` (its training noise schedule) and, for latent-space models, ``vae/`` (an
``AutoencoderKL``). The text encoder is not used: mmgpt's output projector produces the
conditioning in the text-embedding space instead. ``text_encoder/config.json`` is only read
for the number of conditioning tokens the UNet was trained with (77 for CLIP).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt_diffusion._deps import require_diffusers

if TYPE_CHECKING:
    import torch

WEIGHT_PREFIX = "diffusion_pytorch_model"
DEFAULT_TEXT_TOKENS = 77  # CLIP's context length, what Stable Diffusion UNets are trained on


@dataclass
class PipelineParts:
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any | None  # diffusers.AutoencoderKL, or None for a pixel-space UNet
    scheduler_config: dict[str, Any]
    text_tokens: int | None  # max_position_embeddings of text_encoder/, when present


def json_config(component: Any) -> dict[str, Any]:
    """A diffusers model's or scheduler's config as JSON values (lists, not tuples), without
    diffusers' bookkeeping keys (``_class_name`` kept; ``_diffusers_version``,
    ``_name_or_path``, ``_use_default_values`` dropped)."""
    config = {}
    for key, value in dict(component.config).items():
        if key.startswith("_") and key != "_class_name":
            continue
        config[key] = list(value) if isinstance(value, tuple) else value
    return config


def pipeline_parts_from_config(config: dict[str, Any]) -> PipelineParts:
    """The parts a ``pipeline_config`` describes (``{"unet": …, "vae": … or None,
    "scheduler": …}``, the configs a saved decoder records), with fresh weights: a model
    directory's weights are loaded into them after."""
    diffusers = require_diffusers()
    missing = [k for k in ("unet", "vae", "scheduler") if k not in config]
    if missing:
        raise ValueError(f"pipeline_config lacks {missing}; expected unet, vae and scheduler")
    unet = diffusers.UNet2DConditionModel.from_config(config["unet"])
    vae = None if config["vae"] is None else diffusers.AutoencoderKL.from_config(config["vae"])
    return PipelineParts(unet, vae, dict(config["scheduler"]), None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from exc


def _check_model_folder(root: Path, name: str, what: str) -> dict[str, Any]:
    """``root/name`` must hold ``config.json`` and ``diffusion_pytorch_model*`` weights."""
    folder = root / name
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{root}: not a usable diffusers pipeline directory: missing {name}/config.json "
            f"(expected a subfolder {name}/ with the {what}'s config.json and "
            f"{WEIGHT_PREFIX}.safetensors, as written by save_pretrained)"
        )
    if not any(folder.glob(f"{WEIGHT_PREFIX}*")):
        raise FileNotFoundError(
            f"{folder}: no weights found (expected {WEIGHT_PREFIX}.safetensors or .bin, "
            f"possibly sharded with an index file)"
        )
    return _read_json(config)


def load_pipeline_parts(
    path: str | Path, *, torch_dtype: torch.dtype | None = None, variant: str | None = None
) -> PipelineParts:
    """Validate ``path`` and load its UNet, VAE and scheduler config without network access."""
    diffusers = require_diffusers()
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: not a directory; expected a diffusers pipeline directory with "
            f"unet/, scheduler/ and, for latent-space models, vae/"
        )
    unet_config = _check_model_folder(root, "unet", "UNet2DConditionModel")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(
            f"{root}: not a usable diffusers pipeline directory: missing "
            f"scheduler/scheduler_config.json (the noise schedule the UNet was trained with)"
        )
    class_name = unet_config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise ValueError(
            f"{root / 'unet' / 'config.json'}: _class_name is {class_name!r}; the diffusion "
            f"decoder drives a UNet2DConditionModel (cross-attention conditioning)"
        )
    if isinstance(unet_config.get("cross_attention_dim"), list):
        raise ValueError(
            f"{root / 'unet' / 'config.json'}: per-block cross_attention_dim "
            f"{unet_config['cross_attention_dim']} is not supported; one conditioning width "
            f"is expected"
        )
    latent = unet_config.get("in_channels", 4) != 3
    vae = None
    if latent or (root / "vae").is_dir():
        _check_model_folder(root, "vae", "AutoencoderKL")

    load_kw: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        load_kw["torch_dtype"] = torch_dtype
    if variant is not None:
        load_kw["variant"] = variant
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", **load_kw)
    if (root / "vae").is_dir():
        vae = diffusers.AutoencoderKL.from_pretrained(str(root), subfolder="vae", **load_kw)
        if vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(
                f"{root}: vae/ produces {vae.config.latent_channels}-channel latents but unet/ "
                f"expects in_channels={unet.config.in_channels}"
            )
    # Loading through DDPMScheduler maps any compatible scheduler config (PNDM, DDIM, …)
    # onto the training schedule: betas, prediction type, timestep spacing.
    scheduler = diffusers.DDPMScheduler.from_pretrained(
        str(root), subfolder="scheduler", local_files_only=True
    )
    text_tokens = None
    text_config = root / "text_encoder" / "config.json"
    if text_config.is_file():
        data = _read_json(text_config)
        text_tokens = data.get("max_position_embeddings") or data.get("text_config", {}).get(
            "max_position_embeddings"
        )
    return PipelineParts(unet, vae, dict(scheduler.config), text_tokens)
