"""PIL images → tensors in [-1, 1], the range diffusion models and VAEs train on.

One function, shared by the diffusion decoder (its training targets) and the autoencoder
objective (its batches), so that both see an image exactly alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image


def images_to_tensor(
    images: Sequence[Image.Image], size: int, channels: int = 3, *, what: str = "images"
) -> torch.Tensor:
    """``(B, channels, size, size)`` in [-1, 1]: each image center-cropped to a square and
    resized (bicubic) to ``size``; ``channels`` 3 (RGB) or 1 (greyscale)."""
    import numpy as np
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{what}[{i}] is {type(image).__name__}, expected a PIL image")
        image = image.convert("RGB" if channels == 3 else "L")
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        array = np.asarray(image, dtype=np.float32).reshape(size, size, -1)
        out.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
    if not out:
        raise ValueError(f"{what}: no images")
    return torch.stack(out)
