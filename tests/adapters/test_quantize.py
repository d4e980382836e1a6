"""An int8 base under LoRA: close to float, LoRA still learns, the adapter deploys on float."""

from __future__ import annotations

import pytest
import torch

from mmgpt.adapters import AdapterConfig, add_adapter, load_adapter, save_adapter
from mmgpt.adapters.quantize import is_quantized, quantize_base
from mmgpt.config import gpt_config
from mmgpt.model import GPT

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
TARGET = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))


def base_model() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("gpt-nano", n_layer=2, block_size=32, vocab_size=64)).eval()


def test_int8_base_is_close_and_lora_trains_through_it(tmp_path):
    model = base_model()
    add_adapter(model, AdapterConfig(r=8, alpha=16, train_extra=["transformer.ln_f"]))
    reference = model(IDS).logits
    layers = quantize_base(model)
    assert len(layers) == 8 and is_quantized(model)
    quantized = model(IDS).logits
    assert (quantized - reference).abs().max() < 0.05  # int8 rounding, not a different model
    assert all(p.dtype == torch.int8 for n, p in model.named_buffers() if n.endswith("qweight"))

    # gradients equal those of a float model holding the dequantised weights: exact backward
    # through the int8 layers (the input gradient of each frozen layer included)
    twin = base_model()
    add_adapter(twin, AdapterConfig(r=8, alpha=16, train_extra=["transformer.ln_f"]))
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
    for m in (model, twin):
        loss = torch.nn.functional.cross_entropy(m(IDS).logits.flatten(0, 1), TARGET.flatten())
        loss.backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 8 + 2
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)
    model.zero_grad()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(80):
        logits = model(IDS).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), TARGET.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]

    # the adapter names the FLOAT base, so it deploys there
    model.eval()
    save_adapter(model, tmp_path / "ad")
    deployed = base_model()
    load_adapter(deployed, tmp_path / "ad")
    assert (deployed(IDS).logits - model(IDS).logits).abs().max() < 0.05

    with pytest.raises(ValueError, match="quantised base"):
        model.save_pretrained(tmp_path / "dir")
    with pytest.raises(ValueError, match=r"method \(--method\) must be one of int8, int4, nf4"):
        quantize_base(model, "fp4")
    with pytest.raises(ValueError, match="add an adapter first"):
        quantize_base(base_model())
