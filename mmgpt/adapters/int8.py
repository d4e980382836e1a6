"""Int8 weight-only linear layers: the frozen base that :mod:`mmgpt.adapters.quantize` puts
under LoRA. Imports nothing from mmgpt, so the adapter code can recognise a quantised base
without importing the quantiser."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Int8Linear", "is_quantized"]


class _Int8Matmul(torch.autograd.Function):
    """``x @ (q * scale).T``; backward re-dequantises instead of keeping a float weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(q, scale)
        return x @ (q.to(x.dtype) * scale.to(x.dtype)).t()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        q, scale = ctx.saved_tensors
        return grad @ (q.to(grad.dtype) * scale.to(grad.dtype)), None, None


class Int8Linear(nn.Module):
    """A frozen Linear with int8 weights and a float scale per output feature."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (out, 1)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (what DoRA's norm and inspection read)."""
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        out = _Int8Matmul.apply(x, self.qweight, self.scale)  # (..., out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def is_quantized(model: nn.Module) -> bool:
    """Whether any adapted layer of ``model`` runs on a quantised base."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
