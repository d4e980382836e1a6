"""Linear probes: how much of a label an encoder's features carry, read by logistic regression.

:func:`linear_probe` fits a multinomial logistic regression (L2-regularized, full-batch
L-BFGS, features standardized with the training split's statistics) on one split and reports
its accuracy on another. :func:`encoder_features` pools an encoder's tokens into one vector
per item, and :func:`shapes_probe` puts the two together on the shapes world: every
one-shape scene is rendered once, the scenes are split (so no test image was seen by the
probe), and the probe predicts the shape's kind and its colour from the mean-pooled
features.

The probe is deterministic (zero initialization, full batch), so two encoders are compared
on the same footing; chance is the share of the test split's most frequent label.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgpt.data.shapes import COLORS, KINDS, POSITIONS, SIZES, Shape, render_scene

__all__ = ["ProbeResult", "encoder_features", "linear_probe", "shapes_probe"]

PROBE_TARGETS = ("shape", "color")


@dataclass(frozen=True)
class ProbeResult:
    """Accuracy of a linear probe on the held-out split (and on the split it was fit on)."""

    accuracy: float
    train_accuracy: float
    chance: float  # the most frequent held-out label's share
    num_classes: int


def _check_split(features: Tensor, labels: Tensor, name: str) -> None:
    if features.dim() != 2:
        raise ValueError(
            f"linear_probe: {name}_features must be (N, D), got {tuple(features.shape)}"
        )
    if labels.dim() != 1 or labels.size(0) != features.size(0):
        raise ValueError(
            f"linear_probe: {name}_labels must be (N,) with N = {features.size(0)} (one label per "
            f"row of {name}_features), got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(
            f"linear_probe: {name}_labels must be integer class ids, got {labels.dtype}"
        )
    if features.size(0) == 0:
        raise ValueError(f"linear_probe: the {name} split is empty")


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> ProbeResult:
    """Fit logistic regression on ``(train_features (N, D), train_labels (N,))`` and score it
    on the test split.

    Args:
        num_classes: number of classes (default: one more than the largest label seen).
        l2: weight of ``‖W‖²`` (the mean cross-entropy is the rest of the objective).
        max_iter: L-BFGS iterations.
    """
    _check_split(train_features, train_labels, "train")
    _check_split(test_features, test_labels, "test")
    if train_features.size(1) != test_features.size(1):
        raise ValueError(
            f"linear_probe: train features have {train_features.size(1)} dimensions, test "
            f"features {test_features.size(1)}"
        )
    if l2 < 0:
        raise ValueError(f"linear_probe: l2 must be >= 0, got {l2}")
    train_labels, test_labels = train_labels.long(), test_labels.long()
    seen = int(max(train_labels.max(), test_labels.max())) + 1
    k = seen if num_classes is None else int(num_classes)
    if k < seen or int(min(train_labels.min(), test_labels.min())) < 0:
        raise ValueError(f"linear_probe: labels must lie in [0, {k}), got up to {seen - 1}")
    x = train_features.detach().double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-8)
    x = (x - mean) / std
    x_test = (test_features.detach().double() - mean) / std
    with torch.enable_grad():
        linear = nn.Linear(x.size(1), k).double()
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        optimizer = torch.optim.LBFGS(
            linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(linear(x), train_labels) + l2 * linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        train_acc = float((linear(x).argmax(-1) == train_labels).double().mean())
        test_acc = float((linear(x_test).argmax(-1) == test_labels).double().mean())
    chance = float(torch.bincount(test_labels, minlength=k).max()) / test_labels.numel()
    return ProbeResult(accuracy=test_acc, train_accuracy=train_acc, chance=chance, num_classes=k)


@torch.no_grad()
def encoder_features(encoder: Any, items: Sequence[Any], *, batch_size: int = 256) -> Tensor:
    """An encoder's tokens for ``items`` (PIL images, …), averaged over tokens: ``(N, d_enc)``.

    Runs in eval mode on the encoder's device, then restores its mode.
    """
    was_training = getattr(encoder, "training", False)
    encoder.eval()
    try:
        first = next(iter(encoder.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        chunks = []
        for start in range(0, len(items), batch_size):
            inputs = encoder.preprocess(list(items[start : start + batch_size])).to(device)
            chunks.append(encoder(inputs).float().mean(dim=1).cpu())  # (n, d_enc)
    finally:
        encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, int(encoder.output_dim))


def shapes_probe(
    encoder: Any,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    image_size: int | None = None,
    l2: float = 1e-3,
) -> dict[str, ProbeResult]:
    """Linear probes of ``encoder``'s mean-pooled features on one-shape scenes of the shapes
    world: ``{"shape": …, "color": …}`` (kind of shape: 5 classes; colour: 8).

    Each of the 720 scenes (5 kinds × 8 colours × 2 sizes × 9 positions) is rendered once at
    ``image_size`` (default: the encoder's input size); ``seed`` shuffles them and
    ``test_fraction`` of them are held out, so the probe is scored on scenes it never saw.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"shapes_probe: test_fraction must be in (0, 1), got {test_fraction}")
    if image_size is None:
        input_size = getattr(encoder, "input_size", None)
        if input_size is None:
            raise ValueError("shapes_probe: the encoder has no input_size; pass image_size")
        image_size = int(input_size[-1])
    scenes = [
        Shape(kind, color, size, position)
        for kind in KINDS
        for color in COLORS
        for size in SIZES
        for position in POSITIONS
    ]
    random.Random(seed).shuffle(scenes)
    n_test = round(len(scenes) * test_fraction)
    features = encoder_features(encoder, [render_scene([s], image_size) for s in scenes])
    colors = list(COLORS)
    labels = {
        "shape": torch.tensor([KINDS.index(s.shape) for s in scenes]),
        "color": torch.tensor([colors.index(s.color) for s in scenes]),
    }
    classes = {"shape": len(KINDS), "color": len(colors)}
    train, test = slice(n_test, None), slice(0, n_test)
    return {
        target: linear_probe(
            features[train],
            labels[target][train],
            features[test],
            labels[target][test],
            num_classes=classes[target],
            l2=l2,
        )
        for target in PROBE_TARGETS
    }
