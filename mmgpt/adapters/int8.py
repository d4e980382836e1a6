"""Int8 weight-only Linear: one int8 weight per float weight and one float scale per output
row (symmetric, per channel); activations stay in float.

Two uses: the frozen base under LoRA (:mod:`mmgpt.adapters.quantize`, QLoRA) and quantised
inference (:mod:`mmgpt.quantization`, ``mmgpt quantize --method int8``). The forward pass
(:func:`~mmgpt.adapters.weight_only.weight_only_linear`) uses
``torch._weight_int8pack_mm`` for decoding on the CPU and dequantises otherwise.

Hand-written rather than torchao's ``Int8WeightOnlyConfig``: torchao 0.18 (which installs
beside torch 2.14) ran a one-row matmul by a 2048x1024 weight in 1633 us against 482 us in
fp32 on this CPU in eager mode (its fast path needs ``torch.compile``), stores its weights as
tensor subclasses that safetensors does not write, and peft cannot wrap its layers; this
module is under 90 lines over one PyTorch kernel, and its state dict is plain int8 and float
tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmgpt.adapters.weight_only import weight_only_linear

__all__ = ["Int8Linear"]


class Int8Linear(nn.Module):
    """A frozen Linear with int8 weights (``qweight``, out x in) and a float scale per
    output feature (``scale``, out x 1): ``W = qweight * scale``."""

    method = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Zero weights of this shape, for a state dict to fill; :meth:`from_linear` quantises."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.zeros(out_features, 1, dtype=dtype, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )
        self._kernel_scale: tuple[tuple[int, int], Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """``linear`` quantised: each row scaled so that its largest magnitude maps to 127."""
        weight = linear.weight.detach().float()
        dtype, device = linear.weight.dtype, linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, device)
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (out, 1)
        layer.qweight.copy_(torch.round(weight / scale).to(torch.int8))
        layer.scale.copy_(scale.to(dtype))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (what DoRA's norm and inspection read)."""
        return self.dequantize(self.scale.dtype)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)  # (out, in)

    def prepare_kernel(self) -> None:
        """Cast the scales for the kernel (its fast path wants bf16, module docstring), again
        only when they were replaced or changed. Eager calls do it on demand; a compiled graph
        cannot (dynamo does not trace the data-pointer check, and inductor's lowering of the
        kernel takes only stored inputs, not a cast inside the graph), so
        :func:`~mmgpt.adapters.quantized.prepare_kernels` runs this before a compiled step."""
        key = (self.scale.data_ptr(), self.scale._version)
        if self._kernel_scale is None or self._kernel_scale[0] != key:
            self._kernel_scale = (key, self.scale.reshape(-1).to(torch.bfloat16))

    def _kernel(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            self.prepare_kernel()
        elif self._kernel_scale is None:
            raise RuntimeError(
                "Int8Linear: compiled without its kernel scales; call "
                "mmgpt.adapters.quantized.prepare_kernels(model) before compiling"
            )
        out = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self._kernel_scale[1])
        return out.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return weight_only_linear(x, self.dequantize, self._kernel, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
