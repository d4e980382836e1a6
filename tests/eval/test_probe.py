"""Linear probes on features whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmgpt.eval.probe import encoder_features, linear_probe, shapes_probe


def blobs(n: int, seed: int, *, classes: int = 3, dims: int = 6, noise: float = 0.3):
    """Class k sits at 2·e_k plus Gaussian noise: linearly separable for small noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    features = 2.0 * nn.functional.one_hot(labels, dims).float()
    return features + noise * torch.randn(n, dims, generator=g), labels


def test_separable_classes_are_read_exactly() -> None:
    x, y = blobs(120, seed=0)
    x_test, y_test = blobs(80, seed=1)
    result = linear_probe(x, y, x_test, y_test)
    assert result.accuracy == 1.0 and result.train_accuracy == 1.0
    assert result.num_classes == 3
    counts = torch.bincount(y_test, minlength=3)
    assert result.chance == pytest.approx(float(counts.max()) / 80)


def test_a_label_hidden_in_one_of_many_noisy_dimensions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g)
    y = (x[:, 7] > 0).long()  # only dimension 7 tells the class
    result = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert result.accuracy >= 0.95
    # scaled or shifted features read the same: the probe standardizes them first
    moved = linear_probe(1e3 * x[:300] + 5, y[:300], 1e3 * x[300:] + 5, y[300:])
    assert moved.accuracy == result.accuracy


def test_labels_unrelated_to_the_features_score_near_chance() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = torch.randint(0, 4, (600,), generator=g)
    result = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result.accuracy < result.chance + 0.1
    assert result.train_accuracy > result.accuracy  # what it fit was noise


def test_bad_inputs_name_the_argument() -> None:
    x, y = blobs(10, seed=0)
    with pytest.raises(ValueError, match=r"train_labels must be \(N,\) with N = 10"):
        linear_probe(x, y[:5], x, y)
    with pytest.raises(ValueError, match="test_labels must be integer class ids"):
        linear_probe(x, y, x, y.float())
    with pytest.raises(ValueError, match="train features have 6 dimensions, test features 5"):
        linear_probe(x, y, x[:, :5], y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        linear_probe(x, y, x, y, num_classes=2)


class MeanInk(nn.Module):
    """A fixed "encoder": the mean colour of the non-background pixels, as one token."""

    input_size = (3, 32, 32)
    output_dim = 3

    def preprocess(self, images) -> torch.Tensor:
        arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ink = (x.min(dim=1, keepdim=True).values < 0.9).float()  # (N, 1, H, W): not background
        colour = (x * ink).sum((2, 3)) / ink.sum((2, 3)).clamp(min=1)  # (N, 3)
        return colour[:, None]  # (N, 1, 3)


def test_shapes_probe_reads_colour_from_an_encoder_that_sees_colour() -> None:
    encoder = MeanInk()
    red = Image.new("RGB", (32, 32), (250, 250, 250))
    red.paste((200, 0, 0), (8, 8, 16, 16))
    features = encoder_features(encoder, [red, red.convert("L").convert("RGB")])
    assert features.shape == (2, 3)
    torch.testing.assert_close(features[0], torch.tensor([200 / 255, 0.0, 0.0]))
    results = shapes_probe(encoder, seed=0)
    assert set(results) == {"shape", "color"}
    assert results["color"].num_classes == 8 and results["shape"].num_classes == 5
    assert results["color"].accuracy >= 0.98  # on 360 scenes the probe never saw
    assert results["shape"].accuracy < 0.45  # mean colour says little about the kind of shape
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        shapes_probe(encoder, test_fraction=1.0)
