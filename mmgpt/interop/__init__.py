"""Hugging Face checkpoints ⇄ mmgpt's GPT decoder: configs and state dicts only (no model).

One entry per direction, dispatching on the family:

- :func:`read_hf` reads a local Hugging Face directory by its ``config.json``'s
  ``model_type`` (one of :data:`HF_MODEL_TYPES`);
- :func:`write_hf` writes one, the family picked from the model's features by
  :func:`hf_family` unless named.

The families live in :mod:`mmgpt.interop.gpt2` and :mod:`mmgpt.interop.llama` (Llama, Mistral,
Qwen2); :mod:`mmgpt.interop.hf_files` reads and writes their files. LLaVA directories
(``model_type: "llava"``, a vision-language model) are :mod:`mmgpt.interop.llava`'s: they load
as multimodal models, not as a GPT.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.config import CONFIG_NAME, GPTConfig, read_model_config
from mmgpt.interop.gpt2 import gpt_config_from_hf as gpt2_config_from_hf
from mmgpt.interop.gpt2 import read_hf_gpt2, write_hf_gpt2
from mmgpt.interop.llama import LLAMA_MODEL_TYPES, read_hf_llama, write_hf_llama
from mmgpt.interop.llama import gpt_config_from_hf as llama_config_from_hf
from mmgpt.interop.llava import LLAVA_MODEL_TYPE, is_llava_config

if TYPE_CHECKING:
    import torch

HF_MODEL_TYPES = ("gpt2", *LLAMA_MODEL_TYPES)


def is_hf_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a Hugging Face one (it has a ``model_type``) rather than
    mmgpt's; :func:`hf_model_type` says whether mmgpt reads that type."""
    return "model_type" in config and "gpt" not in config


def hf_model_type(config: dict[str, Any], source: str | Path = CONFIG_NAME) -> str:
    """The ``model_type`` of a Hugging Face ``config.json``; an unsupported one is an error
    naming it, ``source`` and the supported ones."""
    model_type = config.get("model_type")
    if model_type == LLAVA_MODEL_TYPE:
        raise ValueError(
            f"{source}: a LLaVA vision-language model, not a language model; load it with "
            "mmgpt.pretrained.load_model (or MultimodalGPT.from_pretrained)"
        )
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{source}: Hugging Face model_type {model_type!r} is not supported; mmgpt reads "
            f"{', '.join(HF_MODEL_TYPES)}"
        )
    return model_type


def hf_gpt_config(config: dict[str, Any], source: str | Path = CONFIG_NAME) -> GPTConfig:
    """The :class:`GPTConfig` a Hugging Face ``config.json`` describes, without its weights
    (e.g. to plan memory before loading anything)."""
    if hf_model_type(config, source) == "gpt2":
        return gpt2_config_from_hf(config, source)
    return llama_config_from_hf(config, source)


def read_hf(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Path]:
    """The config and the weights (in mmgpt's layout) of a local Hugging Face directory of a
    supported ``model_type``, and the file the weights came from."""
    path = Path(path)
    model_type = hf_model_type(read_model_config(path), path / CONFIG_NAME)
    return read_hf_gpt2(path) if model_type == "gpt2" else read_hf_llama(path)


def hf_family(config: GPTConfig) -> str:
    """The Hugging Face family that computes what ``config`` does: ``gpt2`` (learned positions,
    LayerNorm, gelu), ``llama`` (rotary, RMSNorm, gated silu) or ``qwen2`` (the same with q/k/v
    biases only); anything else is a ``ValueError`` naming the features."""
    mlp = "gated" if config.gated_mlp else "plain"
    features = (config.pos_encoding, config.norm, mlp)
    if features == ("learned", "layernorm", "plain") and config.activation.startswith("gelu"):
        return "gpt2"
    if features == ("rotary", "rmsnorm", "gated") and config.activation == "silu":
        return "qwen2" if config.attn_bias and not config.bias else "llama"
    raise ValueError(
        f"no Hugging Face family computes pos_encoding={config.pos_encoding!r}, "
        f"norm={config.norm!r}, activation={config.activation!r}, "
        f"gated_mlp={config.gated_mlp}; transformers has gpt2 (learned, layernorm, gelu, "
        "not gated) and llama/mistral/qwen2 (rotary, rmsnorm, silu, gated)"
    )


def write_hf(
    state: dict[str, torch.Tensor],
    config: GPTConfig,
    path: str | Path,
    *,
    family: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> str:
    """Write a GPT's ``state`` and ``config`` as a Hugging Face directory of ``family``
    (default: :func:`hf_family`); return the family written."""
    family = hf_family(config) if family is None else family
    if family not in HF_MODEL_TYPES:
        raise ValueError(f"family must be one of {list(HF_MODEL_TYPES)}, got {family!r}")
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if family == "gpt2":
        write_hf_gpt2(state, config, path, **ids)
    else:
        write_hf_llama(state, config, path, family=family, **ids)
    return family


__all__ = [
    "HF_MODEL_TYPES",
    "LLAVA_MODEL_TYPE",
    "hf_family",
    "hf_model_type",
    "is_hf_config",
    "is_llava_config",
    "read_hf",
    "write_hf",
]
