"""Int4 weight-only Linear, group-wise: each row is cut into groups of ``group_size`` input
features, and each group has its own float ``scale`` and ``minimum`` (asymmetric, min-max):
``W[n, k] = q[n, k] * scale[n, k // g] + minimum[n, k // g]``, ``q`` in 0..15.

The state dict holds ``q`` packed two per byte (:func:`pack_int4`: ``qweight``, out x in/2,
uint8; column ``2j`` in the low nibble, ``2j + 1`` in the high one), a layout any device and
any reader can unpack. Decoding on the CPU runs ``torch._weight_int4pack_mm_for_cpu``
(bf16 activations, see :mod:`mmgpt.adapters.weight_only`), whose own packing is made from
it on first use and cached (it is CPU-specific, so it is never saved); that kernel takes
group sizes 32, 64, 128 and 256, hence :data:`GROUP_SIZES`.

Hand-written rather than torchao's ``Int4WeightOnlyConfig`` for the reasons
:mod:`mmgpt.adapters.int8` gives (eager speed, safetensors, peft); the kernel is PyTorch's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmgpt.adapters.weight_only import weight_only_linear

__all__ = ["GROUP_SIZES", "Int4Linear", "check_group_size", "pack_int4", "unpack_int4"]

GROUP_SIZES = (32, 64, 128, 256)  # what torch._weight_int4pack_mm_for_cpu accepts
_KERNEL_ROWS = 16  # the CPU kernel's packing wants out_features % 16 == 0: pad to it


def pack_int4(q: Tensor) -> Tensor:
    """(out, in) integers in 0..15 → (out, in/2) uint8, two per byte (low nibble first)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: (out, in/2) uint8 → (out, in) uint8 in 0..15."""
    low, high = packed & 15, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def check_group_size(group_size: int, in_features: int, where: str) -> None:
    """Raise, naming ``where`` (a layer) and the argument, unless ``group_size`` is one the
    kernel takes and divides ``in_features``."""
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(
            f"group_size (--group-size) must be one of {', '.join(map(str, GROUP_SIZES))} "
            f"for int4, got {group_size!r}"
        )
    if in_features % group_size:
        raise ValueError(
            f"group_size (--group-size) {group_size} does not divide the {in_features} input "
            f"features of {where}; pick one that divides every quantised layer's width"
        )


class Int4Linear(nn.Module):
    """A frozen Linear with group-wise int4 weights (module docstring)."""

    method = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        group_size: int = 128,
    ) -> None:
        """Zero weights of this shape, for a state dict to fill; :meth:`from_linear` quantises."""
        super().__init__()
        check_group_size(group_size, in_features, f"a {in_features}x{out_features} Linear")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.register_buffer(
            "minimum", torch.zeros(out_features, groups, dtype=dtype, device=device)
        )
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )
        self._kernel_weights: tuple[tuple[int, ...], Tensor, Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        """``linear`` quantised: each group's range [min, max] mapped onto 0..15."""
        out_f, in_f = linear.out_features, linear.in_features
        dtype, device = linear.weight.dtype, linear.weight.device
        layer = cls(in_f, out_f, linear.bias is not None, dtype, device, group_size=group_size)
        w = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15.0).clamp(min=1e-12)  # (out, groups, 1)
        q = torch.round((w - low) / scale).clamp(0, 15).reshape(out_f, in_f)
        layer.qweight.copy_(pack_int4(q))
        layer.scale.copy_(scale.squeeze(-1).to(dtype))
        layer.minimum.copy_(low.squeeze(-1).to(dtype))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (what DoRA's norm and inspection read)."""
        return self.dequantize(self.scale.dtype)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        q = unpack_int4(self.qweight).to(dtype)  # (out, in)
        q = q.reshape(self.out_features, -1, self.group_size)  # (out, groups, g)
        w = q * self.scale.to(dtype)[..., None] + self.minimum.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)

    def prepare_kernel(self) -> None:
        """Build (or rebuild, when the weights were replaced or changed) the CPU kernel's
        packing. Eager calls do it on demand; a compiled graph cannot (dynamo does not trace
        the data-pointer check), so :func:`~mmgpt.adapters.quantized.prepare_kernels` runs
        this before a compiled step."""
        key = tuple(
            v for t in (self.qweight, self.scale, self.minimum) for v in (t.data_ptr(), t._version)
        )
        if self._kernel_weights is None or self._kernel_weights[0] != key:
            self._kernel_weights = (key, *self._kernel_layout())

    def _kernel(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            self.prepare_kernel()
        elif self._kernel_weights is None:
            raise RuntimeError(
                "Int4Linear: compiled without its kernel packing; call "
                "mmgpt.adapters.quantized.prepare_kernels(model) before compiling"
            )
        _, packed, scales_and_zeros = self._kernel_weights
        out = torch._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed, self.group_size, scales_and_zeros
        )
        return out[:, : self.out_features].to(x.dtype)

    def _kernel_layout(self) -> tuple[Tensor, Tensor]:
        """The CPU kernel's packing of these weights. It computes ``(q - 8) * scale + zero``,
        so ``zero = minimum + 8 * scale``; rows are padded with zeros to a multiple of 16."""
        pad = -self.out_features % _KERNEL_ROWS
        q = unpack_int4(self.qweight).to(torch.int32)
        scale, zero = self.scale.float(), self.minimum.float() + 8 * self.scale.float()
        if pad:
            q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
            scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
            zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1)  # (groups, out, 2)
        return packed, scales_and_zeros.to(torch.bfloat16).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return weight_only_linear(x, self.dequantize, self._kernel, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4, "
            f"group_size={self.group_size}"
        )
