"""The decoder against hand-written references: attention, positions, norms, init, cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmgpt.config import GPTConfig, gpt_config
from mmgpt.model import GPT, KVCache, sinusoidal_table


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50)
    return GPT(GPTConfig(**{**cfg, **overrides})).eval()


def reference_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention with a triangular mask; learned positions, LayerNorm."""
    cfg = model.config
    B, T = ids.shape
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(T))
    for block in model.transformer.h:
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).split(cfg.n_embd, dim=2)
        q, k, v = (t.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(cfg.head_dim)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + block.attn.c_proj(y)
        h = block.ln_2(x)
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(h)))
    return model.lm_head(model.transformer.ln_f(x))


def test_matches_explicit_attention_reference():
    model = tiny()
    ids = torch.randint(0, 50, (3, 12))
    torch.testing.assert_close(model(ids).logits, reference_forward(model, ids), atol=1e-5, rtol=0)


def test_causality_future_tokens_do_not_change_past_logits():
    for pe in ("learned", "sinusoidal", "rotary"):
        model = tiny(pos_encoding=pe)
        ids = torch.randint(0, 50, (1, 10))
        changed = ids.clone()
        changed[0, 6:] = (changed[0, 6:] + 1) % 50
        a, b = model(ids).logits, model(changed).logits
        torch.testing.assert_close(a[:, :6], b[:, :6])
        assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_sinusoidal_table_formula():
    table = sinusoidal_table(20, 8)
    pos, i = 7, 2
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(
        math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6
    )


def test_rotary_is_relative():
    """With RoPE, shifting every position by a constant leaves attention unchanged."""
    model = tiny(pos_encoding="rotary")
    ids = torch.randint(0, 50, (1, 8))
    base = model(ids).logits
    shifted = model(ids, position_ids=torch.arange(5, 13)[None]).logits
    torch.testing.assert_close(base, shifted, atol=1e-4, rtol=0)
    learned = tiny()
    assert not torch.allclose(
        learned(ids).logits, learned(ids, position_ids=torch.arange(5, 13)[None]).logits
    )


def test_rmsnorm_selected_and_normalises():
    model = tiny(norm="rmsnorm")
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm)
    x = torch.randn(4, 16) * 5
    y = model.transformer.ln_f(x)
    torch.testing.assert_close(y, x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())


def test_tied_and_untied_heads():
    tied = tiny()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_parameters() == tied.num_parameters() + 50 * 16


def test_gpt2_style_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(gpt_config("gpt-mini", n_layer=8))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_inputs_embeds_equals_input_ids():
    model = tiny(pos_encoding="rotary")
    ids = torch.randint(0, 50, (2, 9))
    embeds = model.transformer.wte(ids)
    torch.testing.assert_close(model(ids).logits, model(inputs_embeds=embeds).logits)


@pytest.mark.parametrize("pe", ["learned", "sinusoidal", "rotary"])
def test_kv_cache_and_left_padding_match_full_forward(pe):
    model = tiny(pos_encoding=pe)
    ids = torch.randint(0, 50, (2, 10))
    full = model(ids).logits
    cache = KVCache.for_model(model.config, capacity=4)  # grows past its capacity
    steps = [model(ids[:, :5], past_key_values=cache).logits]
    steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 10)], 1)
    out = model(padded, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], full, atol=1e-5, rtol=0)


def test_logits_to_keep_and_hidden_states():
    model = tiny()
    ids = torch.randint(0, 50, (2, 7))
    out = model(ids, logits_to_keep=1)
    assert out.logits.shape == (2, 1, 50) and out.hidden_states.shape == (2, 7, 16)
    torch.testing.assert_close(out.logits[:, 0], model(ids).logits[:, -1])


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    ids = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="pos_encoding"):
        GPTConfig(pos_encoding="alibi")
    with pytest.raises(ValueError, match="unknown GPT preset 'gpt3'.*did you mean"):
        gpt_config("gpt3")
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.from_dict({"n_layers": 2})


def test_save_and_load_round_trip(tmp_path):
    model = tiny(pos_encoding="rotary", norm="rmsnorm")
    model.save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 50, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
