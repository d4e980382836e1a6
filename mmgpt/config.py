"""Configuration dataclasses, presets and the names of a model directory's files.

Data only: no torch import here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from mmgpt.files import load_json, save_json

# A model directory: config.json (the full config, plugin names included) + model.safetensors
# (+ tokenizer files, adapters/<name>/). FORMAT_VERSION is written into config.json.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

POS_ENCODINGS = ("learned", "sinusoidal", "rotary", "none")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
# rope_scaling["rope_type"] → the keys it needs (transformers' names and formulas).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

T = TypeVar("T")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_error(cls_name: str, field_name: str, message: str) -> ValueError:
    return ValueError(f"{cls_name}.{field_name}: {message}")


@dataclass
class GPTConfig:
    """The decoder's shape and options (GPT-2 naming: n_layer, n_head, n_embd).

    The defaults are GPT-2's; Llama-family models set ``pos_encoding="rotary"``,
    ``norm="rmsnorm"``, ``activation="silu"``, ``gated_mlp=True``, ``bias=False`` and usually
    ``n_kv_head``, ``intermediate_size`` and ``tie_embeddings=False`` (Qwen2: ``qkv_bias=True``).
    """

    vocab_size: int = 50304
    block_size: int = 1024  # maximum context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "learned"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    n_kv_head: int | None = None  # grouped-query attention: key/value heads (None: n_head)
    intermediate_size: int | None = None  # MLP width, overriding mlp_ratio * n_embd
    gated_mlp: bool = False  # c_proj(act(gate) * up), gate and up fused in c_fc (SwiGLU)
    qkv_bias: bool | None = None  # bias of c_attn (None: follows bias; Qwen2: q/k/v only)
    # RoPE frequency scaling: {"rope_type": "linear", "factor": f} or "llama3" (Llama 3.1's
    # factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _config_error(name, f, f"expected a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise _config_error(
                name, "n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.pos_encoding not in POS_ENCODINGS:
            raise _config_error(
                name, "pos_encoding", f"expected one of {POS_ENCODINGS}, got {self.pos_encoding!r}"
            )
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise _config_error(name, "n_embd", "rotary needs an even head dimension")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise _config_error(name, "n_embd", "sinusoidal encoding needs an even n_embd")
        if self.norm not in NORMS:
            raise _config_error(name, "norm", f"expected one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise _config_error(
                name, "activation", f"expected one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise _config_error(name, "dropout", f"expected 0 <= dropout < 1, got {self.dropout!r}")
        # positive and finite (nan and inf pass a plain `> 0`, then fail far from here)
        for f in ("mlp_ratio", "norm_eps", "rope_theta", "init_std"):
            value = getattr(self, f)
            if not _is_real(value) or not 0 < value < math.inf:
                raise _config_error(name, f, f"expected a finite number > 0, got {value!r}")
        for f in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, f), bool):
                raise _config_error(name, f, f"expected true or false, got {getattr(self, f)!r}")
        for f in ("n_kv_head", "intermediate_size"):
            value = getattr(self, f)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise _config_error(name, f, f"expected a positive integer or None, got {value!r}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise _config_error(
                name, "n_kv_head", f"{self.n_kv_head} does not divide n_head={self.n_head}"
            )
        if not isinstance(self.gated_mlp, bool):
            raise _config_error(name, "gated_mlp", f"expected a bool, got {self.gated_mlp!r}")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            raise _config_error(name, "qkv_bias", f"expected a bool or None, got {self.qkv_bias!r}")
        if self.rope_scaling is not None:
            self._check_rope_scaling(name)

    def _check_rope_scaling(self, name: str) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, dict):
            raise _config_error(name, "rope_scaling", f"expected a dict or None, got {scaling!r}")
        self.rope_scaling = scaling = dict(scaling)  # the caller's dict may change later
        if self.pos_encoding != "rotary":
            raise _config_error(
                name, "rope_scaling", f"needs pos_encoding='rotary', got {self.pos_encoding!r}"
            )
        rope_type = scaling.get("rope_type")
        if rope_type not in ROPE_SCALING_KEYS:
            raise _config_error(
                name,
                "rope_scaling",
                f"rope_type {rope_type!r} is not supported; expected one of "
                f"{sorted(ROPE_SCALING_KEYS)}",
            )
        needed = ROPE_SCALING_KEYS[rope_type]
        missing = sorted(set(needed) - set(scaling))
        unknown = sorted(set(scaling) - set(needed) - {"rope_type"})
        if missing or unknown:
            raise _config_error(
                name,
                "rope_scaling",
                f"rope_type {rope_type!r} takes exactly {list(needed)}; "
                f"missing {missing}, unknown {unknown}",
            )
        for key in needed:
            value = scaling[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise _config_error(
                    name, "rope_scaling", f"{key} must be a positive number, got {value!r}"
                )
        if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise _config_error(
                name, "rope_scaling", "llama3 needs high_freq_factor > low_freq_factor"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` (plain multi-head attention)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def attn_bias(self) -> bool:
        """Whether c_attn (q, k, v) has a bias."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def mlp_hidden(self) -> int:
        """The MLP's inner width (of each of gate and up when ``gated_mlp``)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return int(self.mlp_ratio * self.n_embd)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        return from_dict(cls, data)


# Sizes follow GPT-2's family; the small ones train on a laptop CPU.
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt-nano": dict(n_layer=3, n_head=3, n_embd=48, block_size=256, vocab_size=512),
    "gpt-micro": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=2048),
    "gpt-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
}


def gpt_config(preset: str, **overrides: Any) -> GPTConfig:
    """A GPTConfig from a preset name with field overrides."""
    if preset not in GPT_PRESETS:
        close = difflib.get_close_matches(preset, GPT_PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown GPT preset {preset!r}; presets: {', '.join(GPT_PRESETS)}{hint}")
    return from_dict(GPTConfig, {**GPT_PRESETS[preset], **overrides})


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, rejecting unknown keys with a clear message."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(known)}"
        )
    return cls(**data)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of the model directory ``path`` (an error names a missing dir)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory")
    config = load_json(path / CONFIG_NAME)
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME}: expected a JSON object")
    return config


__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "GPT_PRESETS",
    "WEIGHTS_NAME",
    "GPTConfig",
    "from_dict",
    "gpt_config",
    "load_json",
    "read_model_config",
    "save_json",
]
