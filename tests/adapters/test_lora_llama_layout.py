"""LoRA on a Llama-layout decoder (grouped-query attention, fused SwiGLU): the component
targets still find every projection, and merging stays exact."""

from __future__ import annotations

import torch

from mmgpt.adapters import AdapterConfig, add_adapter, merge_adapters
from mmgpt.config import GPTConfig
from mmgpt.model import GPT

CONFIG = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=64, block_size=32, bias=False)
CONFIG.update(pos_encoding="rotary", norm="rmsnorm", activation="silu", gated_mlp=True)
CONFIG.update(intermediate_size=40, qkv_bias=True, tie_embeddings=False)
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def test_decoder_targets_cover_fused_qkv_and_gate_up():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG)).eval()
    modules = add_adapter(model, AdapterConfig(r=4, targets=["decoder"]))
    assert sorted(modules) == sorted(
        f"transformer.h.{i}.{name}"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    c_attn, c_fc = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_fc
    assert c_attn.lora_B["default"].weight.shape == ((4 + 2 * 2) * 8, 4)  # q, k and v
    assert c_fc.lora_B["default"].weight.shape == (2 * 40, 4)  # gate and up
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    adapted = model(IDS).logits
    merge_adapters(model)
    torch.testing.assert_close(model(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
