"""A decode step over a :class:`~mmgpt.static_cache.StaticKVCache`, compiled when asked.

On a CPU, eager batch-1 decoding of a small model spends as long in Python and operator
dispatch as in the weight matmuls themselves. With a static cache one step (``T`` new tokens,
``T`` fixed) has the same shapes and Python values every time, so ``torch.compile`` (inductor,
``fullgraph=True, dynamic=False``) traces it once per (model, batch, ``T``, capacity) and
replays generated code afterwards; on CUDA, ``mode="reduce-overhead"`` also captures it as a
CUDA graph. Compiling is optional: where it is unavailable (no C++ compiler for inductor's CPU
code, or any failure while compiling) the step runs eagerly after one warning, with the same
results.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mmgpt.adapters.quantized import prepare_kernels
from mmgpt.model import GPT
from mmgpt.static_cache import StaticKVCache

# compiled functions are shared by every call of a process: dynamo keeps one graph per
# model and shape, so a second generate call with the same shapes compiles nothing
_COMPILED: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}
_UNAVAILABLE: list[str] = []  # why compiling failed once in this process (then: eager)


# Static caches are allocated in multiples of this many positions, so prompts of different
# lengths share one compiled step instead of compiling per length.
CAPACITY_QUANTUM = 64


def static_capacity(needed: int, block_size: int) -> int:
    """Positions to allocate for ``needed`` (rounded up to CAPACITY_QUANTUM, at most the
    context)."""
    rounded = -(-needed // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
    return max(needed, min(rounded, block_size))


def static_decoder(model: nn.Module, what: str) -> GPT:
    """The :class:`~mmgpt.model.GPT` a static cache runs on: the model, or its ``.gpt``
    (a multimodal model's decoder, which a prefill of embeddings or ids reaches unchanged)."""
    decoder = model if isinstance(model, GPT) else getattr(model, "gpt", None)
    if not isinstance(decoder, GPT):
        raise ValueError(
            f"{what}: needs an mmgpt GPT (or a model whose .gpt is one), got {type(model).__name__}"
        )
    return decoder


def decode_step(
    model: nn.Module,
    input_ids: Tensor,  # (B, T)
    position_ids: Tensor,  # (B, T)
    cache: StaticKVCache,
    cache_position: Tensor,  # (T,)
) -> tuple[Tensor, Tensor]:
    """One forward over a static cache: ``(logits (B, T, V), hidden states (B, T, C))``."""
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        past_key_values=cache,
        cache_position=cache_position,
    )
    return out.logits, out.hidden_states


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs where there is CUDA (they remove the launch overhead as well); inductor's
    default mode on CPU, where CUDA graphs do not exist."""
    return "reduce-overhead" if device.type == "cuda" else None


def missing_compiler() -> str | None:
    """Why inductor cannot build CPU code here, or None (it needs a C++ compiler)."""
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if any(name and shutil.which(name) for name in names):
        return None
    return "torch.compile needs a C++ compiler for CPU code and none was found (CXX, c++, g++, clang++)"


def _fall_back(reason: str) -> None:
    if not _UNAVAILABLE:
        _UNAVAILABLE.append(reason)
        warnings.warn(
            f"GenerationConfig.compile: {reason}; decoding with the static cache without "
            "compiling (same tokens, slower)",
            RuntimeWarning,
            stacklevel=3,
        )


class DecodeStep:
    """``step(model, input_ids, position_ids, cache, cache_position) -> (logits, hidden)``,
    compiled when ``compile`` is true and compiling works, else eager."""

    def __init__(self, device: torch.device, compile: bool) -> None:
        self.fn: Callable[..., tuple[Tensor, Tensor]] = decode_step
        self.static_addresses = False  # CUDA graphs: cache buffers and outputs at fixed places
        self._kernels_ready: set[int] = set()  # ids of the models prepare_kernels has seen
        if not compile or _UNAVAILABLE:
            return
        if device.type == "cpu":
            missing = missing_compiler()
            if missing is not None:
                _fall_back(missing)
                return
        mode = compile_mode(device)
        key = str(mode)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
        self.fn = _COMPILED[key]
        self.static_addresses = mode == "reduce-overhead"

    @property
    def compiled(self) -> bool:
        return self.fn is not decode_step

    def prepare(self, cache: StaticKVCache) -> None:
        """CUDA graphs replay fixed addresses: declare the cache's buffers static so that
        their in-place writes do not stop the capture."""
        if self.compiled and self.static_addresses:
            for buf in cache.buffers():
                torch._dynamo.mark_static_address(buf)

    def __call__(
        self,
        model: nn.Module,
        input_ids: Tensor,
        position_ids: Tensor,
        cache: StaticKVCache,
        cache_position: Tensor,
    ) -> tuple[Tensor, Tensor]:
        if self.compiled and not _UNAVAILABLE:
            if id(model) not in self._kernels_ready:  # once per generate call and model
                prepare_kernels(model)
                self._kernels_ready.add(id(model))
            try:
                logits, hidden = self.fn(model, input_ids, position_ids, cache, cache_position)
            except Exception as error:  # any compiler failure: the eager step is the same
                # The step only writes the cache slots of cache_position, so running it again
                # eagerly gives the same state whether or not the compiled code ran.
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _fall_back(f"torch.compile failed ({type(error).__name__}: {first_line[:200]})")
            else:
                # CUDA graphs reuse their output buffers at the next replay: keep a copy
                if self.static_addresses:
                    logits, hidden = logits.clone(), hidden.clone()
                return logits, hidden
        return decode_step(model, input_ids, position_ids, cache, cache_position)


__all__ = [
    "CAPACITY_QUANTUM",
    "DecodeStep",
    "compile_mode",
    "decode_step",
    "static_capacity",
    "static_decoder",
]
