"""The weight-only quantised Linears by method name: what the LoRA base
(:mod:`mmgpt.adapters.quantize`) and whole-model quantisation (:mod:`mmgpt.quantization`)
build, and how code that must not touch float weights recognises them."""

from __future__ import annotations

import torch
from torch import nn

from mmgpt.adapters.int4 import GROUP_SIZES, Int4Linear, check_group_size
from mmgpt.adapters.int8 import Int8Linear
from mmgpt.adapters.nf4 import NF4Linear  # a QLoRA base only (mmgpt.adapters.quantize)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "GROUP_SIZES",
    "METHODS",
    "QUANTIZED_LINEARS",
    "check_method",
    "empty_quantized_linear",
    "is_quantized",
    "prepare_kernels",
    "quantize_linear",
]

QUANTIZED_LINEARS: dict[str, type[nn.Module]] = {"int8": Int8Linear, "int4": Int4Linear}
METHODS = tuple(QUANTIZED_LINEARS)
DEFAULT_GROUP_SIZE = 128  # int4 only; int8 has one scale per output row


def check_method(method: str, group_size: int | None) -> int | None:
    """Validate ``method`` and ``group_size`` (errors name both arguments); return the group
    size to use (int4: ``group_size`` or the default; int8: ``None``)."""
    if method not in QUANTIZED_LINEARS:
        raise ValueError(f"method (--method) must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "int8":
        if group_size is not None:
            raise ValueError(
                "group_size (--group-size) applies to int4 only: int8 has one scale per "
                f"output row (got {group_size!r})"
            )
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(
            f"group_size (--group-size) must be one of {', '.join(map(str, GROUP_SIZES))} "
            f"for int4, got {group_size!r}"
        )
    return group_size


def quantize_linear(
    linear: nn.Linear, method: str, group_size: int | None, where: str
) -> nn.Module:
    """``linear`` as a quantised layer (``where``: its name, for errors)."""
    if method == "int4":
        check_group_size(group_size, linear.in_features, where)
        return Int4Linear.from_linear(linear, group_size)
    return Int8Linear.from_linear(linear)


def empty_quantized_linear(
    method: str,
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype,
    group_size: int | None,
) -> nn.Module:
    """A quantised layer of this shape with zero weights, for a state dict to fill."""
    if method == "int4":
        return Int4Linear(in_features, out_features, bias, dtype, group_size=group_size)
    return Int8Linear(in_features, out_features, bias, dtype)


def prepare_kernels(model: nn.Module) -> None:
    """Ready every quantised layer of ``model`` for a compiled forward: the int4 layers' CPU
    kernel tensors (int8: bf16 scales; int4: the CPU packing) are built eagerly here, since
    dynamo cannot trace their cache check."""
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.prepare_kernel()


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantised weights."""
    return any(isinstance(m, (Int8Linear, Int4Linear, NF4Linear)) for m in model.modules())
