"""A quantised frozen base under LoRA (QLoRA): int8 per channel, int4 per group or NF4 per
block.

:func:`quantize_base` swaps the frozen ``base_layer`` of every adapted ``nn.Linear`` for an
:class:`~mmgpt.adapters.int8.Int8Linear`, :class:`~mmgpt.adapters.int4.Int4Linear` or
:class:`~mmgpt.adapters.nf4.NF4Linear` (QLoRA's 4-bit NormalFloat; weight-only: activations
stay in float). The LoRA branch stays in float and trains. The quantised matrix is
dequantised on the fly in forward and again in backward (a custom autograd function), so no
float copy of a frozen weight outlives its use: the adapted layers' weights take 4x (int8)
or about 7x (int4 with its group scales, nf4 with its block absmax) less memory, in training
too. NF4 spends its 16 levels where normally distributed weights are dense (QLoRA's
argument); int4 spaces them evenly between each group's minimum and maximum and has
PyTorch's own CPU kernel for quantised inference (``mmgpt quantize``), which NF4 lacks.

Why not PyTorch's own ``torch.ao.quantization.quantize_dynamic``: its quantised Linear is
not an ``nn.Linear`` (peft cannot wrap it), its ops have no autograd kernel (PyTorch warns
that gradients through it may be silently wrong: the input gradient of the frozen layer is
lost, so LoRA layers below it train on a wrong signal), and the API is deprecated in favour
of ``torchao`` (see :mod:`mmgpt.adapters.int8` for why torchao's layers are not used).

The float weights are gone from memory afterwards, so the base cannot be merged or saved
from the model. Two ways to deploy what was trained:

- ``float_base=PATH``: before quantising, the float base weights are written to ``PATH``
  (safetensors; the ``model.safetensors`` a float LoRA run would save). The model then saves
  as a normal model directory (``save_pretrained``, ``mmgpt.pretrained.save_model``): that
  file as its base weights, plus ``adapters/<name>/``. Recipes do this
  (``adapter.quantize``), keeping the file in the run's folder.
- otherwise save the adapter alone (:func:`mmgpt.adapters.save_adapter`): it records the
  fingerprint of the FLOAT base taken before quantising and loads onto that base.

An adapter trained on a quantised base and deployed on the float one runs on weights that
differ by the quantisation error, as in QLoRA; ``mmgpt quantize`` of the saved directory
quantises base and adapter merged, which is close to, not equal to, the model that trained.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from mmgpt.adapters.int4 import Int4Linear, check_group_size
from mmgpt.adapters.int8 import Int8Linear
from mmgpt.adapters.lora import base_fingerprint, base_state_dict, tuner_layers
from mmgpt.adapters.nf4 import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, NF4Linear, check_block_size
from mmgpt.adapters.quantized import METHODS, check_method, is_quantized, quantize_linear
from mmgpt.files import save_tensors

__all__ = [
    "FLOAT_BASE_ATTR",
    "QUANTIZATION_METHODS",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "check_quantization",
    "copy_float_base",
    "is_quantized",
    "quantize_base",
]

# nf4 is for a base under LoRA only: whole-model quantisation (mmgpt.quantization) has int8/int4
QUANTIZATION_METHODS = (*METHODS, "nf4")
# The model attribute naming the file that holds the float base (mmgpt.weights reads it).
FLOAT_BASE_ATTR = "_mmgpt_float_base"
_QUANTIZED_BASES = (Int8Linear, Int4Linear, NF4Linear)


def check_quantization(method: str, group_size: int | None) -> int | None:
    """Validate a base quantisation ``method`` and its ``group_size`` (errors name both);
    return the group size to use (int4: default 128; nf4: its block size, default 64;
    int8: ``None``)."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(
            f"method (--method) must be one of {', '.join(QUANTIZATION_METHODS)}, got {method!r}"
        )
    if method != "nf4":
        return check_method(method, group_size)
    group_size = DEFAULT_BLOCK_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or group_size not in BLOCK_SIZES:
        raise ValueError(
            f"group_size (--group-size) must be one of {', '.join(map(str, BLOCK_SIZES))} "
            f"for nf4 (its block size), got {group_size!r}"
        )
    return group_size


def quantize_base(
    model: nn.Module,
    method: str = "int8",
    group_size: int | None = None,
    *,
    float_base: str | os.PathLike | None = None,
) -> list[str]:
    """Quantise the frozen base of every adapted Linear of ``model`` in place (after
    :func:`~mmgpt.adapters.add_adapter`); returns the names of the quantised layers.

    ``method``: int8, int4 or nf4. ``group_size``: int4 (32, 64, 128 or 256; default 128)
    and nf4 (its block size: the same values; default 64). ``float_base``: a file to write
    the float base weights to first, so the model still saves as a model directory.
    """
    try:
        group_size = check_quantization(method, group_size)
    except ValueError as exc:
        raise ValueError(f"quantize_base: {exc}") from None
    tuners = set(tuner_layers(model))
    layers = [(n, m) for n, m in model.named_modules() if m in tuners]
    if not layers:
        raise ValueError("quantize_base: add an adapter first (it quantises the adapted layers)")
    if any(getattr(m, "merged", False) for _, m in layers):
        raise ValueError("quantize_base: unmerge adapters first")
    for name, layer in layers:
        base = layer.base_layer
        if isinstance(base, _QUANTIZED_BASES):
            continue
        if not isinstance(base, nn.Linear) or base.weight.requires_grad:
            raise ValueError(f"quantize_base: {name} has no frozen nn.Linear base")
        if method == "int4":  # every layer is checked before any is replaced
            check_group_size(group_size, base.in_features, name)
        elif method == "nf4":
            check_block_size(group_size, base.in_features, name)
    if not any(isinstance(m, _QUANTIZED_BASES) for m in model.modules()):
        # adapters saved from now on must still name the float base they belong to
        configs = model._mmgpt_adapter_configs.values()
        extras = [(), *(tuple(sorted(c.train_extra)) for c in configs)]
        model._mmgpt_base_fingerprints = {e: base_fingerprint(model, e) for e in extras}
        if float_base is not None:
            save_tensors(base_state_dict(model), Path(float_base), metadata={"format": "pt"})
            setattr(model, FLOAT_BASE_ATTR, str(Path(float_base).resolve()))
    done = []
    for name, layer in layers:
        if isinstance(layer.base_layer, _QUANTIZED_BASES):
            continue
        if method == "nf4":
            layer.base_layer = NF4Linear.from_linear(layer.base_layer, group_size)
        else:
            layer.base_layer = quantize_linear(layer.base_layer, method, group_size, name)
        done.append(name)
    return done


def copy_float_base(model: nn.Module, target: str | os.PathLike) -> None:
    """Write the float base weights of a model quantised by :func:`quantize_base` to
    ``target`` (a model directory's weights file), from the file ``float_base`` named."""
    source = getattr(model, FLOAT_BASE_ATTR, None)
    if source is None or not Path(source).is_file():
        raise ValueError(
            "cannot save the weights of a quantised base: its float weights are not on disk "
            f"({source or 'quantize_base was not given float_base'}); pass float_base=PATH to "
            "quantize_base, or save the adapter alone (save_adapter) and load it onto the float "
            "base model"
        )
    # streamed to a temporary name, then renamed (atomic_write_bytes would hold the whole
    # file in memory, the very thing a quantised base avoids)
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
