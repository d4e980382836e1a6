"""Speculative decoding: a small draft model proposes tokens, the target checks them at once.

Decoding a small batch is bound by reading the weights: a forward over ``k + 1`` positions
costs about as much as over one. Each round the draft model proposes ``k`` tokens one by one
(cheap: it is small), and the target model reads the newest token and the ``k`` proposals in
ONE forward, which gives its own distribution at each of the ``k + 1`` positions. The
proposals are accepted left to right, the first rejected one is replaced by a token of the
target's choosing, and when all ``k`` pass the target's distribution after them gives one more
token: every round yields between 1 and ``k + 1`` tokens for one target forward.

- **Greedy** (Leviathan et al. 2023, as in Hugging Face's assisted generation): a proposal is
  accepted when it is the target's argmax at its position, so the output is the target's own
  greedy decoding, token for token (in exact arithmetic; the verify forward processes k + 1
  positions at once, so a near-tie can round differently than one position at a time, as
  with batching).
- **Sampling** (Leviathan et al. 2023, Chen et al. 2023): proposal ``x ~ q`` is accepted with
  probability ``min(1, p(x) / q(x))``; a rejection samples from ``max(0, p - q)``
  renormalised. Every emitted token is then distributed exactly as the target's ``p``
  (after the same temperature / top-k / top-p as plain sampling), whatever the draft.

Both models must share the tokenizer (the same ids); the draft is usually a smaller model of
the same family trained on the same data. Only one prompt at a time (rows of a batch would
accept different numbers of tokens). The caches are rewound after each round: the target's
to the accepted tokens, the draft's likewise (its last proposal, when accepted, is fed at the
next round).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmgpt.compiled_step import DecodeStep, decode_step, static_capacity, static_decoder
from mmgpt.model import KVCache
from mmgpt.static_cache import StaticKVCache


@dataclass
class SpeculativeStats:
    """How a speculative run went: ``acceptance_rate`` = accepted / proposed draft tokens."""

    rounds: int = 0  # target forwards that verified proposals
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verifying target forward (accepted + the target's own one)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


class CachedModel:
    """One model with its cache and fill length: ``feed`` ids, get logits, ``rewind``."""

    def __init__(
        self, model: nn.Module, capacity: int, *, compile: bool, device: torch.device
    ) -> None:
        self.length = 0
        self.static = compile
        if compile:
            self.model = static_decoder(model, "GenerationConfig.compile")
            dtype = next(self.model.parameters()).dtype
            self.cache = StaticKVCache.for_model(
                self.model.config,
                1,
                static_capacity(capacity, self.model.config.block_size),
                device=device,
                dtype=dtype,
            )
            self.step = DecodeStep(device, compile=True)
            self.step.prepare(self.cache)
        else:
            self.model = model
            self.cache = KVCache.for_model(model.config, capacity=capacity)

    def feed(self, ids: Tensor, compiled: bool = False) -> Tensor:
        """Read ``ids`` (1, T) after the cached ones; return their logits (T, V) as float.
        ``compiled``: use the compiled step (for the shapes that recur every round)."""
        T = ids.size(1)
        if self.static:
            slots = torch.arange(self.length, self.length + T, device=ids.device)
            step = self.step if compiled else decode_step
            logits, _ = step(self.model, ids, slots[None], self.cache, slots)
        else:
            logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits
        self.length += T
        return logits[0].float()

    def rewind(self, length: int) -> None:
        """Forget the positions from ``length`` on (a static cache masks them)."""
        if not self.static:
            self.cache.crop(length)
        self.length = length


def greedy_accept(drafts: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """(accepted, next token) for ``drafts`` (k,) against the target's logits (k + 1, V):
    proposals are accepted while each is the target's argmax; the next token is the target's
    argmax after the last accepted one."""
    choice = target_logits.max(dim=-1).indices  # (k + 1,), the first maximum like argmax
    k = drafts.numel()
    mismatch = (drafts != choice[:k]).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else k
    return n, int(choice[n])


def _sample(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def sampling_accept(
    drafts: Tensor,  # (k,)
    draft_probs: Tensor,  # (k, V) q, the distributions the proposals were drawn from
    target_probs: Tensor,  # (k + 1, V) p
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """(accepted, next token) by the rejection rule that keeps the target's distribution:
    accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection
    draw from ``max(0, p_i - q_i)`` renormalised; when all pass, draw from ``p_{k+1}``."""
    k = drafts.numel()
    index = torch.arange(k, device=drafts.device)
    p_x = target_probs[index, drafts]  # (k,)
    q_x = draft_probs[index, drafts]  # (k,) > 0: each proposal was drawn from q
    u = torch.rand(k, generator=generator, device=drafts.device)
    rejected = (u * q_x >= p_x).nonzero()  # u < p/q accepts, written without dividing
    if not rejected.numel():
        return k, _sample(target_probs[k], generator)
    n = int(rejected[0])
    residual = (target_probs[n] - draft_probs[n]).clamp(min=0)
    total = residual.sum()
    # p <= q everywhere can only happen with p == q (both sum to 1), where nothing is
    # rejected in exact arithmetic; after rounding, p itself is the right distribution
    residual = residual / total if total > 0 else target_probs[n]
    return n, _sample(residual, generator)


def speculative_tokens(
    target: nn.Module,
    draft: nn.Module,
    prompt: Tensor,  # (1, T)
    max_new: int,
    num_draft_tokens: int,
    *,
    first_token: Callable[[Tensor], int],
    probs: Callable[[Tensor], Tensor] | None,
    generator: torch.Generator | None,
    compile: bool,
    stats: SpeculativeStats,
) -> Iterator[list[int]]:
    """Yield the new tokens of ``prompt``, a round's worth at a time, ``max_new`` in all.

    ``first_token(logits (1, V))`` chooses the first token from the prefill exactly as plain
    decoding does; ``probs(logits (n, V)) -> (n, V)`` turns logits into the sampling
    distribution (None: greedy). The caller stops iterating when a stop token appears.
    """
    k = num_draft_tokens
    device = prompt.device
    T = prompt.size(1)
    tgt = CachedModel(target, T + max_new, compile=compile, device=device)
    drf = CachedModel(draft, T + max_new, compile=compile, device=device)
    last = first_token(tgt.feed(prompt)[-1:])
    drf.feed(prompt)
    yield [last]
    produced = 1
    pending = [last]  # committed tokens the draft has not read yet (the newest last)
    while produced < max_new:
        k_round = min(k, max_new - produced - 1)  # never propose past max_new
        if k_round == 0:  # one token left: the target alone
            logits = tgt.feed(torch.tensor([[last]], device=device))
            last = first_token(logits[-1:])
            yield [last]
            return
        for tok in pending[:-1]:
            drf.feed(torch.tensor([[tok]], device=device), compiled=True)
        draft_start = drf.length  # the draft has read everything before pending[-1]
        q_logits = drf.feed(torch.tensor([[pending[-1]]], device=device), compiled=True)
        drafts: list[int] = []
        q_rows: list[Tensor] = []
        for i in range(k_round):
            if probs is None:
                tok = int(q_logits[-1].max(dim=-1).indices)
            else:
                q = probs(q_logits[-1:])[0]
                q_rows.append(q)
                tok = _sample(q, generator)
            drafts.append(tok)
            if i + 1 < k_round:
                q_logits = drf.feed(torch.tensor([[tok]], device=device), compiled=True)
        target_start = tgt.length
        # one forward over [newest, proposals]: the target's choice at all k + 1 positions
        p_logits = tgt.feed(
            torch.tensor([[last, *drafts]], device=device), compiled=k_round == k
        )  # (k_round + 1, V)
        proposals = torch.tensor(drafts, device=device)
        if probs is None:
            n, nxt = greedy_accept(proposals, p_logits)
        else:
            n, nxt = sampling_accept(proposals, torch.stack(q_rows), probs(p_logits), generator)
        stats.rounds += 1
        stats.proposed += k_round
        stats.accepted += n
        tgt.rewind(target_start + 1 + n)  # keeps the newest token and the accepted proposals
        if n < k_round:  # the draft read proposals 1..k-1: keep the accepted ones
            drf.rewind(draft_start + 1 + n)
            pending = [nxt]
        else:  # all accepted: the draft has not read the last proposal yet
            pending = [drafts[-1], nxt]
        yield [*drafts[:n], nxt]
        produced += n + 1
        last = nxt


def check_draft(target: nn.Module, draft: nn.Module, needed: int) -> None:
    """The draft must speak the target's vocabulary and hold ``needed`` positions."""
    tv, dv = target.config.vocab_size, getattr(getattr(draft, "config", None), "vocab_size", None)
    if dv != tv:
        raise ValueError(
            f"draft_model: its vocabulary ({dv}) differs from the model's ({tv}); the draft "
            "must use the same tokenizer"
        )
    if draft.config.block_size < needed:
        raise ValueError(
            f"draft_model: its context (block_size={draft.config.block_size}) is shorter than "
            f"the prompt plus max_new_tokens ({needed})"
        )


__all__ = [
    "CachedModel",
    "SpeculativeStats",
    "check_draft",
    "greedy_accept",
    "sampling_accept",
    "speculative_tokens",
]
