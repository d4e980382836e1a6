"""CLIP score of images against their captions, with a CLIP model from a local directory.

The directory holds a transformers ``CLIPModel`` and its ``CLIPProcessor`` written by
``save_pretrained`` (e.g. a copy of ``openai/clip-vit-base-patch32``); weights are read from
safetensors only. The score of an (image, text) pair is ``100 · max(cos(image, text), 0)``
with the projected embeddings of the two towers (Hessel et al., 2021, without their 2.5
rescaling), so it lies in [0, 100].
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClipScorer", "clip_scores"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class ClipScorer:
    """A local CLIP model that embeds images and texts (L2-normalised) and scores pairs."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu") -> None:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--clip {path}: no such directory (a CLIPModel and CLIPProcessor saved with "
                "save_pretrained)"
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--clip {path}: config.json is missing")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{config_file}: not a JSON object ({exc})") from exc
        if model_type != "clip":
            raise ValueError(
                f"--clip {path}: config.json has model_type {model_type!r}; a CLIP score needs "
                "a CLIPModel (model_type 'clip', both towers)"
            )
        if not any((path / name).is_file() for name in _WEIGHTS):
            raise FileNotFoundError(
                f"--clip {path}: no {' or '.join(_WEIGHTS)} (weights are read from safetensors "
                "only; convert a pytorch_model.bin with save_pretrained)"
            )
        import transformers

        try:
            self.processor = transformers.CLIPProcessor.from_pretrained(
                str(path), local_files_only=True
            )
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(
                f"--clip {path}: cannot load its CLIPProcessor (tokenizer files and "
                f"preprocessor config, written by CLIPProcessor.save_pretrained): {exc}"
            ) from exc
        self.model = transformers.CLIPModel.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True
        )
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.path = path

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any], batch_size: int = 64) -> Tensor:
        """PIL images → ``(N, D)`` unit vectors of the image tower."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[i : i + batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return _normalise(out, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Texts → ``(N, D)`` unit vectors of the text tower (cut at the model's length)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.processor(
                text=list(texts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
            )
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return _normalise(out, self.model.config.projection_dim)


def _normalise(chunks: list[Tensor], dim: int) -> Tensor:
    if not chunks:
        return torch.zeros(0, dim)
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def clip_scores(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """``100 · max(cos, 0)`` of row ``i`` of each (unit vectors), per row."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"got {tuple(image_embeds.shape)} image and {tuple(text_embeds.shape)} text embeddings"
        )
    return 100 * (image_embeds * text_embeds).sum(-1).clamp(min=0)
