"""The GPT decoder, readable top to bottom: norms → positions → attention → MLP → block → GPT.

The decoder knows nothing about modalities: it maps token ids *or* ready-made embeddings
(multimodal fusion feeds those) to hidden states and logits, with an optional KV cache.
Module names follow GPT-2 (``transformer.h.0.attn.c_attn`` …) so Hugging Face checkpoints and
adapter target patterns map one to one.

One layout serves GPT-2 and the Llama family (Llama, Mistral, Qwen2), so an adapter that
targets ``c_attn``/``c_fc``/``c_proj`` covers every projection of either:

- ``attn.c_attn`` computes q, k and v in one matmul, ``(n_head + 2 * n_kv_head) * head_dim``
  outputs (grouped-query attention when ``n_kv_head < n_head``; the KV cache holds only the
  ``n_kv_head`` heads); ``attn.c_proj`` is the output projection (Llama's ``o_proj``).
- ``mlp.c_fc`` is the up projection; with ``gated_mlp`` it computes gate and up in one matmul
  (gate first, then up: ``2 * mlp_hidden`` outputs) and the MLP is
  ``c_proj(act(gate) * up)`` (SwiGLU with ``activation="silu"``); ``mlp.c_proj`` is the down
  projection.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgpt.adapters.directory import CONFIG_KEY as ADAPTERS_KEY
from mmgpt.adapters.directory import load_adapters
from mmgpt.config import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    GPTConfig,
    gpt_config,
    read_model_config,
)
from mmgpt.interop import HF_MODEL_TYPES, is_hf_config, read_hf
from mmgpt.static_cache import StaticKVCache
from mmgpt.weights import (
    check_weights_file,
    load_model_files,
    load_model_state,
    model_state_dict,
    save_model_files,
)

if TYPE_CHECKING:
    from mmgpt.interfaces import Tokenizer

ARCHITECTURE = "gpt"  # config.json's "architecture" of a text-only GPT directory

# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------


def make_dropout(p: float) -> nn.Module:
    # nn.Identity when off: a no-op Dropout still costs a call per layer per decode step.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# --------------------------------------------------------------------------------------
# Positional encodings
# --------------------------------------------------------------------------------------


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (T, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)[None, :]  # (1, C/2)
    angle = pos / torch.pow(10000.0, two_i / dim)  # (T, C/2)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.float()


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """RoPE's inverse frequencies theta^(-2i/d), (D/2,); ``scaling`` applies transformers'
    "linear" or "llama3" formula, in the same float32 operations."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor  # positions divided by factor
    # llama3: wavelengths longer than the original context / low_freq_factor are stretched by
    # factor, those shorter than context / high_freq_factor are kept, and in between blended.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return torch.where(medium, blended, stretched)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE), rotate-half convention, applied to q and k."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------


class KVCache:
    """Per-layer key/value buffers of shape (B, H_kv, capacity, D), written in place.

    Preallocating avoids a concatenation per generated token; the buffers grow (doubling)
    if a caller writes past the capacity it asked for. Each forward returns the filled part,
    so shapes grow by one position per step; :class:`mmgpt.static_cache.StaticKVCache` keeps
    them fixed for compiled decoding.
    """

    def __init__(self, n_layer: int, capacity: int = 0) -> None:
        self.n_layer = n_layer
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.length = 0  # positions already stored (same for every layer)

    @classmethod
    def for_model(cls, config: GPTConfig, capacity: int | None = None) -> KVCache:
        return cls(config.n_layer, capacity or config.block_size)

    def update(
        self, layer: int, k: Tensor, v: Tensor, cache_position: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, D) after the cached positions; return all keys and values.
        (``cache_position`` is for the static cache's signature: this one appends.)"""
        start, end = self.length, self.length + k.size(2)
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.size(2) < end or buf_k.size(0) != k.size(0):
            cap = max(end, self.capacity, 2 * (buf_k.size(2) if buf_k is not None else 0))
            new_k = k.new_empty(k.size(0), k.size(1), cap, k.size(3))
            new_v = v.new_empty(new_k.shape)
            if buf_k is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            buf_k, buf_v = new_k, new_v
            self.keys[layer], self.values[layer] = buf_k, buf_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on (e.g. to retry from a prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length {length} outside [0, {self.length}]")
        self.length = length

    def select(self, index: Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. after some sequences finished)."""
        for i in range(self.n_layer):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(0, index)
                self.values[i] = self.values[i].index_select(0, index)


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.kv_dim = self.n_kv_head * self.head_dim
        self.dropout = config.dropout
        # q, k and v in one matmul; n_kv_head < n_head: each k/v head serves a group of q heads
        self.c_attn = nn.Linear(
            config.n_embd, config.n_embd + 2 * self.kv_dim, bias=config.attn_bias
        )
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = make_dropout(config.dropout)

    def forward(
        self,
        x: Tensor,  # (B, T, C)
        mask: Tensor | None,  # bool (B, 1, T, S) or None
        is_causal: bool,
        rotary: tuple[Tensor, Tensor] | None,
        cache: KVCache | StaticKVCache | None,
        layer: int,
        output_attentions: bool = False,
        cache_position: Tensor | None = None,  # (T,) slots of a StaticKVCache
    ) -> tuple[Tensor, Tensor | None]:  # (B, T, C), attention weights (B, H, T, S) or None
        B, T, _ = x.shape  # (B, T, C)
        # this module's heads (all of them, or a tensor-parallel rank's share: see
        # mmgpt.tensor_parallel), which is why the sizes come from n_head and not from C
        q_dim = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split((q_dim, self.kv_dim, self.kv_dim), dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_position)  # (B, H_kv, S, D), S = cached + T
            # (static cache: S = capacity, the slots not written yet masked out)
        if output_attentions:
            y, weights = self._explicit_attention(q, k, v, mask, is_causal)
        else:
            # softmax(q kᵀ / sqrt(d_k)) v with the causal (and padding) mask; with enable_gqa,
            # query head h reads k/v head h // (H / H_kv), as Llama's repeat_kv arranges them
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, H, T, D)
            weights = None
        y = y.transpose(1, 2).reshape(B, T, q_dim)  # (B, T, C); per TP rank (B, T, C / tp)
        return self.resid_dropout(self.c_proj(y)), weights

    def _explicit_attention(
        self,
        q: Tensor,  # (B, H, T, D)
        k: Tensor,  # (B, H_kv, S, D)
        v: Tensor,  # (B, H_kv, S, D)
        mask: Tensor | None,  # bool (B, 1, T, S) or None
        is_causal: bool,
    ) -> tuple[Tensor, Tensor]:
        """The same attention as the SDPA call, written out so its weights can be returned:
        ``(y (B, H, T, D), weights (B, H, T, S))``; used only when weights are asked for."""
        T, S = q.size(-2), k.size(-2)
        group = self.n_head // self.n_kv_head
        k = k.repeat_interleave(group, dim=1)  # (B, H, S, D): q head h reads k/v head h // group
        v = v.repeat_interleave(group, dim=1)  # (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
        if is_causal:  # SDPA's is_causal: query i sees keys 0..i (top-left aligned)
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # (B, H, T, S)
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (B, H, T, S), rows sum to 1
        dropped = F.dropout(weights, self.dropout, training=self.training)  # as SDPA's dropout_p
        return dropped @ v, weights  # (B, H, T, D), (B, H, T, S)


# --------------------------------------------------------------------------------------
# MLP and block
# --------------------------------------------------------------------------------------


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
}


class MLP(nn.Module):
    """c_proj(act(c_fc(x))); gated: c_fc yields [gate, up] and the MLP is c_proj(act(gate) * up)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gated = config.gated_mlp
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.act = ACTIVATION_FNS[config.activation]
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        h = self.c_fc(x)  # (B, T, H), gated: (B, T, 2H)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        rotary: tuple[Tensor, Tensor] | None,
        cache: KVCache | StaticKVCache | None,
        layer: int,
        output_attentions: bool = False,
        cache_position: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:  # (B, T, C), attention weights (B, H, T, S) or None
        a, weights = self.attn(
            self.ln_1(x), mask, is_causal, rotary, cache, layer, output_attentions, cache_position
        )
        x = x + a
        return x + self.mlp(self.ln_2(x)), weights


# --------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------


@dataclass
class GPTOutput:
    logits: Tensor | None  # (B, T_kept, V)
    hidden_states: Tensor  # (B, T, C), after the final norm
    past_key_values: KVCache | StaticKVCache | None = None
    # output_attentions=True: one (B, H, T, S) tensor per layer, S = cached + T; else None
    attentions: tuple[Tensor, ...] | None = None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=make_dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=make_norm(config),
            )
        )
        if config.pos_encoding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_encoding == "sinusoidal":
            table = sinusoidal_table(config.block_size, config.n_embd)
            self.register_buffer("sinusoidal", table, persistent=False)
        self.rotary = (
            Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
            if config.pos_encoding == "rotary"
            else None
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) at init
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)

    # -- helpers used by fusion, generation and checkpoints ----------------------------
    @property
    def tied_weight_keys(self) -> list[str]:
        """State-dict keys that alias another tensor and are not stored separately."""
        return ["lm_head.weight"] if self.config.tie_embeddings else []

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow the vocabulary to ``new_vocab_size`` (e.g. for added special tokens): the
        embedding and an untied head get new rows, each the mean of the existing rows (as
        LLaVA does: new tokens start as an average token rather than as noise that dominates
        the softmax); ``config.vocab_size`` follows and a tied head stays tied."""
        old = self.config.vocab_size
        if isinstance(new_vocab_size, bool) or not isinstance(new_vocab_size, int):
            raise TypeError(f"resize_token_embeddings: expected an int, got {new_vocab_size!r}")
        if new_vocab_size < old:
            raise ValueError(
                f"resize_token_embeddings: cannot shrink the vocabulary from {old} to "
                f"{new_vocab_size}; ids {new_vocab_size}..{old - 1} would lose their embeddings"
            )
        if new_vocab_size == old:
            return
        wte = self.transformer.wte
        new_wte = nn.Embedding(
            new_vocab_size, wte.embedding_dim, device=wte.weight.device, dtype=wte.weight.dtype
        )
        _copy_and_mean_fill(new_wte.weight, wte.weight)
        self.transformer.wte = new_wte
        head = self.lm_head
        new_head = nn.Linear(
            head.in_features,
            new_vocab_size,
            bias=False,
            device=head.weight.device,
            dtype=head.weight.dtype,
        )
        if self.config.tie_embeddings:
            new_head.weight = new_wte.weight
        else:
            _copy_and_mean_fill(new_head.weight, head.weight)
        self.lm_head = new_head
        self.config = dataclasses.replace(self.config, vocab_size=new_vocab_size)

    # -- forward ---------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,  # (B, T) long
        inputs_embeds: Tensor | None = None,  # (B, T, C)
        attention_mask: Tensor | None = None,  # (B, S) 1 = token, 0 = padding; S = cached + T
        position_ids: Tensor | None = None,  # (B, T)
        past_key_values: KVCache | StaticKVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,  # 0: logits for every position; n: only the last n
        return_logits: bool = True,
        output_attentions: bool = False,  # also return each layer's weights (explicit path)
        cache_position: Tensor | None = None,  # (T,) slots written in a StaticKVCache
    ) -> GPTOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("GPT.forward: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"GPT.forward: input_ids must be (batch, time), got shape {tuple(input_ids.shape)}"
                )
            inputs_embeds = self.transformer.wte(input_ids)  # (B, T, C)
        elif inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != self.config.n_embd:
            raise ValueError(
                f"GPT.forward: inputs_embeds must be (batch, time, {self.config.n_embd}), "
                f"got shape {tuple(inputs_embeds.shape)}"
            )
        B, T, _ = inputs_embeds.shape
        cache = past_key_values
        if isinstance(cache, StaticKVCache):
            # Fixed shapes and no Python state that changes per step (what compiling needs):
            # slots, mask and positions all come from tensors.
            if cache_position is None:
                raise ValueError(
                    "GPT.forward: a StaticKVCache needs cache_position, the (T,) slots to write"
                )
            if attention_mask is not None:
                raise ValueError(
                    "GPT.forward: with a StaticKVCache, record the prompt's padding with "
                    "cache.set_padding(attention_mask) instead of passing attention_mask"
                )
            if position_ids is None:
                position_ids = cache.position_ids(cache_position)  # (B, T)
            mask, is_causal = cache.attention_mask(cache_position), False  # (B, 1, T, capacity)
        else:
            if cache is None and use_cache:
                cache = KVCache.for_model(self.config, capacity=T)
            past = cache.length if cache is not None else 0
            total = past + T
            if total > self.config.block_size:
                raise ValueError(
                    f"sequence of {total} positions exceeds the model's context "
                    f"(block_size={self.config.block_size})"
                )
            if attention_mask is not None:
                if attention_mask.shape != (B, total):
                    raise ValueError(
                        f"GPT.forward: attention_mask must have shape ({B}, {total}) "
                        f"(cached + new positions), got {tuple(attention_mask.shape)}"
                    )
                attention_mask = attention_mask.bool()
                if bool(attention_mask.all()):
                    attention_mask = None  # no padding: take the fast causal path

            if position_ids is None:
                if attention_mask is not None:
                    # left padding: count real tokens so padded and unpadded rows agree
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
                else:
                    position_ids = torch.arange(past, total, device=inputs_embeds.device)[None]
                    position_ids = position_ids.expand(B, T)
            mask, is_causal = self._attention_mask(attention_mask, B, T, past, inputs_embeds.device)

        x = inputs_embeds
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(position_ids)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.sinusoidal[position_ids].to(x.dtype)
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        x = self.transformer.drop(x)  # (B, T, C)

        attentions: list[Tensor] = []
        for i, block in enumerate(self.transformer.h):
            x, weights = block(
                x, mask, is_causal, rotary, cache, i, output_attentions, cache_position
            )
            if weights is not None:
                attentions.append(weights)  # (B, H, T, S)
        if isinstance(cache, KVCache):
            cache.advance(T)  # (a static cache's fill is counted by its caller)
        x = self.transformer.ln_f(x)  # (B, T, C)

        logits = None
        if return_logits:
            kept = x[:, -logits_to_keep:] if logits_to_keep else x
            logits = self.lm_head(kept)  # (B, T_kept, V)
        return GPTOutput(
            logits=logits,
            hidden_states=x,
            past_key_values=cache,
            attentions=tuple(attentions) if output_attentions else None,
        )

    @staticmethod
    def _attention_mask(
        key_mask: Tensor | None, B: int, T: int, past: int, device: torch.device
    ) -> tuple[Tensor | None, bool]:
        """Return (mask, is_causal) for SDPA; prefer the mask-free fast paths."""
        if key_mask is None:
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False  # one new token sees every cached position
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]  # (B, 1, T, S)
            # A padding query would otherwise see no key at all (NaN); let it see itself.
            mask = mask | (k_pos == q_pos)[None, None]
        return mask.expand(B, 1, T, S), False

    # -- checkpoints -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, **overrides) -> GPT:
        return cls(gpt_config(preset, **overrides))

    @staticmethod
    def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
        """The shape of every stored tensor of a GPT with ``config``, computed on the meta
        device (no memory): what a weights file must hold before a model is allocated."""
        with torch.device("meta"):
            model = GPT(config)
        return {k: tuple(v.shape) for k, v in model_state_dict(model).items()}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        map_location: str | torch.device = "cpu",
        adapter: str | list[str] | None = "auto",
    ) -> GPT:
        """Load an mmgpt GPT directory or a Hugging Face directory (model_type gpt2, llama,
        mistral or qwen2: :mod:`mmgpt.interop`), in eval mode.

        ``adapter``: "auto" loads the adapters recorded in the directory's config.json and
        activates the recorded one; "all", a name, a list of names, or None (base only).
        """
        path = Path(path)
        config = read_model_config(path)
        if is_hf_config(config):
            gpt, state, source = read_hf(path)
            # before the model is allocated: a config that does not fit the weights is named
            _check_shapes(cls.parameter_shapes(gpt), state, source, path / CONFIG_NAME)
            model = cls(gpt)
            load_model_state(model, state, source)
            # adapters saved beside a Hugging Face directory (adapters/<name>/): by request,
            # or the ones its config records (none: transformers writes no such record)
            if adapter is not None and (adapter != "auto" or config.get(ADAPTERS_KEY)):
                load_adapters(model, path, adapter, record=config.get(ADAPTERS_KEY))
            return model.to(map_location).eval()
        if "gpt" not in config:
            raise ValueError(
                f"{path / CONFIG_NAME}: expected an mmgpt model (a 'gpt' section) or a Hugging "
                f"Face config (model_type one of {', '.join(HF_MODEL_TYPES)}); "
                f"found keys {sorted(config)}"
            )
        gpt = GPTConfig.from_dict(config["gpt"])
        check_weights_file(cls.parameter_shapes(gpt), path / WEIGHTS_NAME, path / CONFIG_NAME)
        return load_model_files(cls(gpt), path, config, adapter=adapter, map_location=map_location)

    def config_dict(self, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
        """The content of ``config.json``; with ``tokenizer``, its section too (so the
        directory names the tokenizer it was trained with)."""
        config: dict[str, Any] = {
            "architecture": ARCHITECTURE,
            "format_version": FORMAT_VERSION,
            "gpt": self.config.to_dict(),
        }
        if tokenizer is not None:
            config["tokenizer"] = tokenizer.config_dict()
        return config

    def save_pretrained(self, path: str | Path, *, tokenizer: Tokenizer | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (+ ``adapters/``) into ``path``;
        with ``tokenizer``, its files and config section too."""
        save_model_files(self, path, self.config_dict(tokenizer))
        if tokenizer is not None:
            tokenizer.save(Path(path))


def _copy_and_mean_fill(new: Tensor, old: Tensor) -> None:
    """new[:n] = old; the rows after, the mean of old's rows."""
    with torch.no_grad():
        new[: old.size(0)] = old
        new[old.size(0) :] = old.mean(dim=0, dtype=torch.float32).to(old.dtype)
    new.requires_grad_(old.requires_grad)


def _check_shapes(
    expected: dict[str, tuple[int, ...]], state: dict[str, Tensor], source: Path, config_path: Path
) -> None:
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != shape:
            raise ValueError(
                f"{config_path}: describes a model whose {name!r} has shape {shape}, but "
                f"{source} stores {tuple(state[name].shape)}"
            )
