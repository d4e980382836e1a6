"""Hugging Face GPT-2 ⇄ mmgpt: ours-vs-theirs parity on tiny random models (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmgpt.config import GPTConfig
from mmgpt.generation import GenerationConfig, generate
from mmgpt.model import GPT, KVCache
from mmgpt.pretrained import load_hf_gpt2, save_hf_gpt2
from mmgpt.weights import model_state_dict

transformers = pytest.importorskip("transformers")

TINY = dict(
    n_layer=2,
    n_head=2,
    n_embd=32,
    vocab_size=100,
    n_positions=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
ATOL = 1e-4


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Make every tensor distinct and O(1) so a swapped or untransposed weight cannot hide,
    and logits are spread enough that greedy decoding has no near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def hf_model(**overrides) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(**{**TINY, **overrides})
    model = transformers.GPT2LMHeadModel(config)
    randomize_(model)
    return model.eval()


def hf_logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def our_logits(model: GPT, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture(scope="module")
def hf_tied() -> transformers.GPT2LMHeadModel:
    return hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_tied, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_tied.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(hf_dir) -> GPT:
    return GPT.from_pretrained(hf_dir)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


# -- loading -----------------------------------------------------------------------------


def test_config_is_mapped(ours):
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (2, 2, 32, 100, 64)
    assert c.activation == "gelu_tanh" and c.pos_encoding == "learned" and c.norm == "layernorm"
    assert c.tie_embeddings and c.mlp_hidden == 128 and c.bias
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert not ours.training  # returned ready for inference, like transformers


def test_safetensors_logits_match(hf_tied, ours, ids):
    diff = (our_logits(ours, ids) - hf_logits(hf_tied, ids)).abs().max()
    assert diff < ATOL


def test_left_padding_matches_hf_with_same_mask(hf_tied, ours):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs = hf_logits(hf_tied, ids, attention_mask=mask, position_ids=position_ids)
    mine = our_logits(ours, ids, attention_mask=mask, position_ids=position_ids)
    real = mask.bool()  # logits at padding positions are meaningless on both sides
    assert (mine[real] - theirs[real]).abs().max() < ATOL
    # and the default positions (derived from the mask) are the same ones
    assert (our_logits(ours, ids, attention_mask=mask)[real] - theirs[real]).abs().max() < ATOL
    # a padded row equals the same row unpadded
    unpadded = hf_logits(hf_tied, ids[:1, 5:])
    assert (mine[0, 5:] - unpadded[0]).abs().max() < ATOL


def greedy(model: GPT, prompts: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Plain greedy decoding through the KV cache (left-padded batch)."""
    cache = KVCache.for_model(model.config, capacity=prompts.size(1) + steps)
    out, tokens = [], prompts
    with torch.no_grad():
        for _ in range(steps):
            logits = model(
                tokens, attention_mask=mask, past_key_values=cache, logits_to_keep=1
            ).logits
            tokens = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(tokens)
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    return torch.cat(out, dim=1)


def test_greedy_continuations_match_hf_generate(hf_tied, ours):
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, 100, (2, 8), generator=g)
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # second prompt is 5 tokens, left-padded
    prompts = prompts.masked_fill(mask == 0, 0)
    with torch.no_grad():
        theirs = hf_tied.generate(
            input_ids=prompts,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )[:, prompts.size(1) :]
    assert theirs.shape == (2, 20)
    assert torch.equal(greedy(ours, prompts, mask, 20), theirs)
    # and through the library's generation loop, from unpadded prompt lists
    rows = [p[m.bool()].tolist() for p, m in zip(prompts, mask)]
    config = GenerationConfig(max_new_tokens=20, temperature=0.0)
    assert generate(ours, rows, config, pad_id=0) == theirs.tolist()


def test_pytorch_bin_without_prefix_and_with_mask_buffers(hf_tied, hf_dir, tmp_path, ids):
    # Old checkpoints (e.g. the original gpt2 upload) have no "transformer." prefix and carry
    # the causal-mask buffers attn.bias / attn.masked_bias. Written by hand because
    # transformers 5 writes safetensors even with safe_serialization=False.
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_tied.state_dict().items()}
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    model = GPT.from_pretrained(tmp_path)
    assert (our_logits(model, ids) - hf_logits(hf_tied, ids)).abs().max() < ATOL


def test_pytorch_bin_is_never_unpickled(hf_dir, tmp_path):
    torch.save({"weights": object()}, tmp_path / "pytorch_model.bin")
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(Exception, match="weights_only=True"):
        load_hf_gpt2(tmp_path)


def test_sharded_safetensors(hf_tied, tmp_path, ids):
    hf_tied.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    model = load_hf_gpt2(tmp_path)
    assert (our_logits(model, ids) - hf_logits(hf_tied, ids)).abs().max() < ATOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=False),
        dict(activation_function="gelu", n_inner=48, layer_norm_epsilon=1e-3),
    ],
    ids=["untied", "exact-gelu-n_inner-eps"],
)
def test_variants_match(overrides, tmp_path, ids):
    theirs = hf_model(**overrides)
    theirs.save_pretrained(tmp_path)
    model = load_hf_gpt2(tmp_path)
    if overrides.get("tie_word_embeddings") is False:
        assert model.lm_head.weight is not model.transformer.wte.weight
        assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert (our_logits(model, ids) - hf_logits(theirs, ids)).abs().max() < ATOL


# -- export ------------------------------------------------------------------------------


def our_model(**overrides) -> GPT:
    cfg = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=64)
    cfg.update(activation="gelu_tanh")
    model = GPT(GPTConfig(**{**cfg, **overrides}))
    randomize_(model, seed=4)
    return model.eval()


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_embeddings=False, activation="gelu"), dict(bias=False, mlp_ratio=2.0)],
    ids=["tied", "untied-gelu", "no-bias"],
)
def test_export_round_trip(overrides, tmp_path, ids):
    model = our_model(**overrides)
    save_hf_gpt2(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (our_logits(model, ids) - hf_logits(theirs, ids)).abs().max() < ATOL
    if model.config.bias:  # back through our loader: the very same tensors
        back = load_hf_gpt2(tmp_path)
        assert back.config == model.config
        mine, again = model_state_dict(model), model_state_dict(back)
        assert mine.keys() == again.keys()
        assert all(torch.equal(mine[k], again[k]) for k in mine)


def test_export_rejects_what_gpt2_cannot_express(tmp_path):
    with pytest.raises(ValueError, match=r"pos_encoding='rotary'.*norm='rmsnorm'"):
        save_hf_gpt2(our_model(pos_encoding="rotary", norm="rmsnorm"), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


# -- errors ------------------------------------------------------------------------------


def write_config(path: Path, hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_activation_names_the_field(hf_dir, tmp_path):
    write_config(tmp_path, hf_dir, activation_function="relu")
    with pytest.raises(ValueError, match=r"config\.json.*activation_function 'relu'"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "flag", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"]
)
def test_unsupported_attention_flags(flag, hf_dir, tmp_path):
    write_config(tmp_path, hf_dir, **{flag: True})
    with pytest.raises(ValueError, match=flag):
        load_hf_gpt2(tmp_path)


def test_missing_weights_file_names_the_directory(hf_dir, tmp_path):
    write_config(tmp_path, hf_dir)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*model\.safetensors"):
        GPT.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_name_the_file(hf_tied, hf_dir, tmp_path):
    from safetensors.torch import save_file

    write_config(tmp_path, hf_dir)
    state = {k: v.contiguous() for k, v in hf_tied.state_dict().items() if k != "lm_head.weight"}
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.crossattention.c_attn.weight"] = torch.zeros(32, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"model\.safetensors.*h\.1\.mlp\.c_fc\.bias.*crossattention"
    ):
        load_hf_gpt2(tmp_path)


def test_wrong_shape_is_reported(hf_dir, tmp_path):
    write_config(tmp_path, hf_dir, n_positions=32)  # weights hold 64 positions
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"wpe\.weight.*\(64, 32\)"):
        load_hf_gpt2(tmp_path)
