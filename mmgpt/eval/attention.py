"""Attention maps: run one prompt with ``output_attentions=True`` and draw what each layer reads.

:func:`prompt_attentions` runs a text GPT or a :class:`~mmgpt.multimodal.MultimodalGPT` on one
prompt and returns its per-layer weights ``(H, T, T)``; :func:`write_attention_maps` draws them
as PNG heatmaps (token × token, one per layer and head, and the mean over heads) and, for each
image of the prompt, the attention of the last prompt token to that image's slots, laid on the
patch grid and over the image. ``attention.json`` records the tokens, the layers, the heads,
the shapes, every file written and the head-averaged maps, so the figures can be read back.
Drawing uses PIL only (no text on the figures).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mmgpt.generation import encode_prompt
from mmgpt.multimodal import MultimodalGPT

# A perceptually ordered colour ramp (dark blue → teal → yellow), interpolated linearly.
_RAMP = ((13, 8, 135), (84, 2, 163), (139, 10, 165), (185, 50, 137), (219, 92, 104),
         (244, 136, 73), (254, 188, 43), (240, 249, 33))  # fmt: skip
_MIN_CELL = 4  # pixels per token cell at least
_TARGET = 384  # a token × token map is drawn about this many pixels wide


@dataclass
class PromptAttention:
    """One prompt's attention weights: ``weights[l]`` is layer ``l``'s ``(H, T, T)``."""

    tokens: list[str]  # (T,) the text of each position; image slots read "<image>"
    weights: list[Tensor]  # per layer (H, T, T), rows sum to 1
    images: list[Image.Image] = field(default_factory=list)
    image_slots: list[tuple[int, int]] = field(default_factory=list)  # (first slot, count)


def prompt_attentions(
    model: torch.nn.Module, tokenizer: Any, prompt: Any, images: Sequence[Image.Image] = ()
) -> PromptAttention:
    """Run ``prompt`` once and keep every layer's attention weights.

    A text GPT takes ``prompt`` as text (framed as the tokenizer frames text, as generation
    does); a MultimodalGPT takes a conversation or a raw string with one ``"<image>"`` per
    image, rendered and expanded by its processor as generation does.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(model, MultimodalGPT):
                batch = model.processor().prompt_batch([prompt], [list(images)])
                ids = batch.input_ids[0].tolist()
                out = model(batch, output_attentions=True, logits_to_keep=1)
                K = model.num_slots("image") if "image" in model.encoders else 0
                slots = [(int(c), K) for _, c in batch.image_positions.tolist()]
            else:
                if images:
                    raise ValueError("images need a multimodal model; this one is text-only")
                ids = list(encode_prompt(tokenizer, prompt))
                if not ids:
                    raise ValueError("the prompt encodes to no tokens")
                device = next(model.parameters()).device
                out = model(
                    input_ids=torch.tensor([ids], device=device),
                    output_attentions=True,
                    logits_to_keep=1,
                )
                slots = []
    finally:
        model.train(was_training)
    slot_id = getattr(tokenizer, "image_token_id", None)
    tokens = [
        "<image>" if slot_id is not None and t == slot_id else tokenizer.decode([t]) for t in ids
    ]
    weights = [w[0].float().cpu() for w in out.attentions]  # per layer (H, T, T)
    return PromptAttention(tokens, weights, list(images), slots)


def _colour(values: Tensor) -> Image.Image:
    """A (h, w) tensor of values in [0, 1] → an RGB image through the colour ramp."""
    ramp = torch.tensor(_RAMP, dtype=torch.float32)  # (R, 3)
    x = values.clamp(0, 1) * (len(_RAMP) - 1)  # (h, w)
    lo = x.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (x - lo)[..., None]  # (h, w, 1)
    rgb = ramp[lo] * (1 - frac) + ramp[lo + 1] * frac  # (h, w, 3)
    return Image.fromarray(rgb.round().to(torch.uint8).numpy(), mode="RGB")


def _normalised(values: Tensor) -> Tensor:
    top = float(values.max())
    return values / top if top > 0 else values


def heatmap(matrix: Tensor) -> Image.Image:
    """A token × token map (queries down, keys across), scaled by its maximum, cells enlarged."""
    T, S = matrix.shape
    cell = max(_MIN_CELL, _TARGET // max(T, S))
    return _colour(_normalised(matrix)).resize((S * cell, T * cell), Image.Resampling.NEAREST)


def patch_grid(num_tokens: int) -> tuple[int, int]:
    """(rows, columns) of an image's slots: a √n × √n grid, or one row if n is no square."""
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else (1, num_tokens)


def overlay(image: Image.Image, scores: Tensor, alpha: float = 0.5) -> Image.Image:
    """``scores`` (rows, cols) scaled by their maximum, stretched over ``image`` and blended."""
    base = image.convert("RGB")
    heat = _colour(_normalised(scores)).resize(base.size, Image.Resampling.BILINEAR)
    return Image.blend(base, heat, alpha)


def _layers(requested: Sequence[int] | None, n_layer: int) -> list[int]:
    if not requested:
        return list(range(n_layer))
    bad = [layer for layer in requested if not 0 <= layer < n_layer]
    if bad:
        raise ValueError(f"--layers {bad}: the model has layers 0..{n_layer - 1}")
    return sorted(set(requested))


def write_attention_maps(
    result: PromptAttention, out_dir: str | Path, layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """Draw ``result``'s maps into ``out_dir`` and write ``attention.json``; returns its summary.

    Files: ``layer{L}_head{H}.png`` and ``layer{L}_mean.png`` (token × token), and per image
    ``image{I}_layer{L}.png`` (the last prompt token's attention over the patch grid, on the
    image) and ``image{I}_layer{L}_grid.png`` (the grid alone).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = _layers(layers, len(result.weights))
    n_heads = result.weights[0].size(0)
    files: list[str] = []
    means: dict[str, list[list[float]]] = {}
    image_maps: list[dict[str, Any]] = []

    def save(picture: Image.Image, name: str) -> None:
        picture.save(out / name)
        files.append(name)

    for layer in chosen:
        w = result.weights[layer]  # (H, T, T)
        for head in range(n_heads):
            save(heatmap(w[head]), f"layer{layer}_head{head}.png")
        mean = w.mean(0)  # (T, T)
        save(heatmap(mean), f"layer{layer}_mean.png")
        means[str(layer)] = [[round(float(v), 6) for v in row] for row in mean]
        for i, (image, (first, count)) in enumerate(
            zip(result.images, result.image_slots, strict=True)
        ):
            scores = mean[-1, first : first + count]  # (K,) last prompt token → image slots
            grid = scores.reshape(patch_grid(count))  # (rows, cols)
            save(overlay(image, grid), f"image{i}_layer{layer}.png")
            save(heatmap(grid), f"image{i}_layer{layer}_grid.png")
            image_maps.append(
                {
                    "image": i,
                    "layer": layer,
                    "first_slot": first,
                    "grid": list(grid.shape),
                    "scores": [[round(float(v), 6) for v in row] for row in grid],
                }
            )
    T = len(result.tokens)
    summary = {
        "tokens": result.tokens,
        "layers": chosen,
        "heads": n_heads,
        "shape": [n_heads, T, T],  # per layer: (heads, queries, keys)
        "files": files,
        "mean_attention": means,  # layer → (T, T), averaged over heads
        "image_attention": image_maps,
    }
    (out / "attention.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return {"out_dir": str(out), "layers": chosen, "heads": n_heads, "files": len(files) + 1}
