"""The forward pass shared by the weight-only quantised Linears (:mod:`~mmgpt.adapters.int8`,
:mod:`~mmgpt.adapters.int4`): a fused CPU kernel where it is faster, dequantise-and-matmul
everywhere else (training, long prompts, other devices).

Why two paths (measured on this project's 2-core x86 CPU, one thread, 2048x512 weight):

============  =====  =====  ======  ======
rows (B*T)      1      8      64     256
============  =====  =====  ======  ======
fp32 matmul    202    514   1038    3294   us
int8 kernel     67    231   1769    6977   (``torch._weight_int8pack_mm``, bf16 activations)
int4 kernel     54    236   1618    6418   (``torch._weight_int4pack_mm_for_cpu``, bf16)
dequantise     824   1102   1705    3897   (to fp32, then the fp32 matmul)
============  =====  =====  ======  ======

The kernels read 4x (int8) or 8x (int4) fewer weight bytes, which is what decoding one token
at a time is bound by; from a few dozen rows on, the matmul is bound by arithmetic and the
kernels (bf16 in, bf16 out) lose to fp32. ``torch._weight_int8pack_mm`` with fp32 activations
is 4x slower than the fp32 matmul (no vectorised fp32 path), hence bf16 activations there.

The kernels have no autograd formula, so they run only when no gradient is wanted; a
quantised base under LoRA trains through :class:`DequantizedMatmul`, which dequantises again
in backward instead of keeping a float weight alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["KERNEL_MAX_ROWS", "DequantizedMatmul", "weight_only_linear"]

# Up to this many rows (batch x new tokens) the fused kernels beat fp32 (table above).
KERNEL_MAX_ROWS = 16


class DequantizedMatmul(torch.autograd.Function):
    """``x @ dequantize().T``; backward dequantises again rather than keeping the weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dequantize: Callable[[torch.dtype], Tensor]) -> Tensor:
        ctx.dequantize = dequantize
        return x @ dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.dequantize(grad.dtype), None


def weight_only_linear(
    x: Tensor,
    dequantize: Callable[[torch.dtype], Tensor],
    kernel: Callable[[Tensor], Tensor] | None,
    bias: Tensor | None,
) -> Tensor:
    """``x @ W.T + bias`` for a quantised ``W``: ``kernel(x2d)`` (rows x in → rows x out, in
    x's dtype) for a few rows on the CPU without gradients, else :class:`DequantizedMatmul`."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    use_kernel = (
        kernel is not None
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and 0 < rows <= KERNEL_MAX_ROWS
    )
    if use_kernel:
        out = kernel(x.reshape(rows, x.shape[-1])).reshape(*x.shape[:-1], -1)
    else:
        out = DequantizedMatmul.apply(x, dequantize)
    return out if bias is None else out + bias.to(out.dtype)
