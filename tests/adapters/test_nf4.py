"""NF4 (QLoRA's 4-bit NormalFloat) base: its code table, rounding, packing and gradients."""

from __future__ import annotations

import sys

import pytest
import torch

from mmgpt.adapters import AdapterConfig, add_adapter, merge_adapters
from mmgpt.adapters.nf4 import NF4Linear, nf4_code
from mmgpt.adapters.quantize import quantize_base
from mmgpt.adapters.quantized import is_quantized
from mmgpt.config import gpt_config
from mmgpt.files import load_tensors
from mmgpt.model import GPT

pytest.importorskip("bitsandbytes")

# Dettmers et al. 2023 (QLoRA), appendix E: the NF4 levels as published
PUBLISHED = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def normal_float_levels() -> torch.Tensor:
    """The paper's construction: quantiles of N(0, 1), 8 from the upper half and 7 from the
    lower (an asymmetric split that keeps an exact 0), the outermost at probability
    ``offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2``, normalised to [-1, 1]."""
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    upper = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    lower = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([upper, torch.zeros(1, dtype=torch.float64), lower]).sort().values
    return levels / levels.abs().max()


def test_the_code_table_is_the_normal_float_one():
    levels = normal_float_levels()
    published = torch.tensor(PUBLISHED, dtype=torch.float64)
    torch.testing.assert_close(levels, published, atol=1e-4, rtol=0)
    ours = nf4_code().double()
    torch.testing.assert_close(ours, levels, atol=1e-4, rtol=0)
    assert ours[7] == 0 and ours[0] == -1 and ours[-1] == 1 and bool((ours.diff() > 0).all())


def unpack_high_first(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) bytes → (out, in) indices; column 2j in the high nibble."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(-2).long()


def linear_with(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_rounding_is_to_the_nearest_level_of_each_block_and_bounded(block_size):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 256, generator=g) * 0.05
    weight[3, 17] = 0.9  # an outlier: only its own block gets the coarse scale
    layer = NF4Linear.from_linear(linear_with(weight), block_size)
    code = nf4_code()
    blocks = weight.reshape(48, -1, block_size)  # (out, blocks, block)
    absmax = blocks.abs().amax(-1)
    torch.testing.assert_close(layer.absmax, absmax, atol=0, rtol=0)
    # reference: each weight to the nearest level of its block's scaled table
    nearest = ((blocks / absmax[..., None])[..., None] - code).abs().argmin(-1)
    reference = (code[nearest] * absmax[..., None]).reshape(48, 256)
    dequantized = layer.dequantize(torch.float32)
    assert torch.equal(dequantized, reference)
    # the error bound: half the widest gap between neighbouring levels, times the absmax
    half_gap = code.diff().max() / 2
    error = (dequantized - weight).reshape(48, -1, block_size).abs().amax(-1)
    assert bool((error <= absmax * half_gap * (1 + 1e-6)).all())
    # the outlier coarsens its own block only: the row's other blocks keep their fine scale
    assert layer.absmax[3, 17 // block_size] == 0.9
    others = torch.cat(
        [layer.absmax[3, : 17 // block_size], layer.absmax[3, 17 // block_size + 1 :]]
    )
    assert bool((others < 0.3).all())


def test_packing_round_trips_exactly():
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 16, (16, 128), generator=g)
    index[:, ::64] = 15  # every block of 64 holds the level 1.0, so its absmax is its scale
    scale = torch.rand(16, 2, generator=g) + 0.5
    weight = (nf4_code()[index].reshape(16, 2, 64) * scale[..., None]).reshape(16, 128)
    layer = NF4Linear.from_linear(linear_with(weight), 64)
    assert torch.equal(unpack_high_first(layer.qweight), index)  # packed as written
    assert torch.equal(layer.absmax, scale)
    assert torch.equal(layer.dequantize(torch.float32), weight)  # exactly representable
    assert torch.equal(layer.weight, weight)
    # the packed bytes decode by hand to what the layer dequantises
    by_hand = nf4_code()[unpack_high_first(layer.qweight)].reshape(16, 2, 64) * scale[..., None]
    assert torch.equal(by_hand.reshape(16, 128), weight)
    # a state dict fills an empty layer of the same shape
    empty = NF4Linear(128, 16, block_size=64)
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty.dequantize(torch.float32), weight)
    x = torch.randn(3, 128, generator=g)
    torch.testing.assert_close(empty(x), x @ weight.t() + layer.bias)


def base_model() -> GPT:
    torch.manual_seed(0)
    config = gpt_config("gpt-nano", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=64)
    return GPT(config).eval()


def test_nf4_base_gives_the_gradients_of_its_dequantised_weights(tmp_path):
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))
    model = base_model()
    add_adapter(model, AdapterConfig(r=4, alpha=8))
    float_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    layers = quantize_base(model, "nf4", float_base=tmp_path / "float_base.safetensors")
    assert len(layers) == 8 and is_quantized(model)
    bases = [model.get_submodule(name).base_layer for name in layers]
    assert all(isinstance(b, NF4Linear) and b.block_size == 64 for b in bases)  # the default
    # the frozen base is held in 4 bits: no float weight of an adapted layer is left
    assert not any(
        t.is_floating_point() and t.numel() >= 64 * 64 for b in bases for t in (b.qweight, b.absmax)
    )
    twin = base_model()
    add_adapter(twin, AdapterConfig(r=4, alpha=8))
    with torch.no_grad():
        for name in layers:
            twin.get_submodule(name).base_layer.weight.copy_(
                model.get_submodule(name).base_layer.weight
            )
        g = torch.Generator().manual_seed(2)
        twin_params = dict(twin.named_parameters())
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                twin_params[n].copy_(p)
    losses = []
    for m in (model, twin):
        loss = torch.nn.functional.cross_entropy(m(ids).logits.flatten(0, 1), target.flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 8
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)
    # the base cannot be merged into, and the model directory holds the float base
    with pytest.raises(ValueError, match="cannot merge adapters into a quantised base"):
        merge_adapters(model)
    model.save_pretrained(tmp_path / "dir")
    saved = load_tensors(tmp_path / "dir" / "model.safetensors")
    expected = {k.replace(".base_layer.", "."): v for k, v in float_state.items()}
    expected.pop("lm_head.weight")  # tied to the embeddings: stored once
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


def test_nf4_errors(monkeypatch):
    model = base_model()
    add_adapter(model, AdapterConfig(r=4))
    with pytest.raises(ValueError, match=r"--group-size\) must be one of 32, 64, 128, 256 for nf4"):
        quantize_base(model, "nf4", 48)
    with pytest.raises(ValueError, match=r"--group-size\) 128 does not divide the 64 input"):
        quantize_base(model, "nf4", 128)
    assert not is_quantized(model)  # checked before any layer is replaced
    with pytest.raises(ValueError, match=r"method \(--method\) must be one of int8, int4, nf4"):
        quantize_base(model, "fp4")
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match=r'pip install "mmgpt\[qlora\]"'):
        quantize_base(model, "nf4")
