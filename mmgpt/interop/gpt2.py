"""Hugging Face GPT-2 checkpoints ⇄ mmgpt's GPT decoder.

``read_hf_gpt2`` reads a local Hugging Face GPT-2 directory (``config.json`` with
``model_type: "gpt2"`` plus ``model.safetensors``, a sharded safetensors set with its
``model.safetensors.index.json``, or a legacy ``pytorch_model.bin``) as a :class:`GPTConfig`
and a state dict in mmgpt's layout; a :class:`~mmgpt.model.GPT` built from them has the logits
of ``transformers.GPT2LMHeadModel``. ``write_hf_gpt2`` writes the reverse: a directory that
``GPT2LMHeadModel.from_pretrained`` loads. Neither needs ``transformers`` installed.

This module converts configs and tensors only; it builds no model (``GPT.from_pretrained`` and
:func:`mmgpt.pretrained.save_hf_gpt2` do), so it sits below the model in the layers.

The module layout is the same on both sides (``transformer.h.0.attn.c_attn`` …); the one
difference is that GPT-2 stores its projections as ``Conv1D`` with weights of shape
``(in, out)`` where ``nn.Linear`` holds ``(out, in)``, so those four matrices are transposed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.config import CONFIG_NAME, GPTConfig, read_model_config
from mmgpt.interop.hf_files import read_hf_weights, write_hf_checkpoint

if TYPE_CHECKING:
    import torch

# HF activation names → ours. "gelu_new" (GPT-2's own) and "gelu_pytorch_tanh" are the same
# tanh approximation; "gelu"/"gelu_python" are the exact erf form.
_ACTIVATIONS_IN = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
}
# Ours → HF. "gelu_pytorch_tanh" runs the very kernel our MLP uses (F.gelu(approximate="tanh")),
# so an exported model computes bit-for-bit the same activation in transformers.
_ACTIVATIONS_OUT = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}

# Conv1D modules whose weights are stored transposed relative to nn.Linear.
_CONV1D = re.compile(
    r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"
)
# Non-persistent causal-mask buffers that old checkpoints carry; they hold no weights.
_MASK_BUFFERS = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def gpt_config_from_hf(hf: dict[str, Any], source: Path | str = CONFIG_NAME) -> GPTConfig:
    """Map a Hugging Face ``GPT2Config`` dict to a :class:`GPTConfig`.

    Dropout: mmgpt has one rate where GPT-2 has three (embedding, attention, residual); the
    residual rate ``resid_pdrop`` is used for all of them. It only matters when fine-tuning in
    train mode; the loaded model is returned in eval mode, as transformers does.
    """
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{source}: model_type must be 'gpt2', got {hf.get('model_type')!r}")
    for flag in (
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ):
        if hf.get(flag, False):
            raise ValueError(f"{source}: {flag}=true is not supported by mmgpt's GPT decoder")
    if not hf.get("scale_attn_weights", True):
        raise ValueError(
            f"{source}: scale_attn_weights=false (unscaled attention) is not supported "
            "by mmgpt's GPT decoder"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS_IN:
        raise ValueError(
            f"{source}: activation_function {act!r} is not supported; "
            f"expected one of {sorted(_ACTIVATIONS_IN)}"
        )

    def field(name: str, default: Any) -> Any:
        value = hf.get(name)
        return default if value is None else value

    n_embd = field("n_embd", 768)
    n_positions = field("n_positions", field("n_ctx", 1024))
    n_inner = hf.get("n_inner")
    mlp_ratio = 4.0
    if n_inner is not None:
        if not isinstance(n_inner, int) or n_inner <= 0:
            raise ValueError(
                f"{source}: n_inner must be a positive integer or null, got {n_inner!r}"
            )
        mlp_ratio = n_inner / n_embd
        if int(mlp_ratio * n_embd) != n_inner:  # float round-off would change the MLP width
            raise ValueError(
                f"{source}: n_inner={n_inner} cannot be expressed as mlp_ratio * n_embd "
                f"(n_embd={n_embd})"
            )
    try:
        return GPTConfig(
            vocab_size=field("vocab_size", 50257),
            block_size=n_positions,
            n_layer=field("n_layer", 12),
            n_head=field("n_head", 12),
            n_embd=n_embd,
            mlp_ratio=mlp_ratio,
            dropout=float(field("resid_pdrop", 0.1)),
            bias=True,
            pos_encoding="learned",
            norm="layernorm",
            norm_eps=float(field("layer_norm_epsilon", 1e-5)),
            activation=_ACTIVATIONS_IN[act],
            tie_embeddings=bool(field("tie_word_embeddings", True)),
            init_std=float(field("initializer_range", 0.02)),
        )
    except ValueError as exc:
        raise ValueError(f"{source}: invalid GPT-2 config ({exc})") from None


def hf_config_from_gpt(
    config: GPTConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face GPT-2 equivalent to ``config``."""
    problems = []
    if config.pos_encoding != "learned":
        problems.append(f"pos_encoding={config.pos_encoding!r} (GPT-2 needs 'learned')")
    if config.norm != "layernorm":
        problems.append(f"norm={config.norm!r} (GPT-2 needs 'layernorm')")
    if config.activation not in _ACTIVATIONS_OUT:
        problems.append(f"activation={config.activation!r} (GPT-2 needs gelu or gelu_tanh)")
    if config.gated_mlp:
        problems.append("gated_mlp=True (GPT-2's MLP has no gate)")
    if config.kv_heads != config.n_head:
        problems.append(f"n_kv_head={config.n_kv_head} (GPT-2 has one key/value head per head)")
    if config.attn_bias != config.bias:
        problems.append(f"qkv_bias={config.qkv_bias} with bias={config.bias}")
    if problems:
        raise ValueError("cannot export to Hugging Face GPT-2: " + "; ".join(problems))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        "activation_function": _ACTIVATIONS_OUT[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
    }


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def hf_state_to_gpt(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename/transpose a GPT-2 state dict (with or without the ``transformer.`` prefix)."""
    out = {}
    for key, tensor in state.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if _MASK_BUFFERS.match(name):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # an alias of wte.weight that some exports store anyway
        if _CONV1D.match(name) and tensor.dim() == 2:
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def gpt_state_to_hf(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict in GPT-2's layout: Conv1D weights transposed, zero biases where we have none."""
    state = {k: v.detach() for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        out[name] = tensor.t().contiguous() if _CONV1D.match(name) else tensor
    if not config.bias:
        # GPT-2's Linear/LayerNorm always have biases; zeros are exactly "no bias".
        n_embd = config.n_embd
        widths = {
            "attn.c_attn": 3 * n_embd,
            "attn.c_proj": n_embd,
            "mlp.c_fc": config.mlp_hidden,
            "mlp.c_proj": n_embd,
            "ln_1": n_embd,
            "ln_2": n_embd,
        }
        ref = state["transformer.wte.weight"]
        for i in range(config.n_layer):
            for module, width in widths.items():
                out.setdefault(f"transformer.h.{i}.{module}.bias", ref.new_zeros(width))
        out.setdefault("transformer.ln_f.bias", ref.new_zeros(n_embd))
    return out


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def read_hf_gpt2(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Path]:
    """The config and the weights (in mmgpt's layout) of a local Hugging Face GPT-2 directory,
    and the file the weights came from.

    Weights are read from safetensors (single or sharded) or, failing that, from
    ``pytorch_model.bin`` with ``torch.load(weights_only=True)``; nothing is unpickled.
    """
    path = Path(path)
    config = gpt_config_from_hf(read_model_config(path), path / CONFIG_NAME)
    raw, source = read_hf_weights(path)
    return config, hf_state_to_gpt(raw, config), source


def write_hf_gpt2(
    state: dict[str, torch.Tensor],
    config: GPTConfig,
    path: str | Path,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write a GPT's ``state`` and ``config`` as a Hugging Face GPT-2 directory
    (``config.json`` + ``model.safetensors``).

    Needs learned positions, LayerNorm and gelu/gelu_tanh; a model without biases is written
    with zero biases, which computes the same function.
    """
    hf_config = hf_config_from_gpt(
        config,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    write_hf_checkpoint(hf_config, gpt_state_to_hf(state, config), path)


def is_hf_gpt2_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a Hugging Face GPT-2 one."""
    return config.get("model_type") == "gpt2"


__all__ = [
    "gpt_config_from_hf",
    "gpt_state_to_hf",
    "hf_config_from_gpt",
    "hf_state_to_gpt",
    "is_hf_gpt2_config",
    "read_hf_gpt2",
    "write_hf_gpt2",
]
