"""Projectors: encoder features ``(…, in_dim)`` to the decoder's width ``(…, out_dim)``.

Registered as kind ``"projector"``. Parameter names match LLaVA's ``mm_projector`` for the same
type (``weight``/``bias`` for ``"linear"``; ``0.*`` and ``2.*`` for ``"mlp2x_gelu"``), so its
projector weights load with a key prefix strip.
"""

from __future__ import annotations

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
    """Linear → GELU → Linear (LLaVA-1.5's ``mlp2x_gelu``); ``depth`` linear layers in all."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        _check_dims("mlp2x_gelu", in_dim=in_dim, out_dim=out_dim, depth=depth)
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:  # (…, in_dim) -> (…, out_dim)
        return super().forward(x)

    def config_dict(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "depth": self.depth}

    @classmethod
    def conformance_example(cls) -> MLPProjector:
        """A small instance for :mod:`mmgpt.testing`."""
        return cls(in_dim=8, out_dim=6)


__all__ = ["LinearProjector", "MLPProjector"]
