"""The static-shape KV cache and the compiled decode step, against the growing KVCache path."""

from __future__ import annotations

import pytest
import torch

from mmgpt import compiled_step
from mmgpt.config import gpt_config
from mmgpt.generation import GenerationConfig, generate
from mmgpt.model import GPT, KVCache
from mmgpt.static_cache import StaticKVCache

V = 64
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [10, 20, 30, 40]]
# (position encoding, extra config): learned, rotary, sinusoidal, and grouped-query attention
CONFIGS = {
    "learned": dict(pos_encoding="learned"),
    "rotary": dict(pos_encoding="rotary"),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "rotary-gqa": dict(pos_encoding="rotary", n_head=4, n_kv_head=2, n_embd=48),
}


def tiny(name: str = "learned", **overrides) -> GPT:
    # Untied head and a large init: varied greedy continuations instead of one repeated token.
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=48, init_std=0.5, tie_embeddings=False)
    return GPT(gpt_config("gpt-nano", **{**cfg, **CONFIGS[name], **overrides})).eval()


@pytest.fixture
def no_compiler(monkeypatch):
    """Compiling unavailable: GenerationConfig(compile=True) runs the static cache eagerly."""
    monkeypatch.setattr(compiled_step, "_UNAVAILABLE", [])
    monkeypatch.setattr(compiled_step, "missing_compiler", lambda: "no C++ compiler (test)")


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_static_cache_forward_equals_growing_cache_with_left_padding(name):
    model = tiny(name)
    ids = torch.tensor([[0, 0, 0, 9, 8, 7], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    steps = torch.tensor([[11, 12, 13], [21, 22, 23]])  # three decode steps per row

    dynamic = KVCache.for_model(model.config, capacity=16)
    ref = [model(ids, attention_mask=mask, past_key_values=dynamic, use_cache=True).logits]
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    for t in range(3):
        out = model(
            steps[:, t : t + 1],
            attention_mask=full_mask[:, : 7 + t],
            past_key_values=dynamic,
            use_cache=True,
        )
        ref.append(out.logits)

    static = StaticKVCache.for_model(model.config, 2, capacity=16)
    static.set_padding(mask)
    got = [model(ids, past_key_values=static, cache_position=torch.arange(6)).logits]
    for t in range(3):
        out = model(
            steps[:, t : t + 1], past_key_values=static, cache_position=torch.tensor([6 + t])
        )
        got.append(out.logits)
    for r, g in zip(ref, got):
        # padding positions compute garbage in both paths; compare the real ones
        torch.testing.assert_close(g[0, -r.size(1) :][-3:], r[0][-3:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g[1], r[1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_cache_rewinds_by_writing_over_stale_slots():
    """Slots after the current position are masked, so decoding again from an earlier slot
    (rejected draft tokens) gives what a cache that never saw them gives."""
    model = tiny("rotary")
    ids = torch.tensor([[5, 6, 7, 8]])
    clean = StaticKVCache.for_model(model.config, 1, capacity=12)
    model(ids, past_key_values=clean, cache_position=torch.arange(4))
    want = model(torch.tensor([[9]]), past_key_values=clean, cache_position=torch.tensor([4]))

    dirty = StaticKVCache.for_model(model.config, 1, capacity=12)
    model(ids, past_key_values=dirty, cache_position=torch.arange(4))
    model(torch.tensor([[30, 31, 32]]), past_key_values=dirty, cache_position=torch.arange(4, 7))
    got = model(torch.tensor([[9]]), past_key_values=dirty, cache_position=torch.tensor([4]))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_static_cache_refuses_what_it_cannot_do():
    model = tiny()
    cache = StaticKVCache.for_model(model.config, 1, capacity=8)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="needs cache_position"):
        model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match=r"cache\.set_padding"):
        model(
            ids,
            past_key_values=cache,
            cache_position=torch.arange(2),
            attention_mask=torch.ones(1, 2),
        )
    with pytest.raises(ValueError, match="capacity 49 must be in"):
        StaticKVCache.for_model(model.config, 1, capacity=49)
    with pytest.raises(ValueError, match="does not fit a cache of batch 1"):
        cache.set_padding(torch.ones(2, 3))
    with pytest.raises(ValueError, match="GenerationConfig.compile: not available with beam"):
        GenerationConfig(num_beams=2, compile=True)
    with pytest.raises(ValueError, match="GenerationConfig.compile: expected a bool"):
        GenerationConfig(compile="yes")


@pytest.mark.parametrize("name", CONFIGS)
def test_static_generate_equals_eager_generate_for_batches(name, no_compiler):
    model = tiny(name)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    want = generate(model, PROMPTS, cfg, pad_id=0)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = generate(
            model,
            PROMPTS,
            GenerationConfig(max_new_tokens=12, temperature=0, compile=True),
            pad_id=0,
        )
    assert got == want
    assert len(set(want[0])) > 3  # a real continuation
    one = generate(
        model,
        [PROMPTS[1]],
        GenerationConfig(max_new_tokens=12, temperature=0, compile=True),
        pad_id=0,
    )
    assert one == [want[1]]


def test_static_generate_keeps_sampling_hidden_states_and_stops(no_compiler):
    model = tiny("rotary")
    base = dict(max_new_tokens=10, temperature=1.3, top_k=20, seed=[3, 4, 5], stop_token_ids=[7])
    want = generate(
        model,
        PROMPTS,
        GenerationConfig(**base),
        pad_id=0,
        return_hidden_states=True,
        return_dict=True,
    )
    with pytest.warns(RuntimeWarning):
        got = generate(
            model,
            PROMPTS,
            GenerationConfig(**base, compile=True),
            pad_id=0,
            return_hidden_states=True,
            return_dict=True,
        )
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_failing_compiler_falls_back_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded\nlong traceback")

        return run

    monkeypatch.setattr(compiled_step, "_UNAVAILABLE", [])
    monkeypatch.setattr(compiled_step, "_COMPILED", {})
    monkeypatch.setattr(compiled_step.torch, "compile", broken_compile)
    model = tiny()
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    want = generate(model, PROMPTS, cfg, pad_id=0)
    with pytest.warns(
        RuntimeWarning, match="torch.compile failed \\(RuntimeError: inductor exploded\\)"
    ):
        got = generate(
            model,
            PROMPTS,
            GenerationConfig(max_new_tokens=8, temperature=0, compile=True),
            pad_id=0,
        )
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("name", ["learned", "rotary-gqa"])
def test_compiled_generate_equals_eager_generate(name, monkeypatch):
    """The real thing: inductor compiles the step (one graph per batch size)."""
    monkeypatch.setattr(compiled_step, "_UNAVAILABLE", [])
    if compiled_step.missing_compiler() is not None:
        pytest.skip("no C++ compiler for torch.compile")
    model = tiny(name)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    compiled = GenerationConfig(max_new_tokens=12, temperature=0, compile=True)
    step = compiled_step.DecodeStep(torch.device("cpu"), compile=True)
    assert step.compiled
    for prompts in (PROMPTS, [PROMPTS[0]], [PROMPTS[2]]):
        assert generate(model, prompts, compiled, pad_id=0) == generate(
            model, prompts, cfg, pad_id=0
        )
    assert not compiled_step._UNAVAILABLE  # it compiled, it did not fall back


@pytest.mark.slow
@pytest.mark.parametrize(("method", "group_size"), [("int8", None), ("int4", 32)])
def test_compiled_quantised_generate_equals_eager_quantised_generate(
    method, group_size, monkeypatch
):
    """A weight-only quantised model compiles (no fallback) and decodes the tokens its eager
    kernels decode, at batch 1 (the fused kernels) and batch 3."""
    import warnings

    from mmgpt.quantization import quantize_model

    monkeypatch.setattr(compiled_step, "_UNAVAILABLE", [])
    if compiled_step.missing_compiler() is not None:
        pytest.skip("no C++ compiler for torch.compile")
    model = tiny(n_embd=64, n_head=4)
    quantize_model(model, method, group_size)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    compiled = GenerationConfig(max_new_tokens=12, temperature=0, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        for prompts in ([PROMPTS[0]], PROMPTS):
            assert generate(model, prompts, compiled, pad_id=0) == generate(
                model, prompts, cfg, pad_id=0
            )
    assert not compiled_step._UNAVAILABLE
