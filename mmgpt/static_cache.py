"""A static-shape KV cache: fixed buffers written in place at explicit cache positions.

:class:`mmgpt.model.KVCache` returns the first ``length`` positions of its buffers, so the
shapes of every decode step differ (``S`` grows by one) and ``length`` is a Python int that
changes each step. A compiler that specialises on shapes and values (``torch.compile`` with
``dynamic=False``, CUDA graphs) would then build a new program per step. Here the buffers keep
one shape, ``(B, H_kv, capacity, D)``; a forward writes its keys and values at the positions a
tensor ``cache_position`` names (``index_copy_``), and attention reads the whole capacity under
a mask that hides the slots not written yet (and the prompt's left padding). One decode step
then has the same shapes and the same Python values every time: it compiles once per
(batch, capacity). The caller keeps track of how far the cache is filled.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """Per-layer key/value buffers ``(B, H_kv, capacity, D)`` and a key mask ``(B, capacity)``.

    ``GPT.forward(..., past_key_values=cache, cache_position=pos)`` writes the new positions
    at the slots ``pos`` (``(T,)`` long, the same for every row) and lets position ``pos[t]``
    attend to the written slots ``<= pos[t]`` that are not padding. Slots after the current
    position may hold stale entries (e.g. rejected draft tokens): the mask hides them, so
    rewinding is just writing from an earlier position again.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], key_mask: Tensor) -> None:
        if len(keys) != len(values) or not keys:
            raise ValueError("StaticKVCache: expected one key and one value buffer per layer")
        self.keys = keys
        self.values = values
        self.key_mask = key_mask  # (B, capacity) bool, False at left padding
        self.slots = torch.arange(key_mask.size(1), device=key_mask.device)  # (capacity,)

    @classmethod
    def for_model(
        cls,
        config,  # GPTConfig (not imported: mmgpt.model imports this module)
        batch_size: int,
        capacity: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> StaticKVCache:
        if not 1 <= capacity <= config.block_size:
            raise ValueError(
                f"StaticKVCache: capacity {capacity} must be in [1, block_size={config.block_size}]"
            )
        shape = (batch_size, config.kv_heads, capacity, config.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        key_mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        return cls(keys, values, key_mask)

    @property
    def capacity(self) -> int:
        return self.key_mask.size(1)

    @property
    def batch_size(self) -> int:
        return self.key_mask.size(0)

    def buffers(self) -> list[Tensor]:
        """Every tensor the cache writes or reads (e.g. to mark them as static addresses)."""
        return [*self.keys, *self.values, self.key_mask, self.slots]

    def set_padding(self, attention_mask: Tensor) -> None:
        """Record a left-padded prompt's mask ``(B, T)`` (1 = token, 0 = padding) for slots
        ``0..T-1``: padding slots are never attended to, and positions count real tokens."""
        B, T = attention_mask.shape
        if self.batch_size != B or self.capacity < T:
            raise ValueError(
                f"StaticKVCache.set_padding: attention_mask of shape {tuple(attention_mask.shape)} "
                f"does not fit a cache of batch {self.batch_size} and capacity {self.capacity}"
            )
        self.key_mask.fill_(True)
        self.key_mask[:, :T] = attention_mask.bool()

    def update(
        self, layer: int, k: Tensor, v: Tensor, cache_position: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Write k, v ``(B, H_kv, T, D)`` at slots ``cache_position`` ``(T,)``; return the
        whole buffers ``(B, H_kv, capacity, D)``."""
        if cache_position is None:
            raise ValueError(
                "StaticKVCache: the forward needs cache_position, the (T,) slots it writes"
            )
        self.keys[layer].index_copy_(2, cache_position, k)
        self.values[layer].index_copy_(2, cache_position, v)
        return self.keys[layer], self.values[layer]

    def attention_mask(self, cache_position: Tensor) -> Tensor:
        """Boolean ``(B, 1, T, capacity)``: query ``t`` (at slot ``cache_position[t]``) sees the
        written, non-padding slots up to its own."""
        q = cache_position[:, None]  # (T, 1)
        causal = self.slots[None, :] <= q  # (T, capacity)
        mask = causal[None, None] & self.key_mask[:, None, None, :]  # (B, 1, T, capacity)
        # a padding query would otherwise see no key at all (NaN); let it see itself
        return mask | (self.slots[None, :] == q)[None, None]

    def position_ids(self, cache_position: Tensor) -> Tensor:
        """``(B, T)`` positions of the tokens at slots ``cache_position``: real tokens before
        them, so a left-padded row computes what it would alone."""
        counts = self.key_mask.long().cumsum(-1) - 1  # (B, capacity)
        return counts.index_select(1, cache_position).clamp(min=0)


__all__ = ["StaticKVCache"]
