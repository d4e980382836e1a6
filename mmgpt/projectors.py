"""Projectors: encoder features ``(…, in_dim)`` to the decoder's width ``(…, out_dim)``.

Registered as kind ``"projector"``. Parameter names match LLaVA's ``mm_projector`` for the same
type (``weight``/``bias`` for ``"linear"``; ``0.*`` and ``2.*`` for ``"mlp2x_gelu"``), so its
projector weights load with a key prefix strip.

A projector may also change the number of tokens (``"pixel_shuffle"``: nanoVLM's and
Idefics3's, ``s²`` times fewer tokens, each ``s²`` times wider before the linear map). Such a
projector declares ``output_tokens(num_tokens)``, the tokens it gives per item for an encoder's
``num_tokens``; :class:`~mmgpt.multimodal.MultimodalGPT` asks it for the number of placeholder
slots an item fills.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from mmgpt.registry import register


def _check_dims(kind: str, **dims: Any) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"projector {kind!r}: {name} must be a positive integer, got {value!r}"
            )


@register("projector", "linear")
class LinearProjector(nn.Linear):
    """One linear map (LLaVA-1's projector)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        _check_dims("linear", in_dim=in_dim, out_dim=out_dim)
        super().__init__(in_dim, out_dim, bias=bias)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def config_dict(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "bias": self.bias is not None}

    @classmethod
    def conformance_example(cls) -> LinearProjector:
        """A small instance for :mod:`mmgpt.testing`."""
        return cls(in_dim=8, out_dim=6)


@register("projector", "mlp2x_gelu")
class MLPProjector(nn.Sequential):
    """Linear → GELU → Linear (LLaVA-1.5's ``mlp2x_gelu``); ``depth`` linear layers in all;
    ``bias=False`` drops their biases (a LLaVA config's ``multimodal_projector_bias``)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, bias: bool = True) -> None:
        _check_dims("mlp2x_gelu", in_dim=in_dim, out_dim=out_dim, depth=depth)
        if not isinstance(bias, bool):
            raise ValueError(f"projector 'mlp2x_gelu': bias must be true or false, got {bias!r}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.depth = depth
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:  # (…, in_dim) -> (…, out_dim)
        return super().forward(x)

    def config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "depth": self.depth,
        }
        if not self.bias:  # recorded only when off: configs saved before the option stay equal
            config["bias"] = False
        return config

    @classmethod
    def conformance_example(cls) -> MLPProjector:
        """A small instance for :mod:`mmgpt.testing`."""
        return cls(in_dim=8, out_dim=6)


@register("projector", "pixel_shuffle")
class PixelShuffleProjector(nn.Module):
    """Pixel shuffle, then a linear map (or an MLP) to ``out_dim``: nanoVLM's and Idefics3's
    modality projector.

    The ``num_tokens`` input tokens of an item are a square grid of patches (no class token);
    each ``scale_factor`` × ``scale_factor`` neighbourhood becomes one token whose features are
    its tokens' features side by side (row by row), so an item has ``s²`` times fewer tokens,
    each ``s²`` times wider: ``(N, num_tokens, in_dim) → (N, num_tokens / s², in_dim · s²)``,
    then ``depth`` linear layers (GELU between them) to ``out_dim``.

    ``num_tokens`` fixes the grid (:meth:`MultimodalGPT.build` passes the encoder's);
    :meth:`output_tokens` says how many tokens an item gets. ``num_signal_tokens`` and
    ``num_condition_tokens`` state the same shapes in the terms of the
    :class:`~mmgpt.interfaces.Projector` contract for projectors that change the token axis.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tokens: int,
        scale_factor: int = 2,
        depth: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(
            "pixel_shuffle",
            in_dim=in_dim,
            out_dim=out_dim,
            num_tokens=num_tokens,
            scale_factor=scale_factor,
            depth=depth,
        )
        if not isinstance(bias, bool):
            raise ValueError(f"projector 'pixel_shuffle': bias must be true or false, got {bias!r}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.num_tokens, self.scale_factor = num_tokens, scale_factor
        self.depth, self.bias = depth, bias
        self.grid = self._grid(num_tokens)
        width = in_dim * scale_factor**2
        layers: list[nn.Module] = [nn.Linear(width, out_dim, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
        self.proj = nn.Sequential(*layers)

    def _grid(self, num_tokens: int) -> int:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % self.scale_factor:
            raise ValueError(
                f"projector 'pixel_shuffle': {num_tokens} tokens are not a square grid whose "
                f"side is a multiple of scale_factor={self.scale_factor} (an encoder's patch "
                "tokens, without a class token)"
            )
        return side

    def output_tokens(self, num_tokens: int) -> int:
        """Tokens per item out of ``num_tokens`` in: ``num_tokens / scale_factor²``."""
        if num_tokens != self.num_tokens:
            raise ValueError(
                f"projector 'pixel_shuffle' is built for {self.num_tokens} tokens per item, "
                f"the encoder gives {num_tokens}"
            )
        return num_tokens // self.scale_factor**2

    @property
    def num_signal_tokens(self) -> int:
        return self.num_tokens

    @property
    def num_condition_tokens(self) -> int:
        return self.output_tokens(self.num_tokens)

    def pixel_shuffle(self, x: Tensor) -> Tensor:  # (N, L, D) -> (N, L / s², D·s²)
        N, tokens, D = x.shape
        if tokens != self.num_tokens:
            raise ValueError(
                f"projector 'pixel_shuffle' is built for {self.num_tokens} tokens per item, "
                f"got input of shape {tuple(x.shape)}"
            )
        s, side = self.scale_factor, self.grid
        x = x.reshape(N, side // s, s, side // s, s, D)  # (N, H/s, s, W/s, s, D)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (N, H/s, W/s, s, s, D)
        return x.reshape(N, (side // s) ** 2, s * s * D)

    def forward(self, x: Tensor) -> Tensor:  # (N, num_tokens, in_dim) -> (N, L / s², out_dim)
        return self.proj(self.pixel_shuffle(x))

    def config_dict(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "num_tokens": self.num_tokens,
            "scale_factor": self.scale_factor,
            "depth": self.depth,
            "bias": self.bias,
        }

    @classmethod
    def conformance_example(cls) -> PixelShuffleProjector:
        """A small instance for :mod:`mmgpt.testing` (a 4×4 grid to 2×2)."""
        return cls(in_dim=8, out_dim=6, num_tokens=16)


__all__ = ["LinearProjector", "MLPProjector", "PixelShuffleProjector"]
