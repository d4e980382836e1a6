"""Generation: sampling, KV-cache decoding, batching and streaming.

Entry points
------------
- ``generate(model, prompts, config, pad_id=...) -> list[list[int]]`` — the new tokens of each
  prompt; ``return_dict=True`` gives a :class:`GenerationOutput` (finish reasons, texts, hidden
  states).
- ``stream(model, prompt_ids, config)`` — one prompt; yields each new token id as it is chosen.
- ``stream_batch(model, prompts, config, pad_id=...)`` — yields :class:`StreamEvent` per row.
- ``stream_text(model, tokenizer, prompt, config)`` / ``generate_text(...)`` — text in, text out.
- ``GenerationConfig(num_beams=K)`` with ``K > 1`` makes ``generate`` run beam search (below).

How decoding runs
-----------------
Prompts of different lengths are LEFT-padded into one ``(B, T)`` batch with an attention mask;
the model derives positions from the mask, so a padded row computes what it would alone. One
prefill writes a preallocated :class:`~mmgpt.model.KVCache` (capacity ``T + max_new_tokens``)
and keeps only the last position's logits; then each step feeds the ``B`` tokens just chosen
(one position, explicit position ids, a slice of a preallocated mask). A prompt whose length plus
``max_new_tokens`` exceeds the model's ``block_size`` is an error, unless
``truncate_prompt="left"``: then each too-long prompt keeps its last
``block_size - max_new_tokens`` tokens.

``max_new_tokens=None`` (the default) adapts to the model's context: up to
:data:`DEFAULT_MAX_NEW_TOKENS` (64) new tokens, fewer when the (longest) prompt leaves less room
in ``block_size``, so a prompt that fits with 64 generates exactly as with 64, and a model with
a short context still answers. A prompt that fills the whole context is an error (or, with
``truncate_prompt="left"``, keeps its last ``block_size - min(64, block_size // 2)`` tokens).
An explicit ``max_new_tokens`` is used as given: one that leaves no room is an error.

Compiled decoding (``GenerationConfig(compile=True)``)
------------------------------------------------------
On a CPU, eager decoding of a small model at batch 1 spends about as long in Python and
operator dispatch as in reading the weights. ``compile=True`` decodes on a
:class:`~mmgpt.static_cache.StaticKVCache` (buffers of a fixed capacity, ``T + max_new_tokens``
rounded up to a multiple of 64, written in place at a slot tensor; attention over the whole
capacity under a mask), so that every step has the same shapes, and runs the step through
``torch.compile(fullgraph=True, dynamic=False)`` (:mod:`mmgpt.compiled_step`; CUDA graphs with
``mode="reduce-overhead"`` on CUDA). The prefill stays eager. The first call compiles (tens of
seconds on a CPU); later calls with the same model, batch size and capacity reuse the compiled
step. The tokens are those of eager decoding: the same operations, differently fused, so they
agree up to float rounding, which only matters at an exact near-tie of two logits. Where
compiling is not possible (no C++ compiler for inductor, or a compiler error) one warning says
so and the static cache decodes eagerly. Multimodal models decode through their ``.gpt``.
Not with beam search.

Speculative decoding (``draft_model=``)
---------------------------------------
``generate(..., draft_model=small, num_draft_tokens=k)`` (also ``stream_batch`` and
``stream_text``) lets a small model with the same tokenizer propose ``k`` tokens per round and
the model verify them in one forward (:mod:`mmgpt.speculative`): greedy output is the model's
own greedy output, and sampling keeps its distribution exactly (the standard accept/reject
rule). One prompt at a time; not with ``inputs_embeds``, token hooks, hidden states, beams or
a repetition penalty. ``GenerationOutput.speculative`` holds the acceptance rate. With
``compile=True`` both models decode on static caches and the verify and draft steps are
compiled.

Output conventions
------------------
- Only new tokens are returned. A stop token (``stop_token_ids``) ends its row and is NOT part
  of the output.
- A stop string ends its row at the token that completes it. Token output keeps that token (a
  token cannot be split); text output (``GenerationOutput.texts``, ``stream_text``,
  ``generate_text``) is cut just before the stop string, and streamed text never shows a
  character that could still turn out to belong to a stop string.
- Rows that finished keep being fed ``pad_id`` (their samples are discarded) until every row
  has finished; a batch stays one tensor program instead of being re-indexed.

Sampling
--------
Order: repetition penalty (CTRL: seen tokens, prompt included, have positive logits divided
and negative logits multiplied by the penalty) → greedy argmax if ``temperature == 0`` or
``do_sample=False`` → temperature → top-k → top-p → sample. Sampling uses the exponential race
``argmax(p / E)``, ``E ~ Exp(1)``, which picks token ``i`` with probability ``p_i`` exactly
and needs no host synchronisation. Randomness comes from a ``torch.Generator`` made per call:

- ``seed=int``: one generator shared by the rows. A row's tokens then depend on the batch it
  is in (the noise is drawn as one ``(B, V)`` block).
- ``seed=[s0, s1, ...]``: one generator per row; row ``i`` gives exactly the tokens of
  generating prompt ``i`` alone with ``seed=s_i``.
- ``seed=None``: a seed drawn from torch's global RNG (so ``torch.manual_seed`` reproduces).

Beam search
-----------
``num_beams > 1`` keeps the ``num_beams`` most likely partial sequences of each prompt (sum of
token log-probabilities, after the repetition penalty) and returns the best
``num_return_sequences`` finished ones, best first. It is deterministic: like greedy decoding it
ignores ``do_sample`` and ``seed``, and it refuses sampling options (``top_k``, ``top_p``, a
``temperature`` other than 1.0 or 0). A finished sequence is scored ``sum_logprob / L **
length_penalty`` with ``L`` its new tokens, the stop token included (Hugging Face's convention):
``length_penalty > 0`` favours longer sequences, ``< 0`` shorter ones, ``0`` ranks by the plain
sum. As in Hugging Face's beam search, a candidate that ends (stop token or stop string) is kept
only when it ranks among the ``num_beams`` best candidates of its step, and never continues; the
live beams are the best candidates that do not end. A prompt stops searching once it holds
``num_beams`` finished sequences and no live beam can still beat the worst of them (the exact
bound: Hugging Face's ``early_stopping="never"``); sequences still live after
``max_new_tokens`` finish with reason ``"length"``.

The prompt is prefilled once; its KV cache is then expanded to ``num_beams`` rows per prompt and
reordered with :meth:`~mmgpt.model.KVCache.select` after every step. Output rows are
``num_return_sequences`` per prompt, in prompt order (row ``i * n + j`` is prompt ``i``'s
``j``-th best), with their scores in ``GenerationOutput.scores``. Beams cannot stream:
``stream``/``stream_batch`` refuse ``num_beams > 1``, and ``stream_text``/``generate_text``
yield the best sequence's text as one chunk once the search ends. ``token_hook`` and
``return_hidden_states`` are not available with beams.

Hooks for multimodal generation
-------------------------------
- ``inputs_embeds=(B, T, C)`` with an optional left-padded ``attention_mask`` replaces the
  prompt ids in the prefill (multimodal prompts); steps then feed token ids as usual. The
  prompt's ids are unknown then, so the repetition penalty covers the new tokens only.
- ``token_hook(state: StepState) -> Mapping[row, token_id] | None`` is called at every step
  before the tokens are chosen; the ids it returns replace the sampled ones for those rows
  (they stop a row like sampled ones would). ``state`` holds the new tokens so far, which rows
  finished, the step's raw logits and the final hidden state (after ``ln_f``) of each row's
  last fed position — i.e. of the token chosen at the previous step. :class:`ForceAfter` is
  the ready-made hook "once ``[IMG0]`` is produced, force ``[IMG1]..[IMGk-1]``".
- ``return_hidden_states=True`` fills ``GenerationOutput.hidden_states[row]``, shape
  ``(len(tokens[row]), C)``: the final hidden state of every returned token, as a full
  forward over prompt + new tokens gives at that token's position (the image decoder reads
  those of the signal tokens).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import Tensor, nn

from mmgpt.compiled_step import DecodeStep, static_capacity, static_decoder
from mmgpt.model import KVCache
from mmgpt.speculative import SpeculativeStats, check_draft, speculative_tokens
from mmgpt.static_cache import StaticKVCache

if TYPE_CHECKING:
    from mmgpt.interfaces import Tokenizer

TRUNCATE_MODES = ("error", "left")
# What max_new_tokens=None allows at most (less when the prompt leaves less room).
DEFAULT_MAX_NEW_TOKENS = 64
_MAX_SEED = 2**63 - 1

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _config_error(field_name: str, message: str) -> ValueError:
    return ValueError(f"GenerationConfig.{field_name}: {message}")


@dataclass
class GenerationConfig:
    """How to choose new tokens; see the module docstring for the exact semantics."""

    # None: up to DEFAULT_MAX_NEW_TOKENS, fewer when the prompt leaves less room in the context
    max_new_tokens: int | None = None
    temperature: float = 1.0  # 0 → greedy
    do_sample: bool = True  # False → greedy whatever the temperature
    top_k: int | None = None  # keep the k most likely tokens (ties with the k-th are kept)
    top_p: float | None = None  # keep the smallest most-likely set with mass >= top_p
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages seen tokens (prompt included)
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()  # need a decode function (a tokenizer)
    seed: int | Sequence[int] | None = None  # int: shared generator; list: one per row
    truncate_prompt: str = "error"  # "error" | "left": keep the last block_size - max_new tokens
    num_beams: int = 1  # > 1: deterministic beam search (module docstring)
    length_penalty: float = 1.0  # beams: score = sum logprob / new_tokens ** length_penalty
    num_return_sequences: int = 1  # beams: the n best sequences per prompt (<= num_beams)
    # decode on a static-shape KV cache with a torch.compile'd step (module docstring)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and (
            not _is_int(self.max_new_tokens) or self.max_new_tokens < 1
        ):
            raise _config_error(
                "max_new_tokens",
                f"expected a positive integer or None (adapt to the context), got "
                f"{self.max_new_tokens!r}",
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise _config_error(
                "temperature", f"expected a finite number >= 0, got {self.temperature!r}"
            )
        for name in ("do_sample", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise _config_error(name, f"expected a bool, got {getattr(self, name)!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise _config_error(
                "top_k", f"expected an integer >= 1 or None (off), got {self.top_k!r}"
            )
        if self.top_p is not None and (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0.0 < self.top_p <= 1.0
        ):
            raise _config_error(
                "top_p", f"expected 0 < top_p <= 1 or None (off), got {self.top_p!r}"
            )
        if (
            isinstance(self.repetition_penalty, bool)
            or not isinstance(self.repetition_penalty, (int, float))
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            raise _config_error(
                "repetition_penalty",
                f"expected a finite number > 0 (1 = off), got {self.repetition_penalty!r}",
            )
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(
            self.stop_token_ids, Sequence
        ):
            raise _config_error(
                "stop_token_ids", f"expected a list of token ids, got {self.stop_token_ids!r}"
            )
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise _config_error(
                "stop_token_ids",
                f"expected non-negative integer token ids, got {list(self.stop_token_ids)!r}",
            )
        self.stop_token_ids = tuple(self.stop_token_ids)
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, Sequence):
            raise _config_error(
                "stop_strings", f"expected a list of strings, got {self.stop_strings!r}"
            )
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise _config_error(
                "stop_strings", f"expected non-empty strings, got {list(self.stop_strings)!r}"
            )
        self.stop_strings = tuple(self.stop_strings)
        if self.seed is not None:
            seeds = [self.seed] if _is_int(self.seed) else self.seed
            if (
                isinstance(seeds, (str, bytes))
                or not isinstance(seeds, Sequence)
                or not seeds
                or not all(_is_int(s) and 0 <= s <= _MAX_SEED for s in seeds)
            ):
                raise _config_error(
                    "seed",
                    "expected None, an integer in [0, 2**63) or a non-empty list of them "
                    f"(one per row), got {self.seed!r}",
                )
            if not _is_int(self.seed):
                self.seed = tuple(self.seed)
        if self.truncate_prompt not in TRUNCATE_MODES:
            raise _config_error(
                "truncate_prompt", f"expected one of {TRUNCATE_MODES}, got {self.truncate_prompt!r}"
            )
        self._check_beams()

    def _check_beams(self) -> None:
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise _config_error(
                "num_beams",
                f"expected an integer >= 1 (1 = no beam search), got {self.num_beams!r}",
            )
        if (
            isinstance(self.length_penalty, bool)
            or not isinstance(self.length_penalty, (int, float))
            or not math.isfinite(self.length_penalty)
        ):
            raise _config_error(
                "length_penalty", f"expected a finite number, got {self.length_penalty!r}"
            )
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise _config_error(
                "num_return_sequences",
                f"expected an integer >= 1, got {self.num_return_sequences!r}",
            )
        if self.num_return_sequences > self.num_beams:
            raise _config_error(
                "num_return_sequences",
                f"{self.num_return_sequences} is more than num_beams={self.num_beams}: beam "
                "search returns at most num_beams sequences per prompt",
            )
        if self.num_beams == 1:
            return
        if self.compile:
            raise _config_error(
                "compile",
                f"not available with beam search (num_beams={self.num_beams}): beams reorder "
                "the cache every step; use compile=False",
            )
        beams = f"beam search (num_beams={self.num_beams}) is deterministic and does not sample"
        for name in ("top_k", "top_p"):
            if getattr(self, name) is not None:
                raise _config_error(name, f"{beams}; leave {name} unset (None)")
        if self.temperature not in (0, 1):
            raise _config_error(
                "temperature", f"{beams}; leave temperature at 1.0 (or 0), got {self.temperature!r}"
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


# --------------------------------------------------------------------------------------
# Logits processing and sampling (each works on (B, V) logits)
# --------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty: where ``seen`` (bool, like logits) is set, divide positive logits by
    ``penalty`` and multiply negative ones, so a seen token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with it are kept)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    reaches ``p`` (the most likely token is always kept); the rest become -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)  # (B, V) mass up to and including each token
    # a token goes when the more likely tokens before it already reach p
    remove = torch.zeros_like(cum, dtype=torch.bool)
    remove[..., 1:] = cum[..., :-1] >= p
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _exponential_noise(
    shape: torch.Size,
    device: torch.device,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.empty(shape, device=device).exponential_(generator=generator)
    else:  # one generator per row: each row's noise is what it would draw alone
        noise = torch.stack(
            [torch.empty(shape[-1], device=device).exponential_(generator=g) for g in generator]
        )
    # Exp(1) can return exactly 0; a zero-probability token must not win by 0 / 0 = nan
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def sampling_probs(logits: Tensor, config: GenerationConfig) -> Tensor:
    """The distribution sampling draws from: ``logits`` (B, V) after temperature, top-k and
    top-p, softmaxed (float32)."""
    logits = logits.float() / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    return logits.softmax(dim=-1)


def sample_next_token(
    logits: Tensor,
    config: GenerationConfig,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seen: Tensor | None = None,
) -> Tensor:
    """Choose one token per row of ``logits`` (B, V) → (B,) long, following ``config``.

    ``seen`` (B, V) bool marks the tokens the repetition penalty applies to. ``generator`` is
    one generator or one per row (unused when greedy).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.max(dim=-1).indices  # = argmax (first maximum), faster on CPU
    probs = sampling_probs(logits, config)
    noise = _exponential_noise(probs.shape, probs.device, generator)
    return probs.div_(noise).max(dim=-1).indices  # exponential race: P(i wins) = p_i


# --------------------------------------------------------------------------------------
# Incremental detokenisation and stop strings
# --------------------------------------------------------------------------------------


class IncrementalText:
    """One row's text, decoded incrementally, with stop-string search.

    Text grows only by complete characters: a token whose bytes end mid UTF-8 character
    (byte-level BPE) decodes to a trailing U+FFFD and is held back until a later token
    completes it — the decode-the-window-and-diff method of HF's TextStreamer and vLLM.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str]) -> None:
        self.decode = decode
        self.stop_strings = tuple(stop_strings)
        self.max_stop = max((len(s) for s in self.stop_strings), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoded again for context, not emitted again
        self.read = 0  # ids before this are in self.text
        self.text = ""
        self.emitted = 0  # characters handed out by take()
        self.cut: int | None = None  # end of the final text once a stop string matched
        self.stop: str | None = None

    def push(self, token: int) -> str | None:
        """Add a token; return the stop string it completed, if any."""
        self.ids.append(token)
        prefix_text = self.decode(self.ids[self.prefix : self.read])
        window_text = self.decode(self.ids[self.prefix :])
        tail = window_text[len(prefix_text) :]
        if not tail:
            return None
        if not tail.endswith("\ufffd"):
            start = len(self.text)
            self.text += tail
            self.prefix, self.read = self.read, len(self.ids)
            return self._match(start)
        # Incomplete character: still look for a stop string in the complete part of it.
        provisional = tail.rstrip("\ufffd")
        if provisional and self.stop_strings:
            start, before = len(self.text), self.text
            self.text += provisional
            if self._match(start) is None:
                self.text = before
        return self.stop

    def _match(self, start: int) -> str | None:
        # Text only grows at the end, so a new match must end after ``start``.
        lo = max(0, start - self.max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stop_strings:
            i = self.text.find(s, lo)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            self.cut, self.stop = best
        return self.stop

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that a stop string could start with."""
        held = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def copy(self) -> IncrementalText:
        """An independent copy (beam search extends one row's text in several ways)."""
        new = copy.copy(self)
        new.ids = list(self.ids)
        return new

    def take(self) -> str:
        """Text that is now certain to be output and was not taken before."""
        end = self.cut if self.cut is not None else len(self.text) - self._held_back()
        chunk = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk

    def finish(self) -> str:
        """End of generation: add any undecodable rest (as U+FFFD) and release held text."""
        if self.cut is None and self.read < len(self.ids):
            tail = self.decode(self.ids[self.prefix :])[
                len(self.decode(self.ids[self.prefix : self.read])) :
            ]
            start = len(self.text)
            self.text += tail
            self.read = len(self.ids)
            self._match(start)
        if self.cut is None:
            self.cut = len(self.text)
        return self.take()

    @property
    def final_text(self) -> str:
        return self.text[: self.cut] if self.cut is not None else self.text


# --------------------------------------------------------------------------------------
# Hook API and results
# --------------------------------------------------------------------------------------


@dataclass
class StepState:
    """What a token hook sees before the tokens of ``step`` are chosen (read-only)."""

    step: int  # index among the new tokens of the token about to be chosen
    tokens: Sequence[list[int]]  # new tokens of each row so far
    finished: Sequence[bool]  # rows that stopped (a forced id for them is ignored)
    logits: Tensor  # (B, V) raw logits of this step
    hidden_states: Tensor  # (B, C) final hidden state of each row's last fed position


TokenHook = Callable[[StepState], "Mapping[int, int] | None"]


class ForceAfter:
    """Token hook: once a row produces ``trigger_id``, force ``forced_ids`` next, one per step.

    E.g. ``ForceAfter(tok.signal_token_ids[0], tok.signal_token_ids[1:])``: after ``[IMG0]``
    the row emits ``[IMG1]..[IMGk-1]`` whatever the model prefers. Stateless: it reads the
    row's tokens, so one instance serves any number of rows and calls.
    """

    def __init__(self, trigger_id: int, forced_ids: Sequence[int]) -> None:
        if not _is_int(trigger_id) or not all(_is_int(t) for t in forced_ids) or not forced_ids:
            raise ValueError(
                f"ForceAfter: expected an integer trigger_id and a non-empty list of integer "
                f"forced_ids, got {trigger_id!r}, {forced_ids!r}"
            )
        self.trigger_id = trigger_id
        self.forced_ids = list(forced_ids)

    def __call__(self, state: StepState) -> dict[int, int] | None:
        forced: dict[int, int] = {}
        for row, toks in enumerate(state.tokens):
            if state.finished[row]:
                continue
            n = len(toks)
            # j = forced tokens already emitted after the most recent trigger
            for j in range(min(len(self.forced_ids), n)):
                if toks[n - 1 - j] == self.trigger_id and toks[n - j :] == self.forced_ids[:j]:
                    forced[row] = self.forced_ids[j]
                    break
        return forced or None


@dataclass
class GenerationOutput:
    """Per row: new tokens (stop token excluded), why it ended, and optional extras."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (stop token or stop string) or "length"
    stop_reasons: list[int | str | None]  # the stop token id or stop string that ended the row
    prompt_lengths: list[int]  # prompt positions used (after any left truncation)
    texts: list[str] | None = None  # decoded, cut before a stop string (when decode was given)
    hidden_states: list[Tensor] | None = None  # (len(tokens[row]), C) with return_hidden_states
    scores: list[float] | None = None  # beam search: sum logprob / len ** length_penalty
    speculative: SpeculativeStats | None = None  # with a draft model: its acceptance rate


@dataclass
class StreamEvent:
    """One row's news from :func:`stream_batch`: a new token, or the end of the row."""

    row: int
    token_id: int | None  # None on the final event of the row
    finish_reason: str | None = None  # set on the final event: "stop" or "length"
    stop_reason: int | str | None = None


# --------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _length_error(what: str, length: int, max_new: int, block_size: int) -> ValueError:
    return ValueError(
        f"{what} has {length} positions; with max_new_tokens={max_new} that needs "
        f"{length + max_new} but the model's context (block_size) is {block_size}. Shorten the "
        f"prompt, lower max_new_tokens, or set GenerationConfig(truncate_prompt='left') to keep "
        f"the last {block_size - max_new} prompt positions"
    )


# forward(tokens (B, 1), positions (B, 1)) -> (logits (B, V), final hidden state (B, C))
StepForward = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


class _Decoding:
    """Prepared prompts + state of one generate/stream call; ``run()`` drives it."""

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]] | Tensor | None,
        config: GenerationConfig | None,
        *,
        pad_id: int,
        inputs_embeds: Tensor | None,
        attention_mask: Tensor | None,
        decode: Callable[[list[int]], str] | None,
        token_hook: TokenHook | None,
        return_hidden_states: bool,
        host_sync: bool,
        draft_model: nn.Module | None = None,
        num_draft_tokens: int = 4,
    ) -> None:
        self.model = model
        self.config = config = config if config is not None else GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config: expected a GenerationConfig, got {type(config).__name__}")
        gpt_config = model.config
        self.vocab_size = gpt_config.vocab_size
        self.block_size = gpt_config.block_size
        self.device = _model_device(model)
        if not _is_int(pad_id) or not 0 <= pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id: expected a token id in [0, {self.vocab_size}), got {pad_id!r}"
            )
        self.pad_id = pad_id
        if config.stop_strings and decode is None:
            raise ValueError(
                "GenerationConfig.stop_strings need a decode function: pass decode=tokenizer.decode "
                "(or use generate_text / stream_text)"
            )
        for t in config.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(
                    f"GenerationConfig.stop_token_ids: {t} is outside the vocabulary "
                    f"(vocab_size={self.vocab_size})"
                )
        if config.max_new_tokens is not None and config.max_new_tokens >= self.block_size:
            raise ValueError(
                f"GenerationConfig.max_new_tokens={config.max_new_tokens} leaves no room for a "
                f"prompt in the model's context (block_size={self.block_size})"
            )
        self._prepare_prompt(prompts, inputs_embeds, attention_mask)
        B = self.batch_size

        self.generator: torch.Generator | list[torch.Generator] | None = None
        if not config.greedy and config.num_beams == 1:  # beam search never samples
            self.generator = self._make_generators(config.seed, B)
        elif isinstance(config.seed, tuple) and len(config.seed) != B:
            raise self._seed_count_error(B)
        self.seen: Tensor | None = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, self.vocab_size, dtype=torch.bool, device=self.device)
            if self.input_ids is not None:
                ids = self.input_ids
                if self.attention_mask is not None:  # pad slots repeat the row's last (real) id
                    ids = torch.where(self.attention_mask.bool(), ids, ids[:, -1:])
                self.seen.scatter_(1, ids, True)

        self.stop_ids = frozenset(config.stop_token_ids)
        self.hook = token_hook
        self.return_hidden_states = return_hidden_states
        self.texts = (
            [IncrementalText(decode, config.stop_strings) for _ in range(B)] if decode else None
        )
        # Host bookkeeping (one .tolist() per step) is needed for anything that can stop a row
        # early or look at the tokens; otherwise the loop never waits for the device.
        self.host_sync = bool(host_sync or self.stop_ids or self.texts or token_hook)
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.finished = [False] * B
        self.n_finished = 0
        self.finish_reasons: list[str | None] = [None] * B
        self.stop_reasons: list[int | str | None] = [None] * B
        self.hidden: Tensor | None = None
        self.draft = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.speculative: SpeculativeStats | None = None
        if draft_model is not None:
            self._check_speculative(inputs_embeds, token_hook, return_hidden_states)

    def _check_speculative(
        self, inputs_embeds: Tensor | None, token_hook: TokenHook | None, hidden: bool
    ) -> None:
        k, cfg = self.num_draft_tokens, self.config
        if not _is_int(k) or k < 1:
            raise ValueError(f"num_draft_tokens: expected an integer >= 1, got {k!r}")
        refused = {
            "inputs_embeds (the draft model reads token ids)": inputs_embeds is not None,
            "token_hook": token_hook is not None,
            "return_hidden_states": hidden,
            f"beam search (num_beams={cfg.num_beams})": cfg.num_beams > 1,
            f"repetition_penalty={cfg.repetition_penalty}": cfg.repetition_penalty != 1.0,
        }
        for what, present in refused.items():
            if present:
                raise ValueError(f"draft_model: speculative decoding does not support {what}")
        if self.batch_size != 1:
            raise ValueError(
                f"draft_model: speculative decoding takes one prompt at a time, got "
                f"{self.batch_size} (rows would accept different numbers of draft tokens)"
            )
        check_draft(self.model, self.draft, self.prompt_len + self.max_new)

    # -- preparation -----------------------------------------------------------------
    def _seed_count_error(self, B: int) -> ValueError:
        return ValueError(
            f"GenerationConfig.seed: got {len(self.config.seed)} per-row seeds for a batch of "
            f"{B} prompts"
        )

    def _make_generators(self, seed: int | tuple[int, ...] | None, B: int):
        if seed is None:  # reproducible under torch.manual_seed, independent afterwards
            seed = int(torch.randint(0, _MAX_SEED, (1,)).item())
        if _is_int(seed):
            return torch.Generator(device=self.device).manual_seed(seed)
        if len(seed) != B:
            raise self._seed_count_error(B)
        return [torch.Generator(device=self.device).manual_seed(s) for s in seed]

    def _prepare_prompt(
        self,
        prompts: Sequence[Sequence[int]] | Tensor | None,
        inputs_embeds: Tensor | None,
        attention_mask: Tensor | None,
    ) -> None:
        cfg = self.config
        if (prompts is None) == (inputs_embeds is None):
            raise ValueError("generate: pass exactly one of prompts (token ids) or inputs_embeds")
        self.input_ids: Tensor | None = None
        self.inputs_embeds: Tensor | None = None
        if prompts is not None and not isinstance(prompts, Tensor):
            if attention_mask is not None:
                raise ValueError(
                    "generate: attention_mask goes with a tensor of prompts or inputs_embeds; "
                    "lists of prompts are padded here"
                )
            rows = self._check_prompt_list(prompts)
            self.max_new = self._resolve_max_new(max(len(p) for p in rows))
            rows = self._fit_prompt_list(rows, self.block_size - self.max_new)
            T = max(len(p) for p in rows)
            padded = [[self.pad_id] * (T - len(p)) + p for p in rows]
            self.input_ids = torch.tensor(padded, dtype=torch.long, device=self.device)
            if any(len(p) < T for p in rows):
                mask = [[0] * (T - len(p)) + [1] * len(p) for p in rows]
                attention_mask = torch.tensor(mask, dtype=torch.long, device=self.device)
            self._check_ids(self.input_ids)
        else:
            if prompts is not None:
                if prompts.dim() != 2 or prompts.is_floating_point() or prompts.dtype == torch.bool:
                    raise ValueError(
                        "generate: a prompt tensor must be (batch, time) integer ids, got "
                        f"{prompts.dtype} of shape {tuple(prompts.shape)} (one prompt: ids[None])"
                    )
                x = prompts.to(self.device, torch.long)
            else:
                if inputs_embeds.dim() != 3:
                    raise ValueError(
                        "generate: inputs_embeds must be (batch, time, channels), got shape "
                        f"{tuple(inputs_embeds.shape)}"
                    )
                x = inputs_embeds.to(self.device)
            B, T = x.shape[:2]
            if T == 0:
                raise ValueError("generate: the prompt is empty; start it with a BOS token")
            if attention_mask is not None:
                attention_mask = self._check_mask(attention_mask, B, T)
            self.max_new = self._resolve_max_new(T)
            budget = self.block_size - self.max_new  # prompt positions that fit
            if x.size(1) > budget:
                if cfg.truncate_prompt == "error":
                    raise _length_error("the prompt", T, self.max_new, self.block_size)
                x = x[:, -budget:]
                if attention_mask is not None:
                    attention_mask = attention_mask[:, -budget:]
            if prompts is not None:
                self._check_ids(x)
                self.input_ids = x
            else:
                self.inputs_embeds = x
        first = self.input_ids if self.input_ids is not None else self.inputs_embeds
        self.batch_size, self.prompt_len = first.shape[:2]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the model takes its mask-free fast path
        self.attention_mask = attention_mask
        if attention_mask is None:
            self.lengths = torch.full(
                (self.batch_size,), self.prompt_len, dtype=torch.long, device=self.device
            )
        else:
            self.lengths = attention_mask.sum(-1)
        self.prompt_lengths: list[int] = self.lengths.tolist()

    def _resolve_max_new(self, longest: int) -> int:
        """``max_new_tokens`` for prompts of at most ``longest`` positions: the config's, or
        (``None``) up to ``DEFAULT_MAX_NEW_TOKENS`` within the room the prompt leaves."""
        cfg = self.config
        if cfg.max_new_tokens is not None:
            return cfg.max_new_tokens
        room = self.block_size - longest
        if room >= 1:
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        kept = self.block_size - min(DEFAULT_MAX_NEW_TOKENS, self.block_size // 2)
        if cfg.truncate_prompt == "error" or kept >= self.block_size:
            raise ValueError(
                f"the prompt has {longest} positions and fills the model's context "
                f"(block_size={self.block_size}), leaving no room for a new token. Shorten the "
                "prompt, or set GenerationConfig(truncate_prompt='left') to keep its last "
                f"{kept} positions"
            )
        return self.block_size - kept

    def _check_prompt_list(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(
                f"generate: prompts must be a non-empty list of token-id lists, got {prompts!r:.80}"
            )
        rows = []
        for i, p in enumerate(prompts):
            if _is_int(p):
                raise ValueError(
                    "generate: prompts must be a list of token-id lists; wrap a single prompt "
                    "as [ids]"
                )
            p = p.tolist() if isinstance(p, Tensor) else list(p)
            if not p:
                raise ValueError(f"generate: prompt {i} is empty; start it with a BOS token")
            rows.append(p)
        return rows

    def _fit_prompt_list(self, rows: list[list[int]], budget: int) -> list[list[int]]:
        """Rows longer than ``budget``: an error, or their last ``budget`` tokens."""
        fitted = []
        for i, p in enumerate(rows):
            if len(p) > budget:
                if self.config.truncate_prompt == "error":
                    raise _length_error(f"prompt {i}", len(p), self.max_new, self.block_size)
                p = p[-budget:]
            fitted.append(p)
        return fitted

    def _check_ids(self, ids: Tensor) -> None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"generate: prompt token id {bad} is outside the vocabulary "
                f"(vocab_size={self.vocab_size})"
            )

    def _check_mask(self, mask: Tensor, B: int, T: int) -> Tensor:
        if tuple(mask.shape) != (B, T):
            raise ValueError(
                f"generate: attention_mask must have shape ({B}, {T}), got {tuple(mask.shape)}"
            )
        mask = mask.to(self.device, torch.long)
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("generate: attention_mask must hold only 0 (padding) and 1 (token)")
        if T > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(
                "generate: attention_mask must be LEFT-padded (each row: zeros, then ones)"
            )
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"generate: prompt {empty[0]} is empty (its attention_mask is all 0)")
        return mask

    # -- the loop --------------------------------------------------------------------
    def run(self) -> Iterator[tuple[list[tuple[int, int]], list[int]]]:
        """Decode; with host sync, yield per step (appended (row, token) pairs, finished rows)."""
        models = [self.model] if self.draft is None else [self.model, self.draft]
        was_training = [m.training for m in models]
        for m in models:
            m.eval()  # dropout off: generation is deterministic given the seed
        try:
            yield from self._loop() if self.draft is None else self._speculative_loop()
        finally:
            for m, mode in zip(models, was_training):
                m.train(mode)
        for row in range(self.batch_size):
            if not self.finished[row]:
                self.finish_reasons[row] = "length"

    def _prefill(self, capacity: int) -> tuple[Tensor, Tensor, StepForward]:
        """Read the prompts into a KV cache of ``capacity`` positions; return the last
        position's (logits (B, V), hidden (B, C)) and ``forward(tokens (B, 1), positions (B,
        1)) -> (logits (B, V), hidden (B, C))``, which reads one more position per call."""
        if self.config.compile:
            return self._static_prefill(capacity)
        model, T = self.model, self.prompt_len
        cache = KVCache.for_model(model.config, capacity=capacity)
        out = model(
            input_ids=self.input_ids,
            inputs_embeds=self.inputs_embeds,
            attention_mask=self.attention_mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        mask_buf = None
        if self.attention_mask is not None:  # new positions are all real tokens
            mask_buf = torch.ones(self.batch_size, capacity, dtype=torch.long, device=self.device)
            mask_buf[:, :T] = self.attention_mask

        def forward(tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
            length = cache.length + 1
            out = model(
                input_ids=tokens,
                attention_mask=None if mask_buf is None else mask_buf[:, :length],
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1], out.hidden_states[:, -1]

        return out.logits[:, -1], out.hidden_states[:, -1], forward

    def _static_prefill(self, capacity: int) -> tuple[Tensor, Tensor, StepForward]:
        """``_prefill`` on a :class:`StaticKVCache`: the prefill runs eagerly (its length
        varies), every later step through one compiled :class:`DecodeStep`."""
        decoder = static_decoder(self.model, "GenerationConfig.compile")
        device, T = self.device, self.prompt_len
        cache = StaticKVCache.for_model(
            decoder.config,
            self.batch_size,
            static_capacity(capacity, decoder.config.block_size),
            device=device,
            dtype=next(decoder.parameters()).dtype,
        )
        step = DecodeStep(device, compile=True)
        step.prepare(cache)
        if self.attention_mask is not None:
            cache.set_padding(self.attention_mask)
        out = decoder(
            input_ids=self.input_ids,
            inputs_embeds=self.inputs_embeds,
            past_key_values=cache,
            cache_position=torch.arange(T, device=device),
            logits_to_keep=1,
        )
        slot = torch.tensor([T], device=device)  # (1,) the slot the next step writes

        def forward(tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
            logits, hidden = step(decoder, tokens, positions, cache, slot)
            slot.add_(1)
            return logits[:, -1], hidden[:, -1]

        return out.logits[:, -1], out.hidden_states[:, -1], forward

    @torch.inference_mode()
    def _loop(self) -> Iterator[tuple[list[tuple[int, int]], list[int]]]:
        cfg, B = self.config, self.batch_size
        max_new, T, device = self.max_new, self.prompt_len, self.device
        # T + max_new - 1 positions get fed; the extra one lets return_hidden_states feed the
        # last chosen tokens once more (the prompt check guarantees it fits in block_size)
        logits, hidden, forward = self._prefill(T + max_new)  # (B, V), (B, C)
        positions = self.lengths.clone()[:, None]  # (B, 1) position of the next fed token
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        hid_buf = None
        if self.return_hidden_states:
            hid_buf = hidden.new_zeros(B, max_new, hidden.size(-1))
        chosen: list[Tensor] = []  # device-side tokens when there is no host sync

        def feed(tokens: Tensor, step: int) -> tuple[Tensor, Tensor]:
            logits, hidden = forward(tokens[:, None], positions)
            positions.add_(1)
            if hid_buf is not None:
                hid_buf[:, step] = hidden
            return logits, hidden

        step = 0
        for step in range(max_new):
            nxt = sample_next_token(logits, cfg, generator=self.generator, seen=self.seen)
            if self.hook is not None:
                state = StepState(step, self.tokens, self.finished, logits, hidden)
                forced = self.hook(state)
                if forced:
                    nxt = self._apply_forced(nxt, forced)
            if self.n_finished:  # rows that finished before this step are fed padding
                nxt = nxt.masked_fill(finished, self.pad_id)
            if self.seen is not None:
                self.seen.scatter_(1, nxt[:, None], True)
            if self.host_sync:
                appended, done = self._record(nxt.tolist())
                if done:
                    finished[done] = True
                yield appended, done
                if self.n_finished == B:
                    break
            else:
                chosen.append(nxt)
            if step + 1 == max_new:
                break
            logits, hidden = feed(nxt, step)
        if hid_buf is not None:
            feed(nxt, step)  # the hidden states of the last chosen tokens
            self.hidden = hid_buf
        if chosen:
            self.tokens = torch.stack(chosen, dim=1).tolist()

    @torch.inference_mode()
    def _speculative_loop(self) -> Iterator[tuple[list[tuple[int, int]], list[int]]]:
        cfg = self.config
        generator = self.generator
        single = generator[0] if isinstance(generator, list) else generator

        def first_token(logits: Tensor) -> int:  # exactly as the plain loop chooses
            return int(sample_next_token(logits, cfg, generator=generator)[0])

        self.speculative = SpeculativeStats()
        rounds = speculative_tokens(
            self.model,
            self.draft,
            self.input_ids,
            self.max_new,
            self.num_draft_tokens,
            first_token=first_token,
            probs=None if cfg.greedy else lambda logits: sampling_probs(logits, cfg),
            generator=single,
            compile=cfg.compile,
            stats=self.speculative,
        )
        for tokens in rounds:
            for tok in tokens:
                yield self._record([tok])
                if self.n_finished:
                    return

    def _apply_forced(self, nxt: Tensor, forced: Mapping[int, int]) -> Tensor:
        rows, ids = [], []
        for row, tok in forced.items():
            if not _is_int(row) or not 0 <= row < self.batch_size:
                raise ValueError(f"token_hook: row {row!r} is not in [0, {self.batch_size})")
            if not _is_int(tok) or not 0 <= tok < self.vocab_size:
                raise ValueError(
                    f"token_hook: forced token {tok!r} for row {row} is outside the vocabulary "
                    f"(vocab_size={self.vocab_size})"
                )
            if not self.finished[row]:
                rows.append(row)
                ids.append(tok)
        if rows:
            nxt = nxt.clone()
            nxt[rows] = torch.tensor(ids, dtype=nxt.dtype, device=nxt.device)
        return nxt

    def _record(self, toks: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        appended: list[tuple[int, int]] = []
        done: list[int] = []
        for row, tok in enumerate(toks):
            if self.finished[row]:
                continue
            stop: int | str | None = None
            if tok in self.stop_ids:
                stop = tok
            else:
                self.tokens[row].append(tok)
                appended.append((row, tok))
                if self.texts is not None:
                    stop = self.texts[row].push(tok)
            if stop is not None:
                self.finished[row] = True
                self.n_finished += 1
                self.finish_reasons[row] = "stop"
                self.stop_reasons[row] = stop
                done.append(row)
        return appended, done

    def output(self) -> GenerationOutput:
        texts = None
        if self.texts is not None:
            for t in self.texts:
                t.finish()
            texts = [t.final_text for t in self.texts]
        hidden = None
        if self.hidden is not None:
            # clone outside inference mode: ordinary tensors that autograd code can use
            hidden = [self.hidden[r, : len(t)].clone() for r, t in enumerate(self.tokens)]
        return GenerationOutput(
            tokens=self.tokens,
            finish_reasons=[r or "length" for r in self.finish_reasons],
            stop_reasons=self.stop_reasons,
            prompt_lengths=self.prompt_lengths,
            texts=texts,
            hidden_states=hidden,
            speculative=self.speculative,
        )


# --------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------


@dataclass
class _Hypothesis:
    """A finished beam: its new tokens (stop token excluded), score and stop reason."""

    score: float  # sum logprob / len ** length_penalty
    tokens: list[int]
    stop_reason: int | str | None  # None: it ran to max_new_tokens


def _keep_best(hyps: list[_Hypothesis], hyp: _Hypothesis, k: int) -> None:
    """Add ``hyp`` to a prompt's finished sequences if it is among the ``k`` best."""
    if len(hyps) < k or hyp.score > min(h.score for h in hyps):
        hyps.append(hyp)
        if len(hyps) > k:
            hyps.remove(min(hyps, key=lambda h: h.score))


def _check_beam_options(
    config: GenerationConfig, token_hook: TokenHook | None, return_hidden_states: bool
) -> None:
    if token_hook is not None:
        raise ValueError(
            f"token_hook: not available with beam search (GenerationConfig.num_beams="
            f"{config.num_beams}); use num_beams=1"
        )
    if return_hidden_states:
        raise ValueError(
            f"return_hidden_states: not available with beam search (GenerationConfig.num_beams="
            f"{config.num_beams}); use num_beams=1"
        )


def _beam_search(run: _Decoding) -> GenerationOutput:
    """Beam search over the prompts prepared in ``run`` (module docstring, "Beam search")."""
    model, cfg = run.model, run.config
    was_training = model.training
    model.eval()
    try:
        finished = _beam_loop(run)
    finally:
        model.train(was_training)
    n = cfg.num_return_sequences
    out = GenerationOutput([], [], [], [], texts=[] if run.texts is not None else None, scores=[])
    for b, hyps in enumerate(finished):
        if len(hyps) < n:
            raise ValueError(
                f"GenerationConfig.num_return_sequences={n}, but prompt {b} has only "
                f"{len(hyps)} distinct continuations of at most {run.max_new} tokens"
            )
        for hyp in sorted(hyps, key=lambda h: -h.score)[:n]:
            out.tokens.append(hyp.tokens)
            out.finish_reasons.append("length" if hyp.stop_reason is None else "stop")
            out.stop_reasons.append(hyp.stop_reason)
            out.prompt_lengths.append(run.prompt_lengths[b])
            out.scores.append(hyp.score)
            if out.texts is not None:
                text = IncrementalText(run.texts[b].decode, cfg.stop_strings)
                for tok in hyp.tokens:
                    text.push(tok)
                text.finish()
                out.texts.append(text.final_text)
    return out


def _ranked(top_s: list[float], top_i: list[int], cand: Tensor) -> Iterator[tuple[float, int]]:
    """A prompt's candidates (score, beam * V + token), best first: the top ones already on
    the host, then (rarely needed: all of those ended) the others in score order."""
    yield from zip(top_s, top_i)
    if len(top_i) < cand.numel():
        taken = set(top_i)
        s_all, i_all = cand.sort(descending=True)
        for s, i in zip(s_all.tolist(), i_all.tolist()):
            if i not in taken:
                yield s, i


@torch.inference_mode()
def _beam_loop(run: _Decoding) -> list[list[_Hypothesis]]:
    model, cfg = run.model, run.config
    B, K, V, T, max_new = run.batch_size, cfg.num_beams, run.vocab_size, run.prompt_len, run.max_new
    device, lp, stop_ids = run.device, cfg.length_penalty, run.stop_ids
    neg_inf = float("-inf")
    cache = KVCache.for_model(model.config, capacity=T + max_new)
    out = model(
        input_ids=run.input_ids,
        inputs_embeds=run.inputs_embeds,
        attention_mask=run.attention_mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    # Row b * K + k is beam k of prompt b: the prompt is computed once, its cache copied.
    expand = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,)
    cache.select(expand)
    logits = out.logits[:, -1].index_select(0, expand)  # (B*K, V)
    mask_buf = None
    if run.attention_mask is not None:  # the K beams of a prompt share its padding
        mask_buf = torch.ones(B * K, T + max_new, dtype=torch.long, device=device)
        mask_buf[:, :T] = run.attention_mask.index_select(0, expand)
    positions = run.lengths.index_select(0, expand)[:, None].clone()  # (B*K, 1)
    seen = None if run.seen is None else run.seen.index_select(0, expand)
    # Only beam 0 of each prompt is live at first, so step 0 picks K different tokens.
    scores = torch.full((B, K), neg_inf, device=device)
    scores[:, 0] = 0.0
    scores = scores.view(-1)  # (B*K,) sum of logprobs of each live beam
    beam_tokens: list[list[int]] = [[] for _ in range(B * K)]
    texts = None  # per beam, only to find stop strings
    if cfg.stop_strings:
        texts = [run.texts[b].copy() for b in expand.tolist()]
    # enough candidates for K live beams even if the best ones all end with a stop token
    n_top = min(K * V, max(2, 1 + len(stop_ids)) * K)
    finished: list[list[_Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B

    for step in range(max_new):
        length = step + 1  # new tokens of every candidate of this step, its own included
        last = length == max_new
        logp = logits.float()
        if seen is not None:
            logp = apply_repetition_penalty(logp, seen, cfg.repetition_penalty)
        cand = (scores[:, None] + logp.log_softmax(-1)).view(B, K * V)
        top_s, top_i = (t.tolist() for t in cand.topk(n_top, dim=-1))

        src, toks, new_scores, new_texts = [], [], [], []
        for b in range(B):
            live: list[tuple[float, int, int, IncrementalText | None]] = []
            ranked = _ranked(top_s[b], top_i[b], cand[b]) if not done[b] else ()
            for rank, (s, idx) in enumerate(ranked):
                if s == neg_inf:  # only the unused beam slots are left
                    break
                k, tok = divmod(idx, V)
                row = b * K + k
                reason: int | str | None = None
                text = None
                if tok in stop_ids:
                    reason = tok
                elif texts is not None:
                    text = texts[row].copy()
                    reason = text.push(tok)
                if reason is not None:
                    if rank < K:  # an ending candidate counts among the K best only
                        kept = beam_tokens[row] + ([] if tok in stop_ids else [tok])
                        _keep_best(finished[b], _Hypothesis(s / length**lp, kept, reason), K)
                    continue
                live.append((s, row, tok, text))
                if len(live) == K:
                    break
            if last:
                for s, row, tok, _ in live:
                    hyp = _Hypothesis(s / length**lp, [*beam_tokens[row], tok], None)
                    _keep_best(finished[b], hyp, K)
            elif not live:
                done[b] = True
            elif len(finished[b]) == K:
                # the best a live beam can still reach: its sum can only fall, its length grow
                best_len = max_new if lp > 0 else length + 1
                bound = live[0][0] / best_len**lp
                done[b] = bound <= min(h.score for h in finished[b])
            if done[b]:
                live = []
            for s, row, tok, text in live:
                src.append(row)
                toks.append(tok)
                new_scores.append(s)
                new_texts.append(text)
            for _ in range(K - len(live)):  # unused slots: never extended (score -inf)
                src.append(b * K)
                toks.append(run.pad_id)
                new_scores.append(neg_inf)
                new_texts.append(None if texts is None else texts[b * K])
        if last or all(done):
            break
        src_t = torch.tensor(src, dtype=torch.long, device=device)
        tok_t = torch.tensor(toks, dtype=torch.long, device=device)
        scores = torch.tensor(new_scores, dtype=scores.dtype, device=device)
        cache.select(src_t)  # each beam continues the cache of the beam it extends
        if seen is not None:
            seen = seen.index_select(0, src_t)
            seen.scatter_(1, tok_t[:, None], True)
        beam_tokens = [[*beam_tokens[r], t] for r, t in zip(src, toks)]
        if texts is not None:
            texts = new_texts
        out = model(
            input_ids=tok_t[:, None],
            attention_mask=None if mask_buf is None else mask_buf[:, : cache.length + 1],
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        positions.add_(1)
        logits = out.logits[:, -1]
    return finished


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


@overload
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | Tensor | None = ...,
    config: GenerationConfig | None = ...,
    *,
    pad_id: int,
    inputs_embeds: Tensor | None = ...,
    attention_mask: Tensor | None = ...,
    decode: Callable[[list[int]], str] | None = ...,
    token_hook: TokenHook | None = ...,
    return_hidden_states: bool = ...,
    return_dict: Literal[False] = ...,
    draft_model: nn.Module | None = ...,
    num_draft_tokens: int = ...,
) -> list[list[int]]: ...
@overload
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | Tensor | None = ...,
    config: GenerationConfig | None = ...,
    *,
    pad_id: int,
    inputs_embeds: Tensor | None = ...,
    attention_mask: Tensor | None = ...,
    decode: Callable[[list[int]], str] | None = ...,
    token_hook: TokenHook | None = ...,
    return_hidden_states: bool = ...,
    return_dict: Literal[True],
    draft_model: nn.Module | None = ...,
    num_draft_tokens: int = ...,
) -> GenerationOutput: ...
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    pad_id: int,
    inputs_embeds: Tensor | None = None,
    attention_mask: Tensor | None = None,
    decode: Callable[[list[int]], str] | None = None,
    token_hook: TokenHook | None = None,
    return_hidden_states: bool = False,
    return_dict: bool = False,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 4,
) -> list[list[int]] | GenerationOutput:
    """Generate new tokens for a batch of prompts.

    Args:
        model: a :class:`~mmgpt.model.GPT` (anything with its ``forward`` and ``.config``).
        prompts: token-id lists of any lengths (left-padded here), or a ``(B, T)`` tensor with
            an optional left-padded ``attention_mask``.
        config: sampling and stopping; default ``GenerationConfig()``.
        pad_id: the id used for padding and fed to finished rows.
        inputs_embeds: ``(B, T, C)`` prompt embeddings instead of ``prompts`` (multimodal).
        attention_mask: ``(B, T)`` 1 = token, 0 = left padding, for a tensor prompt/embeds.
        decode: ids → text; needed by ``config.stop_strings``; fills ``texts`` of the output.
        token_hook: called each step; may force the next token of rows (module docstring).
        return_hidden_states: final hidden states of the returned tokens in the output.
        return_dict: return a :class:`GenerationOutput` instead of the token lists.
        draft_model: a smaller model with the same tokenizer: speculative decoding
            (:mod:`mmgpt.speculative`; one prompt; ``GenerationOutput.speculative`` holds the
            acceptance rate).
        num_draft_tokens: tokens the draft proposes per round.
    """
    run = _Decoding(
        model,
        prompts,
        config,
        pad_id=pad_id,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        decode=decode,
        token_hook=token_hook,
        return_hidden_states=return_hidden_states,
        host_sync=False,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
    )
    if run.config.num_beams > 1:
        _check_beam_options(run.config, token_hook, return_hidden_states)
        out = _beam_search(run)
    else:
        for _ in run.run():
            pass
        out = run.output()
    return out if return_dict else out.tokens


def stream_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    pad_id: int,
    inputs_embeds: Tensor | None = None,
    attention_mask: Tensor | None = None,
    decode: Callable[[list[int]], str] | None = None,
    token_hook: TokenHook | None = None,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 4,
) -> Iterator[StreamEvent]:
    """Like :func:`generate`, yielding a :class:`StreamEvent` per new token of each row as
    soon as it is chosen, and one final event per row (``token_id=None``) when it ends."""
    if config is not None and config.num_beams > 1:
        raise ValueError(
            f"GenerationConfig.num_beams={config.num_beams}: beam search cannot stream tokens "
            "(the best sequence is known only at the end); use generate, or generate_text"
        )
    run = _Decoding(
        model,
        prompts,
        config,
        pad_id=pad_id,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        decode=decode,
        token_hook=token_hook,
        return_hidden_states=False,
        host_sync=True,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
    )
    for appended, done in run.run():
        for row, tok in appended:
            yield StreamEvent(row, tok)
        for row in done:
            yield StreamEvent(row, None, "stop", run.stop_reasons[row])
    for row in range(run.batch_size):
        if run.finish_reasons[row] == "length":
            yield StreamEvent(row, None, "length")


def _check_single_embeds(where: str, inputs_embeds: Tensor | None) -> None:
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.size(0) != 1):
        raise ValueError(
            f"{where}: inputs_embeds must be (1, T, C) (one prompt), got shape "
            f"{tuple(inputs_embeds.shape)}"
        )


def stream(
    model: nn.Module,
    prompt_ids: Sequence[int] | Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    decode: Callable[[list[int]], str] | None = None,
    token_hook: TokenHook | None = None,
) -> Iterator[int]:
    """Generate for ONE prompt (ids, or ``inputs_embeds`` of shape (1, T, C)), yielding each
    new token id as soon as it is chosen; same tokens as :func:`generate`."""
    prompts = None
    if prompt_ids is not None:
        if isinstance(prompt_ids, Tensor):
            if prompt_ids.dim() != 1:
                raise ValueError(
                    f"stream: prompt_ids must be 1-D (one prompt), got shape "
                    f"{tuple(prompt_ids.shape)}; use stream_batch for several prompts"
                )
            prompt_ids = prompt_ids.tolist()
        if not all(_is_int(t) for t in prompt_ids):
            raise ValueError("stream: prompt_ids must be a flat list of token ids (one prompt)")
        prompts = [list(prompt_ids)]
    else:
        _check_single_embeds("stream", inputs_embeds)
    # One row never needs padding; pad_id only has to be a valid id.
    for event in stream_batch(
        model,
        prompts,
        config,
        pad_id=0,
        inputs_embeds=inputs_embeds,
        decode=decode,
        token_hook=token_hook,
    ):
        if event.token_id is not None:
            yield event.token_id


def encode_prompt(
    tokenizer: Tokenizer, prompt: str | Sequence[int] | None, add_bos: bool | None = None
) -> Sequence[int] | None:
    """A text prompt's ids as generation frames it (a bos as the tokenizer adds one, unless
    ``add_bos`` says); ids and ``None`` pass through."""
    if prompt is None or not isinstance(prompt, str):
        return prompt
    if add_bos is None:  # as the tokenizer frames text (Llama: a bos; Qwen2, GPT-2: none)
        add_bos = getattr(tokenizer, "add_bos_token", None) is not False
    return tokenizer.encode(prompt, add_bos=add_bos)


def tokenizer_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's ``stop_ids`` (a chat model's end-of-turn
    tokens, e.g. ``<|eot_id|>``, ``<|im_end|>``) when it has them, and its eos."""
    stops = [*(getattr(tokenizer, "stop_ids", None) or ()), tokenizer.eos_id]
    return tuple(dict.fromkeys(int(t) for t in stops))


def stream_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | None,
    config: GenerationConfig | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    add_bos: bool | None = None,
    stop_at_eos: bool = True,
    skip_special_tokens: bool = True,
    token_hook: TokenHook | None = None,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 4,
    speculative_stats: SpeculativeStats | None = None,
) -> Iterator[str]:
    """Yield the generated text in chunks as it is produced.

    A chunk never ends inside a UTF-8 character (byte-level BPE tokens may split one), and
    text that could still become a stop string is held back; the output stops just before
    a stop string. ``prompt`` is text (encoded with a BOS if ``add_bos``; by default as the
    tokenizer frames text) or token ids; or pass ``inputs_embeds`` (1, T, C) with
    ``prompt=None``. Generation also stops at the
    tokenizer's eos and stop ids (:func:`tokenizer_stop_ids`) unless ``stop_at_eos=False``.
    With ``config.num_beams > 1`` (beam search cannot stream) the best sequence's text comes
    as one chunk when the search ends; ``num_return_sequences`` must then be 1.
    ``draft_model`` / ``num_draft_tokens``: speculative decoding, as :func:`generate`;
    ``speculative_stats`` (a :class:`~mmgpt.speculative.SpeculativeStats`) is filled in.
    """
    _check_single_embeds("stream_text", inputs_embeds)
    config = config if config is not None else GenerationConfig()
    if config.num_return_sequences > 1:
        raise ValueError(
            f"GenerationConfig.num_return_sequences={config.num_return_sequences}: stream_text "
            "gives one text; use generate(..., return_dict=True) for the n best"
        )
    stops = tokenizer_stop_ids(tokenizer) if stop_at_eos else ()
    if any(t not in config.stop_token_ids for t in stops):
        from dataclasses import replace

        extra = tuple(t for t in stops if t not in config.stop_token_ids)
        config = replace(config, stop_token_ids=(*config.stop_token_ids, *extra))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    run = _Decoding(
        model,
        None if prompt is None else [encode_prompt(tokenizer, prompt, add_bos)],
        config,
        pad_id=tokenizer.pad_id,
        inputs_embeds=inputs_embeds,
        attention_mask=None,
        decode=decode,
        token_hook=token_hook,
        return_hidden_states=False,
        host_sync=True,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
    )
    if config.num_beams > 1:
        _check_beam_options(config, token_hook, False)
        best = _beam_search(run).texts[0]
        if best:
            yield best
        return
    text = run.texts[0]
    for _ in run.run():
        chunk = text.take()
        if chunk:
            yield chunk
    if speculative_stats is not None and run.speculative is not None:
        vars(speculative_stats).update(vars(run.speculative))
    rest = text.finish()
    if rest:
        yield rest


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | None,
    config: GenerationConfig | None = None,
    **kwargs: Any,
) -> str:
    """The whole generated text (cut before a stop string); options as :func:`stream_text`."""
    return "".join(stream_text(model, tokenizer, prompt, config, **kwargs))


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "TRUNCATE_MODES",
    "ForceAfter",
    "GenerationConfig",
    "GenerationOutput",
    "SpeculativeStats",
    "StepState",
    "StreamEvent",
    "TokenHook",
    "apply_repetition_penalty",
    "generate",
    "generate_text",
    "sample_next_token",
    "sampling_probs",
    "stream",
    "stream_batch",
    "stream_text",
    "tokenizer_stop_ids",
    "top_k_filter",
    "top_p_filter",
]
