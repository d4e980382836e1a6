"""Hugging Face Llama, Mistral and Qwen2 checkpoints ⇄ mmgpt's GPT decoder.

The three families are one architecture: rotary positions (rotate-half), RMSNorm, grouped-query
attention and a SwiGLU MLP, without biases — except Qwen2, whose q/k/v projections have one.
``read_hf_llama`` reads a local directory of any of them (``config.json`` with ``model_type``
``llama``, ``mistral`` or ``qwen2``; weights as :mod:`mmgpt.interop.hf_files` finds them) as a
:class:`GPTConfig` and a state dict in mmgpt's layout; ``write_hf_llama`` writes the reverse.
Neither needs ``transformers`` installed, and this module builds no model.

Tensors map one to one but for two fusions, undone on export:

=====================================================  ===========================================
Hugging Face (``model.`` prefix optional)              mmgpt
=====================================================  ===========================================
``embed_tokens`` / ``norm`` / ``lm_head``              ``transformer.wte`` / ``transformer.ln_f`` /
                                                       ``lm_head``
``layers.i.input_layernorm``                           ``transformer.h.i.ln_1``
``layers.i.self_attn.{q,k,v}_proj`` (concatenated)     ``transformer.h.i.attn.c_attn``
``layers.i.self_attn.o_proj``                          ``transformer.h.i.attn.c_proj``
``layers.i.post_attention_layernorm``                  ``transformer.h.i.ln_2``
``layers.i.mlp.{gate,up}_proj`` (concatenated)         ``transformer.h.i.mlp.c_fc``
``layers.i.mlp.down_proj``                             ``transformer.h.i.mlp.c_proj``
=====================================================  ===========================================

Sliding windows (Mistral, Qwen2 with ``use_sliding_window``): a window of W positions changes
nothing for sequences of at most W, so a model whose window is shorter than its
``max_position_embeddings`` is read with ``block_size = W``; the decoder then refuses longer
sequences instead of attending differently from transformers.

Dropout: Llama has attention dropout only, mmgpt one rate for every site; the loaded model
has dropout 0 (it is returned in eval mode, where neither applies).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.config import CONFIG_NAME, GPTConfig, read_model_config
from mmgpt.interop.hf_files import read_hf_weights, write_hf_checkpoint

if TYPE_CHECKING:
    import torch

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# transformers' defaults where a config.json leaves a field out
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        sliding_window=4096,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=32768,
        sliding_window=4096,
        max_window_layers=28,
    ),
}
_ROPE_TYPES = ("default", "linear", "llama3")

# Per layer: their name → ours, and the fused tensors (ours ← theirs, in concatenation order).
_RENAMES = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
}
_FUSED = {
    "attn.c_attn.weight": tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
    "attn.c_attn.bias": tuple(f"self_attn.{p}_proj.bias" for p in "qkv"),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_PIECES = {piece: fused for fused, pieces in _FUSED.items() for piece in pieces}
_TOP = {
    "embed_tokens.weight": "transformer.wte.weight",
    "norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def gpt_config_from_hf(hf: dict[str, Any], source: Path | str = CONFIG_NAME) -> GPTConfig:
    """Map a Hugging Face ``LlamaConfig``/``MistralConfig``/``Qwen2Config`` dict (transformers
    4 or 5 format) to a :class:`GPTConfig`; anything the decoder cannot compute exactly is a
    ``ValueError`` naming ``source`` and the field."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type must be one of {list(LLAMA_MODEL_TYPES)}, got {model_type!r}"
        )
    defaults = _DEFAULTS[model_type]

    def field(name: str, default: Any = None) -> Any:
        value = hf.get(name)
        return defaults.get(name, default) if value is None else value

    act = field("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' two names of x * sigmoid(x)
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; expected 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(
                f"{source}: {flag}=true is not supported by mmgpt's GPT decoder "
                "(it has no bias on o_proj and the MLP of a Llama-family model)"
            )
    n_embd, n_head = field("hidden_size"), field("num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and isinstance(n_head, int) and head_dim * n_head != n_embd:
        raise ValueError(
            f"{source}: head_dim={head_dim} with num_attention_heads={n_head} does not span "
            f"hidden_size={n_embd}; mmgpt's GPT decoder needs head_dim = hidden_size / heads"
        )
    block_size = field("max_position_embeddings")
    window = _sliding_window(hf, model_type, defaults)
    if window is not None and isinstance(block_size, int) and window < block_size:
        block_size = window  # exact: no sequence the decoder accepts reaches past the window
    rope_theta, rope_scaling = _rope_from_hf(hf, source, field("max_position_embeddings"))
    try:
        return GPTConfig(
            vocab_size=field("vocab_size"),
            block_size=block_size,
            n_layer=field("num_hidden_layers"),
            n_head=n_head,
            n_embd=n_embd,
            n_kv_head=field("num_key_value_heads", n_head),
            intermediate_size=field("intermediate_size"),
            dropout=0.0,
            bias=False,
            qkv_bias=model_type == "qwen2",
            pos_encoding="rotary",
            norm="rmsnorm",
            norm_eps=float(field("rms_norm_eps", 1e-6)),
            activation="silu",
            gated_mlp=True,
            tie_embeddings=bool(field("tie_word_embeddings", False)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            init_std=float(field("initializer_range", 0.02)),
        )
    except ValueError as exc:
        raise ValueError(f"{source}: invalid {model_type} config ({exc})") from None


def _sliding_window(hf: dict[str, Any], model_type: str, defaults: dict[str, Any]) -> int | None:
    """The attention window some layer uses (transformers 5's rules), or None."""
    window = hf["sliding_window"] if "sliding_window" in hf else defaults.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            return window if "sliding_attention" in layer_types else None
        n_layer = hf.get("num_hidden_layers") or defaults["num_hidden_layers"]
        max_window_layers = hf.get("max_window_layers")
        if max_window_layers is None:
            max_window_layers = defaults["max_window_layers"]
        return window if max_window_layers < n_layer else None
    return window


def _rope_from_hf(
    hf: dict[str, Any], source: Path | str, max_positions: Any
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers 5's ``rope_parameters`` or 4's
    ``rope_theta`` + ``rope_scaling`` (which transformers 5 also prefers when present)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"{source}: rope_parameters must be one object (per-layer RoPE is not supported), "
            f"got {params!r}"
        )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise ValueError(
            f"{source}: partial_rotary_factor={partial} is not supported (mmgpt rotates the "
            "whole head)"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"{source}: rope_type {rope_type!r} is not supported; mmgpt's GPT decoder "
            f"implements {', '.join(_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    scaling: dict[str, Any] = {"rope_type": rope_type}
    needed = ["factor"]
    if rope_type == "llama3":
        needed += ["low_freq_factor", "high_freq_factor"]
        # transformers: a top-level value first, then the RoPE dict's, then the context
        original = hf.get("original_max_position_embeddings")
        original = original or params.get("original_max_position_embeddings") or max_positions
        scaling["original_max_position_embeddings"] = original
    for key in needed:
        if params.get(key) is None:
            raise ValueError(f"{source}: rope_type {rope_type!r} needs {key!r} in its parameters")
        scaling[key] = params[key]
    return theta, scaling


def hf_config_from_gpt(
    config: GPTConfig,
    family: str = "llama",
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face ``family`` model (llama, mistral or qwen2)
    equivalent to ``config``; what the family cannot express is a ``ValueError``."""
    if family not in LLAMA_MODEL_TYPES:
        raise ValueError(f"family must be one of {list(LLAMA_MODEL_TYPES)}, got {family!r}")
    problems = []
    if config.pos_encoding != "rotary":
        problems.append(f"pos_encoding={config.pos_encoding!r} (needs 'rotary')")
    if config.norm != "rmsnorm":
        problems.append(f"norm={config.norm!r} (needs 'rmsnorm')")
    if not config.gated_mlp or config.activation != "silu":
        problems.append(
            f"activation={config.activation!r}, gated_mlp={config.gated_mlp} "
            "(needs a gated silu MLP, SwiGLU)"
        )
    if config.bias:
        problems.append("bias=True (no bias on o_proj, the MLP or the norms)")
    if config.attn_bias and family != "qwen2":
        problems.append("qkv_bias=True (q/k/v biases: write family 'qwen2')")
    if problems:
        raise ValueError(f"cannot export to Hugging Face {family}: " + "; ".join(problems))
    rope = {"rope_type": "default"} if config.rope_scaling is None else dict(config.rope_scaling)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        # transformers 5 reads rope_parameters; 4 reads rope_theta and rope_scaling
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else dict(config.rope_scaling),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
    }
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif family == "mistral":
        hf.update(sliding_window=None)
    else:
        hf.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=config.n_layer,
            layer_types=["full_attention"] * config.n_layer,
        )
    return hf


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def hf_state_to_gpt(
    state: dict[str, torch.Tensor], config: GPTConfig, source: Path | str = "weights"
) -> dict[str, torch.Tensor]:
    """A Llama-family state dict (with or without the ``model.`` prefix) in mmgpt's layout.

    Tensors it does not know keep their names, so the loader reports them as unexpected; a
    fusion with a piece missing keeps its pieces, so the fused tensor is reported missing.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # ours → theirs → (key, t)
    for key, tensor in state.items():
        name = key.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints store; recomputed from the config
        if name in _TOP:
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # an alias of embed_tokens that some exports store anyway
            out[_TOP[name]] = tensor
            continue
        match = _LAYER.match(name)
        if match:
            prefix, rest = f"transformer.h.{match[1]}.", match[2]
            if rest in _RENAMES:
                out[prefix + _RENAMES[rest]] = tensor
                continue
            if rest in _PIECES:
                pieces.setdefault(prefix + _PIECES[rest], {})[rest] = (key, tensor)
                continue
        out[key] = tensor
    for ours, found in pieces.items():
        order = _FUSED[_OUR_LAYER.match(ours)[2]]
        if set(found) != set(order):
            out.update(dict(found.values()))
            continue
        parts = [found[p][1] for p in order]
        if len({t.shape[1:] for t in parts}) != 1:
            shapes = {found[p][0]: tuple(found[p][1].shape) for p in order}
            raise ValueError(f"{source}: tensors to fuse into {ours!r} disagree: {shapes}")
        out[ours] = torch.cat(parts, dim=0)
    return out


def gpt_state_to_hf(
    state: dict[str, torch.Tensor], config: GPTConfig, family: str = "llama"
) -> dict[str, torch.Tensor]:
    """Our state dict in the Llama family's layout (fused tensors split back; zero q/k/v
    biases for a Qwen2 export of a model without them: the same function)."""
    q_dim, kv_dim = config.n_embd, config.kv_heads * config.head_dim
    sizes = {
        "attn.c_attn.weight": (q_dim, kv_dim, kv_dim),
        "attn.c_attn.bias": (q_dim, kv_dim, kv_dim),
        "mlp.c_fc.weight": (config.mlp_hidden, config.mlp_hidden),
    }
    renames = {ours: theirs for theirs, ours in _RENAMES.items()}
    top = {ours: theirs for theirs, ours in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name in top:
            out[top[name] if name == "lm_head.weight" else f"model.{top[name]}"] = tensor
            continue
        match = _OUR_LAYER.match(name)
        rest = match[2] if match else None
        if rest in renames:
            out[f"model.layers.{match[1]}.{renames[rest]}"] = tensor
        elif rest in sizes:
            for piece, part in zip(_FUSED[rest], tensor.split(sizes[rest], dim=0)):
                out[f"model.layers.{match[1]}.{piece}"] = part.clone()
        else:
            raise ValueError(f"no Hugging Face {family} tensor corresponds to {name!r}")
    if family == "qwen2" and not config.attn_bias:
        ref = state["transformer.wte.weight"]
        for i in range(config.n_layer):
            for piece, width in zip(_FUSED["attn.c_attn.bias"], sizes["attn.c_attn.bias"]):
                out[f"model.layers.{i}.{piece}"] = ref.new_zeros(width)
    return out


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def read_hf_llama(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Path]:
    """The config and the weights (in mmgpt's layout) of a local Hugging Face Llama, Mistral
    or Qwen2 directory, and the file the weights came from."""
    path = Path(path)
    config = gpt_config_from_hf(read_model_config(path), path / CONFIG_NAME)
    raw, source = read_hf_weights(path)
    return config, hf_state_to_gpt(raw, config, source), source


def write_hf_llama(
    state: dict[str, torch.Tensor],
    config: GPTConfig,
    path: str | Path,
    *,
    family: str = "llama",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write a GPT's ``state`` and ``config`` as a Hugging Face ``family`` directory
    (``config.json`` + ``model.safetensors``) that ``AutoModelForCausalLM`` loads."""
    hf_config = hf_config_from_gpt(
        config,
        family,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    write_hf_checkpoint(hf_config, gpt_state_to_hf(state, config, family), path)


def is_hf_llama_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a Hugging Face Llama, Mistral or Qwen2 one."""
    return config.get("model_type") in LLAMA_MODEL_TYPES


__all__ = [
    "LLAMA_MODEL_TYPES",
    "gpt_config_from_hf",
    "gpt_state_to_hf",
    "hf_config_from_gpt",
    "hf_state_to_gpt",
    "is_hf_llama_config",
    "read_hf_llama",
    "write_hf_llama",
]
