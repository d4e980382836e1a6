"""Hugging Face Llama, Mistral and Qwen2 ⇄ mmgpt: ours-vs-theirs parity on tiny random models
(grouped-query attention, SwiGLU, RoPE scaling, tied and untied heads; no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmgpt.config import GPTConfig
from mmgpt.generation import GenerationConfig, generate
from mmgpt.interop import hf_family, write_hf
from mmgpt.model import GPT, KVCache
from mmgpt.pretrained import load_model, save_hf
from mmgpt.weights import model_state_dict

transformers = pytest.importorskip("transformers")

V = 97
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    max_position_embeddings=128,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
ATOL = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # short, so that the test sequences reach the scaled frequencies
    "original_max_position_embeddings": 16,
}
# name → (config class, model class, overrides)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0}, rms_norm_eps=1e-5),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor distinct and O(1): a swapped, unsplit or misordered weight cannot hide, and
    logits are spread enough that greedy decoding has no near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def hf_model(case: str, **overrides):
    config_cls, model_cls, case_overrides = CASES[case]
    config = getattr(transformers, config_cls)(**{**TINY, **case_overrides, **overrides})
    model = getattr(transformers, model_cls)(config)
    randomize_(model)
    return model.eval()


def logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, the same loaded by GPT.from_pretrained, its directory)."""
    theirs = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(path)
    return request.param, theirs, GPT.from_pretrained(path), path


def ids_of(shape: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [ids_of((1, n), seed=n)[0].tolist() for n in (9, 3, 6)]


# -- loading -----------------------------------------------------------------------------


def test_config_is_mapped(pair):
    case, theirs, ours, _ = pair
    c, hf = ours.config, theirs.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.vocab_size) == (2, 4, 2, 64, V)
    assert (c.block_size, c.mlp_hidden, c.head_dim) == (128, 96, 16)
    assert (c.pos_encoding, c.norm, c.activation, c.gated_mlp) == (
        "rotary",
        "rmsnorm",
        "silu",
        True,
    )
    assert not c.bias and c.attn_bias == (case == "qwen2")
    assert c.tie_embeddings == hf.tie_word_embeddings
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == hf.tie_word_embeddings
    assert c.norm_eps == hf.rms_norm_eps and c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.rope_scaling == (LLAMA3 if case == "llama3-rope" else None)
    attn = ours.transformer.h[0].attn
    assert attn.c_attn.weight.shape == ((4 + 2 * 2) * 16, 64)  # q + k + v of 2 kv heads
    assert ours.transformer.h[0].mlp.c_fc.weight.shape == (2 * 96, 64)  # gate + up
    assert not ours.training


def test_logits_match(pair):
    _, theirs, ours, _ = pair
    ids = ids_of((2, 40))
    mine = logits(ours, ids)
    assert mine.std() > 1.0  # spread: a wrong weight would show
    assert max_diff(mine, logits(theirs, ids)) < ATOL


def test_left_padded_batch_matches_each_prompt_alone_and_hf(pair):
    _, theirs, ours, _ = pair
    ids, mask = left_padded(PROMPTS)
    mine = logits(ours, ids, attention_mask=mask)
    real = mask.bool()
    assert max_diff(mine[real], logits(theirs, ids, attention_mask=mask)[real]) < ATOL
    for row, prompt in enumerate(PROMPTS):
        alone = logits(ours, torch.tensor([prompt]))[0]
        assert max_diff(mine[row, -len(prompt) :], alone) < ATOL
        assert max_diff(alone, logits(theirs, torch.tensor([prompt]))[0]) < ATOL


def test_greedy_decoding_matches_hf_generate(pair):
    _, theirs, ours, _ = pair
    config = GenerationConfig(max_new_tokens=16, temperature=0.0)
    mine = generate(ours, PROMPTS, config, pad_id=0)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        batch = theirs.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0
        )[:, ids.size(1) :]
    assert mine == batch.tolist()
    for prompt, tokens in zip(PROMPTS, mine):  # batching changes nothing
        assert generate(ours, [prompt], config, pad_id=0) == [tokens]


def test_kv_cache_decoding_equals_full_forward(pair):
    _, _, ours, _ = pair
    ids = ids_of((2, 20), seed=5)
    full = logits(ours, ids)
    cache = KVCache.for_model(ours.config, capacity=20)
    steps = [logits(ours, ids[:, :12], past_key_values=cache)]
    steps += [logits(ours, ids[:, t : t + 1], past_key_values=cache) for t in range(12, 20)]
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    assert cache.keys[0].shape[1] == 2  # the cache holds the kv heads only


def test_round_trip_through_transformers(pair, tmp_path):
    case, theirs, ours, _ = pair
    family = save_hf(ours, tmp_path)
    assert family == ("qwen2" if case == "qwen2" else "llama")
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = ids_of((2, 40), seed=6)
    assert max_diff(logits(again, ids), logits(theirs, ids)) < ATOL
    back = GPT.from_pretrained(tmp_path)
    assert back.config == ours.config
    mine, restored = model_state_dict(ours), model_state_dict(back)
    assert mine.keys() == restored.keys()
    assert all(torch.equal(mine[k], restored[k]) for k in mine)


# -- other files and config formats ---------------------------------------------------------


def test_sharded_safetensors(tmp_path):
    theirs = hf_model("llama")
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = ids_of((2, 24))
    assert max_diff(logits(load_model(tmp_path), ids), logits(theirs, ids)) < ATOL


def test_pytorch_bin_without_prefix_with_inv_freq_buffers(tmp_path):
    # An old layout: a bare LlamaModel's names (no "model.") plus rotary buffers, as .bin.
    theirs = hf_model("llama")
    state = {k.removeprefix("model."): v.clone() for k, v in theirs.state_dict().items()}
    for i in range(2):
        state[f"layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, tmp_path / "pytorch_model.bin")
    theirs.config.save_pretrained(tmp_path)
    ids = ids_of((2, 24))
    assert max_diff(logits(GPT.from_pretrained(tmp_path), ids), logits(theirs, ids)) < ATOL


def test_pytorch_bin_is_never_unpickled(tmp_path):
    hf_model("llama").config.save_pretrained(tmp_path)
    torch.save({"weights": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="weights_only=True"):
        GPT.from_pretrained(tmp_path)


def test_transformers_4_config_format(tmp_path):
    """Hub checkpoints say rope_theta and rope_scaling (with "type" in older ones) at the top
    level, and no rope_parameters."""
    theirs = hf_model("llama3-rope")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    theta = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config.update(rope_theta=theta, rope_scaling=rope)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.rope_scaling == LLAMA3 and ours.config.rope_theta == 500000.0
    ids = ids_of((2, 40))
    assert max_diff(logits(ours, ids), logits(theirs, ids)) < ATOL


def test_linear_rope_scaling(tmp_path):
    theirs = hf_model("llama", rope_parameters={"rope_type": "linear", "factor": 4.0})
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = ids_of((2, 40))
    assert max_diff(logits(ours, ids), logits(theirs, ids)) < ATOL


def test_sliding_window_caps_the_context(tmp_path):
    # Within the window, windowed attention is full attention: exact up to 16 positions.
    theirs = hf_model("mistral", sliding_window=16, max_position_embeddings=64)
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.block_size == 16
    ids = ids_of((2, 16))
    assert max_diff(logits(ours, ids), logits(theirs, ids)) < ATOL
    with pytest.raises(ValueError, match=r"17 positions exceeds the model's context"):
        ours(ids_of((1, 17)))


def test_qwen2_window_only_where_layers_use_it(tmp_path):
    theirs = hf_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)
    theirs.save_pretrained(tmp_path)  # no layer at or past max_window_layers: no window
    assert GPT.from_pretrained(tmp_path).config.block_size == 128
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert GPT.from_pretrained(tmp_path).config.block_size == 16


# -- export ------------------------------------------------------------------------------


def our_model(**overrides) -> GPT:
    config = dict(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=V, block_size=64, bias=False
    )
    config.update(pos_encoding="rotary", norm="rmsnorm", activation="silu", gated_mlp=True)
    config.update(intermediate_size=80, tie_embeddings=False)
    model = GPT(GPTConfig(**{**config, **overrides}))
    randomize_(model, seed=7)
    return model.eval()


@pytest.mark.parametrize(
    ("overrides", "family", "expected"),
    [
        (dict(), "mistral", "MistralForCausalLM"),
        (dict(), "qwen2", "Qwen2ForCausalLM"),  # zero q/k/v biases
        (dict(rope_scaling=LLAMA3, tie_embeddings=True), None, "LlamaForCausalLM"),
        (dict(n_kv_head=None, rope_theta=1e6), None, "LlamaForCausalLM"),
        (dict(qkv_bias=True), None, "Qwen2ForCausalLM"),
    ],
    ids=["mistral", "qwen2-no-bias", "llama3-tied", "mha", "qwen2"],
)
def test_export_families(overrides, family, expected, tmp_path):
    model = our_model(**overrides)
    written = write_hf(model.state_dict(), model.config, tmp_path, family=family, eos_token_id=3)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == expected and written == theirs.config.model_type
    assert theirs.config.eos_token_id == 3
    ids = ids_of((2, 40), seed=8)
    assert max_diff(logits(model, ids), logits(theirs, ids)) < ATOL


def test_family_follows_features():
    assert hf_family(GPTConfig()) == "gpt2"
    assert hf_family(our_model().config) == "llama"
    assert hf_family(our_model(qkv_bias=True).config) == "qwen2"
    with pytest.raises(ValueError, match=r"pos_encoding='rotary', norm='layernorm'"):
        hf_family(GPTConfig(pos_encoding="rotary"))
    with pytest.raises(ValueError, match=r"pos_encoding='sinusoidal'"):
        hf_family(GPTConfig(pos_encoding="sinusoidal", norm="rmsnorm"))


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    with pytest.raises(ValueError, match=r"llama: bias=True"):
        save_hf(our_model(bias=True), tmp_path, family="llama")
    with pytest.raises(ValueError, match=r"mistral: qkv_bias=True.*'qwen2'"):
        save_hf(our_model(qkv_bias=True), tmp_path, family="mistral")
    with pytest.raises(ValueError, match=r"GPT-2: .*gated_mlp=True.*n_kv_head=2"):
        save_hf(our_model(pos_encoding="learned", norm="layernorm"), tmp_path, family="gpt2")
    with pytest.raises(ValueError, match=r"family must be one of.*'gemma'"):
        save_hf(our_model(), tmp_path, family="gemma")
    assert not (tmp_path / "model.safetensors").exists()


# -- errors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    hf_model("llama").save_pretrained(path)
    return path


def edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_model_type_names_it_and_the_supported_ones(llama_dir, tmp_path):
    edited_copy(llama_dir, tmp_path, model_type="gemma")
    pattern = r"config\.json.*model_type 'gemma' is not supported.*gpt2, llama, mistral, qwen2"
    with pytest.raises(ValueError, match=pattern):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (dict(hidden_act="gelu"), r"hidden_act 'gelu'"),
        (dict(attention_bias=True), r"attention_bias=true"),
        (dict(mlp_bias=True), r"mlp_bias=true"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), r"rope_type 'yarn'"),
        (dict(rope_parameters={"rope_type": "linear"}), r"'linear' needs 'factor'"),
        (dict(head_dim=32), r"head_dim=32"),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0\.5"),
        (dict(num_key_value_heads=3), r"invalid llama config.*n_kv_head"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_unsupported_config_names_the_file_and_field(changes, pattern, llama_dir, tmp_path):
    edited_copy(llama_dir, tmp_path, **changes)
    with pytest.raises(ValueError, match=rf"config\.json: .*{pattern}"):
        GPT.from_pretrained(tmp_path)


def test_config_that_does_not_fit_the_weights(llama_dir, tmp_path):
    edited_copy(llama_dir, tmp_path, num_key_value_heads=4)  # the weights hold 2 kv heads
    with pytest.raises(ValueError, match=r"config\.json: describes.*c_attn\.weight.*\(192, 64\)"):
        GPT.from_pretrained(tmp_path)


def test_missing_projection_is_named(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    edited_copy(llama_dir, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['transformer\.h\.1\.attn\.c_attn\.weight'\]"):
        GPT.from_pretrained(tmp_path)
