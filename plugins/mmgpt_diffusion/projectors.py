"""Output projectors: GPT signal-token hidden states → image-decoder conditioning.

Both map ``(B, num_signal_tokens, in_dim)`` (the hidden states at ``[IMG0]..[IMGk-1]``) to
``(B, num_condition_tokens, out_dim)`` (the decoder's ``condition``):

* ``signal_mlp``: a per-token MLP, then — only when the token counts differ — a learned
  linear map over the token axis (k → N), initialised as linear interpolation so that each
  output token starts as a blend of neighbouring signal tokens. Cheap; right when k == N.
* ``signal_resampler``: N learned queries that self-attend and cross-attend to the projected
  signal states through a few pre-norm transformer decoder layers. Better when N ≫ k, e.g.
  77 text-embedding tokens of a pretrained Stable Diffusion UNet from 8 signal tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmgpt.registry import register


def _check_signal(x: torch.Tensor, num_signal_tokens: int, in_dim: int) -> None:
    if x.dim() != 3 or x.shape[1:] != (num_signal_tokens, in_dim):
        raise ValueError(
            f"signal states must have shape (batch, num_signal_tokens={num_signal_tokens}, "
            f"in_dim={in_dim}), got {tuple(x.shape)}"
        )


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@register("projector", "signal_mlp")
class SignalMLP(nn.Module):
    """Per-token MLP (in_dim → hidden_dim → out_dim) plus a token-axis linear when k != N."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_signal_tokens: int = 8,
        num_condition_tokens: int | None = None,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        num_condition_tokens = num_condition_tokens or num_signal_tokens
        hidden_dim = hidden_dim or max(in_dim, out_dim)
        _positive(
            in_dim=in_dim,
            out_dim=out_dim,
            num_signal_tokens=num_signal_tokens,
            num_condition_tokens=num_condition_tokens,
            hidden_dim=hidden_dim,
        )
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.num_signal_tokens = num_signal_tokens
        self.num_condition_tokens = num_condition_tokens
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )
        self.token_map: nn.Linear | None = None
        if num_condition_tokens != num_signal_tokens:
            self.token_map = nn.Linear(num_signal_tokens, num_condition_tokens)
            with torch.no_grad():
                # (1, k, k) identity resampled to (1, k, N): column j blends the signal tokens
                # nearest to position j; the Linear stores it as (N, k).
                eye = torch.eye(num_signal_tokens)[None]
                interp = F.interpolate(
                    eye, size=num_condition_tokens, mode="linear", align_corners=True
                )
                self.token_map.weight.copy_(interp[0].T)
                self.token_map.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_signal(x, self.num_signal_tokens, self.in_dim)
        y = self.mlp(x)  # (B, k, out_dim)
        if self.token_map is not None:
            y = self.token_map(y.transpose(1, 2)).transpose(1, 2)  # (B, N, out_dim)
        return y

    def config_dict(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "num_signal_tokens": self.num_signal_tokens,
            "num_condition_tokens": self.num_condition_tokens,
            "hidden_dim": self.hidden_dim,
        }

    @classmethod
    def conformance_example(cls) -> SignalMLP:
        """A small instance for :mod:`mmgpt.testing` (k != N, so the token map is built)."""
        return cls(in_dim=8, out_dim=6, num_signal_tokens=3, num_condition_tokens=5)


@register("projector", "signal_resampler")
class SignalResampler(nn.Module):
    """Learned queries cross-attending to the signal states (a small transformer decoder)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_signal_tokens: int = 8,
        num_condition_tokens: int | None = None,
        width: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        num_condition_tokens = num_condition_tokens or num_signal_tokens
        _positive(
            in_dim=in_dim,
            out_dim=out_dim,
            num_signal_tokens=num_signal_tokens,
            num_condition_tokens=num_condition_tokens,
            width=width,
            num_layers=num_layers,
            num_heads=num_heads,
        )
        if width % num_heads:
            raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads})")
        self.in_dim, self.out_dim, self.width = in_dim, out_dim, width
        self.num_signal_tokens = num_signal_tokens
        self.num_condition_tokens = num_condition_tokens
        self.num_layers, self.num_heads = num_layers, num_heads
        self.mlp_ratio, self.dropout = float(mlp_ratio), float(dropout)

        self.input_proj = nn.Linear(in_dim, width)
        # cross-attention is order-blind: the position embedding tells [IMG0] from [IMG1]
        self.signal_pos = nn.Parameter(torch.randn(1, num_signal_tokens, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, num_condition_tokens, width) * 0.02)
        layer = nn.TransformerDecoderLayer(
            d_model=width,
            nhead=num_heads,
            dim_feedforward=int(mlp_ratio * width),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(width))
        self.output_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_signal(x, self.num_signal_tokens, self.in_dim)
        memory = self.input_proj(x) + self.signal_pos  # (B, k, width)
        queries = self.queries.expand(x.shape[0], -1, -1)  # (B, N, width)
        return self.output_proj(self.layers(queries, memory))  # (B, N, out_dim)

    def config_dict(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "num_signal_tokens": self.num_signal_tokens,
            "num_condition_tokens": self.num_condition_tokens,
            "width": self.width,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout,
        }

    @classmethod
    def conformance_example(cls) -> SignalResampler:
        """A small instance for :mod:`mmgpt.testing`."""
        return cls(
            in_dim=8, out_dim=6, num_signal_tokens=3, num_condition_tokens=5, width=16, num_heads=2
        )
