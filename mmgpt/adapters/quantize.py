"""An int8 frozen base under LoRA (QLoRA-style): the one extension point.

:func:`quantize_base` swaps the frozen ``base_layer`` of every adapted ``nn.Linear`` for an
:class:`Int8Linear`: int8 weights with one float scale per output row (symmetric, weight-only;
activations stay in float). The LoRA branch stays in float and trains. The int8 matrix is
dequantised on the fly in forward and again in backward (a custom autograd function), so no
float copy of a frozen weight outlives its use: the adapted layers' weights take 4x less
memory, in training too.

Why not PyTorch's own ``torch.ao.quantization.quantize_dynamic``: its quantised Linear is
not an ``nn.Linear`` (peft cannot wrap it), its ops have no autograd kernel (PyTorch warns
that gradients through it may be silently wrong: the input gradient of the frozen layer is
lost, so LoRA layers below it train on a wrong signal), and the API is deprecated in favour
of ``torchao``, which is not a dependency here. With torchao installed, its int8 weight-only
``quantize_`` could replace the body of :func:`quantize_base`; nothing else would change.

Limits: a quantised base cannot be merged or saved as base weights (the float weights are
gone). Save the adapter alone (:func:`mmgpt.adapters.save_adapter`): it records the
fingerprint of the FLOAT base taken before quantising and loads onto that base to deploy.
Recipes do not offer it yet: their final model directory holds the float base, which a
quantised run no longer has in memory.
"""

from __future__ import annotations

from torch import nn

from mmgpt.adapters.int8 import Int8Linear, is_quantized
from mmgpt.adapters.lora import base_fingerprint, tuner_layers

__all__ = ["QUANTIZATION_METHODS", "Int8Linear", "is_quantized", "quantize_base"]

QUANTIZATION_METHODS = ("int8",)


def quantize_base(model: nn.Module, method: str = "int8") -> list[str]:
    """Quantise the frozen base of every adapted Linear of ``model`` in place (after
    :func:`~mmgpt.adapters.add_adapter`); returns the names of the quantised layers."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantize_base: method must be one of {', '.join(QUANTIZATION_METHODS)}, "
            f"got {method!r}"
        )
    tuners = set(tuner_layers(model))
    layers = [(n, m) for n, m in model.named_modules() if m in tuners]
    if not layers:
        raise ValueError("quantize_base: add an adapter first (it quantises the adapted layers)")
    if any(getattr(m, "merged", False) for _, m in layers):
        raise ValueError("quantize_base: unmerge adapters first")
    if not is_quantized(model):
        # adapters saved from now on must still name the float base they belong to
        configs = model._mmgpt_adapter_configs.values()
        extras = [(), *(tuple(sorted(c.train_extra)) for c in configs)]
        model._mmgpt_base_fingerprints = {e: base_fingerprint(model, e) for e in extras}
    done = []
    for name, layer in layers:
        base = layer.base_layer
        if isinstance(base, Int8Linear):
            continue
        if not isinstance(base, nn.Linear) or base.weight.requires_grad:
            raise ValueError(f"quantize_base: {name} has no frozen nn.Linear base")
        layer.base_layer = Int8Linear(base)
        done.append(name)
    return done
