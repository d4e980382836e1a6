"""NF4 (4-bit NormalFloat, the QLoRA paper's data type) weight-only Linear: the frozen base
under LoRA with ``adapter.quantize=nf4``.

Each row is cut into blocks of ``block_size`` input features (64 in the paper); a block keeps
its absolute maximum (``absmax``, float32) and, per weight, the index of the nearest of 16
levels (:func:`nf4_code`: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0), so
``W[n, k] = code[q[n, k]] * absmax[n, k // block_size]``. ``qweight`` holds ``q`` two per
byte (out x in/2, uint8; column ``2j`` in the HIGH nibble, ``2j + 1`` in the low one:
bitsandbytes' layout), about 0.56 bytes per weight with block 64, as int4 with group 128.

The quantising and dequantising are bitsandbytes' (``quantize_4bit`` / ``dequantize_4bit``,
its C kernels on the CPU, CUDA kernels on a GPU) rather than our own: dequantising a
2048x512 weight on one thread of this project's 2-core x86 CPU took 0.82 ms with
bitsandbytes 0.50.2 against 2.9 ms for the fastest pure-PyTorch table lookup we wrote (a
256-entry byte-to-pair table with ``index_select``), and QLoRA dequantises every adapted
layer twice per training step. Its ``Linear4bit`` is not used: its CPU forward (one row,
same weight: 2.2 ms) is slower than dequantise-then-matmul (about 1.3 ms), and this layer
keeps the training path (:class:`~mmgpt.adapters.weight_only.DequantizedMatmul`) and the
plain uint8 and float buffers of the int8 and int4 ones. Double quantisation of ``absmax``
(QLoRA's further 0.37 bits per weight) is not offered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mmgpt.adapters.weight_only import weight_only_linear

__all__ = ["BLOCK_SIZES", "DEFAULT_BLOCK_SIZE", "NF4Linear", "check_block_size", "nf4_code"]

BLOCK_SIZES = (32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 64  # the QLoRA paper's
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes writes


@contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """Hold back one warning while bitsandbytes may be imported (directly, or by peft, which
    imports it whenever it is installed). On a CPU with AVX512-BF16, importing bitsandbytes
    0.50 tries to fetch a fused 4-bit matmul from the Hugging Face Hub and logs a warning
    when it cannot; that kernel serves its Linear4bit, which mmgpt does not use."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpu_ops.setLevel(level)


def _bnb() -> Any:
    try:
        with quiet_bitsandbytes_import():
            import bitsandbytes.functional as functional
    except ImportError as exc:
        raise ImportError(
            'adapter.quantize=nf4 needs bitsandbytes: pip install "mmgpt[qlora]"'
        ) from exc
    return functional


def nf4_code() -> Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] (float32, on the CPU)."""
    return _bnb().get_4bit_type("nf4", device="cpu").float().clone()


def check_block_size(block_size: Any, in_features: int, where: str) -> None:
    """Raise, naming ``where`` (a layer) and the argument, unless ``block_size`` is one of
    :data:`BLOCK_SIZES` and divides ``in_features`` (so that no block spans two rows)."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(
            f"group_size (--group-size) must be one of {', '.join(map(str, BLOCK_SIZES))} "
            f"for nf4 (its block size), got {block_size!r}"
        )
    if in_features % block_size:
        raise ValueError(
            f"group_size (--group-size) {block_size} does not divide the {in_features} input "
            f"features of {where}; pick one that divides every quantised layer's width"
        )


class NF4Linear(nn.Module):
    """A frozen Linear with NF4 weights and one float32 absmax per block (module docstring)."""

    method = "nf4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        """Zero weights of this shape, for a state dict to fill; :meth:`from_linear` quantises."""
        super().__init__()
        check_block_size(block_size, in_features, f"a {in_features}x{out_features} Linear")
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.weight_dtype = dtype  # the float weight's dtype: what `weight` returns
        blocks = in_features // block_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "absmax", torch.zeros(out_features, blocks, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = DEFAULT_BLOCK_SIZE) -> NF4Linear:
        """``linear`` quantised: each block scaled by its absmax, each weight rounded to the
        nearest NF4 level."""
        out_f, in_f = linear.out_features, linear.in_features
        dtype, device = linear.weight.dtype, linear.weight.device
        layer = cls(in_f, out_f, linear.bias is not None, dtype, device, block_size=block_size)
        weight = linear.weight.detach()
        if weight.dtype not in _KERNEL_DTYPES:
            weight = weight.float()
        packed, state = _bnb().quantize_4bit(
            weight.contiguous(), blocksize=block_size, quant_type="nf4"
        )
        layer.qweight.copy_(packed.reshape(out_f, in_f // 2))
        layer.absmax.copy_(state.absmax.reshape(out_f, in_f // block_size))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (what DoRA's norm and inspection read)."""
        return self.dequantize(self.weight_dtype)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        functional = _bnb()
        kernel_dtype = dtype if dtype in _KERNEL_DTYPES else torch.float32
        state = functional.QuantState(
            absmax=self.absmax.reshape(-1),
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=kernel_dtype,
            blocksize=self.block_size,
            quant_type="nf4",
        )
        weight = functional.dequantize_4bit(self.qweight.reshape(-1, 1), state)  # (out, in)
        return weight.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        # no fused kernel: bitsandbytes' CPU one is slower than this (module docstring)
        return weight_only_linear(x, self.dequantize, None, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
            f"block_size={self.block_size}"
        )
