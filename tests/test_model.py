"""The decoder against hand-written references: attention, positions, norms, init, cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmgpt.config import GPTConfig, gpt_config
from mmgpt.model import GPT, KVCache, Rotary, rope_inv_freq, sinusoidal_table
from mmgpt.weights import model_state_dict


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


# -- Llama-family features: grouped-query attention, SwiGLU, q/k/v bias, RoPE scaling ----------


LLAMA_LIKE = dict(
    pos_encoding="rotary",
    norm="rmsnorm",
    activation="silu",
    gated_mlp=True,
    intermediate_size=40,
    bias=False,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
)


def rope_reference(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, H, T, D): pairs (i, i + D/2) turn by position * inv_freq[i]."""
    T, half = x.size(2), x.size(3) // 2
    angle = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def llama_reference(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Llama written out: each k/v head repeated for its group of q heads, SwiGLU MLP."""
    cfg = model.config
    B, T = ids.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2).float() / D)
    x = model.transformer.wte(ids)
    for block in model.transformer.h:
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).split((H * D, Hkv * D, Hkv * D), dim=2)
        q = rope_reference(q.view(B, T, H, D).transpose(1, 2), inv_freq)
        k = rope_reference(k.view(B, T, Hkv, D).transpose(1, 2), inv_freq)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + block.attn.c_proj(y)
        gate, up = block.mlp.c_fc(block.ln_2(x)).split(cfg.intermediate_size, dim=-1)
        x = x + block.mlp.c_proj(F.silu(gate) * up)
    return model.lm_head(model.transformer.ln_f(x))


def test_llama_like_decoder_matches_written_out_reference():
    model = tiny(**LLAMA_LIKE, qkv_bias=True)
    with torch.no_grad():  # biases start at zero: give them a value that matters
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_()
    ids = torch.randint(0, 50, (3, 12))
    torch.testing.assert_close(model(ids).logits, llama_reference(model, ids), atol=1e-5, rtol=0)


def test_llama_like_module_shapes_and_biases():
    model = tiny(**LLAMA_LIKE, qkv_bias=True, tie_embeddings=False)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.shape == ((4 + 2 * 2) * 8, 32)
    assert block.attn.c_attn.bias is not None and block.attn.c_proj.bias is None
    assert block.mlp.c_fc.weight.shape == (2 * 40, 32) and block.mlp.c_fc.bias is None
    assert block.mlp.c_proj.weight.shape == (32, 40)
    assert GPT.parameter_shapes(model.config) == {
        k: tuple(v.shape) for k, v in model_state_dict(model).items()
    }
    plain = tiny(intermediate_size=24, activation="silu")
    assert plain.transformer.h[0].mlp.c_fc.weight.shape == (24, 16)  # not gated: no doubling


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_cache_holds_kv_heads_and_matches_full_forward(n_kv_head):
    model = tiny(**{**LLAMA_LIKE, "n_kv_head": n_kv_head})
    ids = torch.randint(0, 50, (2, 10))
    full = model(ids).logits
    cache = KVCache.for_model(model.config, capacity=4)
    steps = [model(ids[:, :5], past_key_values=cache).logits]
    steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.keys[0].shape[:2] == (2, n_kv_head) and cache.values[1].shape[1] == n_kv_head
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 10)], 1)
    torch.testing.assert_close(
        model(padded, attention_mask=mask).logits[:, 3:], full, atol=1e-5, rtol=0
    )


def test_linear_rope_scaling_divides_positions():
    plain = Rotary(8, 10000.0)
    linear = Rotary(8, 10000.0, {"rope_type": "linear", "factor": 4.0})
    positions = torch.arange(0, 40, 4)[None]
    for a, b in zip(linear(positions), plain(positions // 4)):
        torch.testing.assert_close(a, b)


def test_llama3_rope_scaling_formula():
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    base = rope_inv_freq(16, 10000.0)
    scaled = rope_inv_freq(16, 10000.0, scaling)
    wavelen = 2 * math.pi / base
    # wavelengths below 64 / 4 = 16 are kept, those above 64 / 1 are stretched 8 times
    assert wavelen[0] < 16 and scaled[0] == base[0]
    assert wavelen[7] > 64 and scaled[7] == pytest.approx(base[7].item() / 8, rel=1e-6)
    # between, a blend: (1 - s) * f / 8 + s * f with s = (64 / wavelen - 1) / (4 - 1)
    assert 16 < wavelen[2] < 64
    s = (64 / wavelen[2].item() - 1) / 3
    expected = (1 - s) * base[2].item() / 8 + s * base[2].item()
    assert scaled[2].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(n_head=4, n_embd=16, n_kv_head=3), r"n_kv_head: 3 does not divide n_head=4"),
        (dict(n_kv_head=0), r"n_kv_head: expected a positive integer"),
        (dict(intermediate_size=2.5), r"intermediate_size: expected a positive integer"),
        (dict(gated_mlp="yes"), r"gated_mlp: expected a bool"),
        (dict(qkv_bias=1), r"qkv_bias: expected a bool or None"),
        (
            dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
            r"rope_scaling: needs pos_encoding='rotary'",
        ),
        (
            dict(pos_encoding="rotary", rope_scaling={"rope_type": "yarn", "factor": 2.0}),
            r"rope_scaling: rope_type 'yarn' is not supported",
        ),
        (
            dict(pos_encoding="rotary", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            r"rope_scaling: .*missing \['high_freq_factor', 'low_freq_factor', 'original_max_position_embeddings'\]",
        ),
        (
            dict(pos_encoding="rotary", rope_scaling={"rope_type": "linear", "factor": 0}),
            r"rope_scaling: factor must be a positive number",
        ),
    ],
)
def test_new_config_fields_are_validated(kwargs, pattern):
    with pytest.raises(ValueError, match=rf"^GPTConfig\.{pattern}"):
        GPTConfig(**kwargs)


def test_directories_saved_before_the_new_fields_load_unchanged(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    new_fields = ("n_kv_head", "intermediate_size", "gated_mlp", "qkv_bias", "rope_scaling")
    for name in new_fields:
        del config["gpt"][name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    attn, mlp = loaded.transformer.h[0].attn, loaded.transformer.h[0].mlp
    assert attn.c_attn.weight.shape == (48, 16) and attn.c_attn.bias is not None
    assert mlp.c_fc.weight.shape == (64, 16)
    ids = torch.randint(0, 50, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# -- resize_token_embeddings ---------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_grows_with_mean_rows(tied, tmp_path):
    model = tiny(tie_embeddings=tied, **({} if tied else LLAMA_LIKE))
    wte_before = model.transformer.wte.weight.detach().clone()
    head_before = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).logits
    model.resize_token_embeddings(53)
    assert model.config.vocab_size == 53
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert wte.shape == (53, model.config.n_embd) and head.shape == wte.shape
    assert (head is wte) == tied
    assert torch.equal(wte[:50], wte_before) and torch.equal(head[:50], head_before)
    for new in range(50, 53):
        torch.testing.assert_close(wte[new], wte_before.mean(0))
        torch.testing.assert_close(head[new], head_before.mean(0))
    after = model(ids).logits
    assert after.shape == (2, 7, 53)
    torch.testing.assert_close(after[..., :50], before)  # old tokens: the same model
    assert torch.isfinite(model(torch.tensor([[52, 51, 3]])).logits).all()  # new ids embed
    assert wte.requires_grad and head.requires_grad
    assert GPT.parameter_shapes(model.config) == {
        k: tuple(v.shape) for k, v in model_state_dict(model).items()
    }
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == 53
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tied
    assert torch.equal(loaded(ids).logits, after)


def test_resize_token_embeddings_refuses_to_shrink():
    model = tiny()
    weight = model.transformer.wte.weight
    model.resize_token_embeddings(50)  # the same size: nothing changes
    assert model.transformer.wte.weight is weight
    with pytest.raises(ValueError, match=r"cannot shrink the vocabulary from 50 to 40"):
        model.resize_token_embeddings(40)
    with pytest.raises(TypeError, match="expected an int"):
        model.resize_token_embeddings(60.0)
    assert model.config.vocab_size == 50
