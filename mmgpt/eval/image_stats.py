"""Distribution statistics of a set of generated images against the real ones.

No model is needed for these, so ``mmgpt eval --task t2i`` always reports them:

- ``channel_mean`` / ``channel_std``: per RGB channel, over all pixels of a set (in [0, 1]);
- ``histogram_distance``: total variation distance (½ Σ|p − q|, 0 = same, 1 = disjoint)
  between the joint RGB colour histograms (``bins`` per channel) of the two sets;
- ``frechet_distance``: the Fréchet distance between Gaussians fitted to features of the two
  sets (FID's formula, on a cheap feature space: a judge's or CLIP's features when given,
  else images downsampled to 8×8 pixels); 0 for identical statistics;
- ``diversity``: mean RMS pixel distance over all pairs of images of a set (0 = all the same);
- ``real_halves``: the histogram and Fréchet distances between the even and odd halves of
  the real images: what sampling noise alone gives with this many images (a generated set
  cannot be expected to come closer than that).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "channel_stats",
    "color_histogram",
    "distribution_report",
    "frechet_distance",
    "histogram_distance",
    "pairwise_diversity",
    "pixel_features",
]


def _check(images: Tensor, name: str) -> None:
    if images.dim() != 4 or images.size(1) != 3:
        raise ValueError(
            f"{name} must have shape (N, 3, H, W) in [0, 1], got {tuple(images.shape)}"
        )


def channel_stats(images: Tensor) -> dict[str, list[float]]:
    """Mean and standard deviation of each RGB channel over every pixel of ``images``."""
    _check(images, "images")
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double()
    return {"mean": pixels.mean(1).tolist(), "std": pixels.std(1, unbiased=False).tolist()}


def color_histogram(images: Tensor, bins: int = 8) -> Tensor:
    """The joint RGB histogram of all pixels (``bins**3`` cells, summing to 1)."""
    _check(images, "images")
    q = (images.clamp(0, 1) * bins).long().clamp(max=bins - 1)  # (N, 3, H, W)
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    counts = torch.bincount(cell.reshape(-1), minlength=bins**3).double()
    return counts / counts.sum()


def histogram_distance(a: Tensor, b: Tensor, bins: int = 8) -> float:
    """Total variation distance between the colour histograms of two image sets."""
    return float(0.5 * (color_histogram(a, bins) - color_histogram(b, bins)).abs().sum())


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """``|μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^½)`` of features ``(N, D)`` of two sets.

    Tr((Σa Σb)^½) is computed as Σ √λ of the symmetric PSD matrix Σa^½ Σb Σa^½ (same
    eigenvalues) rather than with a general matrix square root: with fewer samples than
    dimensions the covariances are singular, and ``scipy.linalg.sqrtm`` then returns complex
    noise that FID implementations have to discard.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"frechet_distance needs two (N, D) feature sets of the same D with N >= 2, got "
            f"{a.shape} and {b.shape}"
        )
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(max(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2 * cross, 0.0))


def pixel_features(images: Tensor, side: int = 8) -> Tensor:
    """Images averaged down to ``side``×``side`` and flattened: ``(N, 3·side²)``."""
    _check(images, "images")
    return F.adaptive_avg_pool2d(images.float(), side).flatten(1)


def pairwise_diversity(images: Tensor) -> float | None:
    """Mean RMS pixel distance over all pairs (``None`` for fewer than two images)."""
    _check(images, "images")
    if images.size(0) < 2:
        return None
    pairs = itertools.combinations(range(images.size(0)), 2)
    return float(np.mean([float((images[i] - images[j]).pow(2).mean().sqrt()) for i, j in pairs]))


def distribution_report(
    generated: Tensor,
    real: Tensor,
    *,
    features: tuple[str, Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """The statistics of the module docstring for ``generated`` vs ``real`` images (both
    ``(N, 3, H, W)`` in [0, 1], the same H and W); ``features`` = ``(name, generated
    features, real features)`` for the Fréchet distance, default downsampled pixels."""
    _check(generated, "generated images")
    _check(real, "real images")
    if generated.shape[2:] != real.shape[2:]:
        raise ValueError(
            f"generated and real images must have the same size, got {tuple(generated.shape)} "
            f"and {tuple(real.shape)}"
        )
    name, gen_features, real_features = features or (
        "pixels_8x8",
        pixel_features(generated),
        pixel_features(real),
    )
    frechet = None
    if len(gen_features) >= 2 and len(real_features) >= 2:
        frechet = frechet_distance(gen_features.numpy(), real_features.numpy())
    # the same measures between two halves of the real images: what sampling noise alone gives
    halves = None
    if len(real) >= 4:
        odd, even = real[1::2], real[0::2]
        halves = {
            "histogram_distance": histogram_distance(even, odd),
            "frechet_distance": frechet_distance(real_features[0::2], real_features[1::2]),
        }
    return {
        "generated": {**_stats(generated), "diversity": pairwise_diversity(generated)},
        "real": {**_stats(real), "diversity": pairwise_diversity(real)},
        "histogram_distance": histogram_distance(generated, real),
        "frechet_distance": frechet,
        "frechet_features": name,
        "real_halves": halves,
        "num_generated": int(generated.size(0)),
        "num_real": int(real.size(0)),
    }


def _stats(images: Tensor) -> dict[str, Any]:
    stats = channel_stats(images)
    return {"channel_mean": stats["mean"], "channel_std": stats["std"]}
