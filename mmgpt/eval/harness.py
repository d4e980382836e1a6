"""An lm-evaluation-harness model class: ``lm_eval`` runs any of its tasks on an mmgpt model.

:class:`MMGPTLM` is registered in lm_eval's model registry as ``"mmgpt"`` when this module is
imported. lm_eval 0.4 finds model classes only in its own registry (it reads no entry points),
so a plain ``lm_eval --model mmgpt`` cannot see it; run lm_eval through this module instead,
which registers the class and then hands every argument to lm_eval's own command line::

    python -m mmgpt.eval.harness --model mmgpt --model_args pretrained=DIR --tasks hellaswag

From Python, ``import mmgpt.eval.harness`` and call ``lm_eval.simple_evaluate(model="mmgpt",
model_args={"pretrained": DIR}, ...)``, or pass an :class:`MMGPTLM` instance as ``model``.

What the three request types compute (text only; a multimodal model is scored on its decoder
with its tokenizer, without images or chat template):

- ``loglikelihood(context, continuation)``: the sum of the log-softmax of the continuation's
  tokens after the context, and whether each of them is the argmax. The pair is tokenized
  together and split after the context's tokens (lm_eval's ``TemplateLM._encode_pair``: a
  trailing space of the context moves to the continuation), so the boundary is the one the
  tokenizer draws in the full text. A sequence longer than the model's context (``max_length``,
  by default ``block_size``) keeps its last ``max_length + 1`` tokens: the context is
  left-truncated and the continuation is always scored whole.
- ``loglikelihood_rolling(text)``: the log-likelihood of the whole text after one prefix token,
  in lm_eval's disjoint windows of ``max_length`` predicted tokens (each token scored once).
- ``generate_until(context, gen_kwargs)``: greedy decoding (sampling when ``do_sample`` is
  true) with :func:`mmgpt.generation.generate`, cut before the first ``until`` string, ending at
  the tokenizer's eos/stop tokens or after ``max_gen_toks`` tokens, or fewer where the context
  leaves less room in ``max_length`` (but at least ``max_length // 2``; a context too long for
  that is left-truncated).

The text is framed as generation frames it: a bos first when the tokenizer adds one
(``add_bos_token`` overrides). The prefix of an empty context and of rolling windows is that
bos, or the eos when there is none.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lm_eval.models  # noqa: F401  (registers lm_eval's own models before ours; see below)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import Collator
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'mmgpt.eval.harness needs lm-evaluation-harness: pip install "mmgpt[harness]"'
    ) from exc

from mmgpt.generation import GenerationConfig, generate, tokenizer_stop_ids

__all__ = ["MMGPTLM", "main"]

logger = logging.getLogger(__name__)

# lm_eval's get_model imports lm_eval.models only while its registry is empty, so the import
# above comes first: otherwise registering "mmgpt" would hide every built-in model. The
# registration is a lazy "module:Class" path, so running this file as __main__ (which defines
# a second copy of the class) registers the same target and never collides.
model_registry.register("mmgpt", target="mmgpt.eval.harness:MMGPTLM")

_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mmgpt model_args {name}: expected a positive integer, got {value!r}")
    return value


class MMGPTLM(TemplateLM):
    """An mmgpt model directory as an lm_eval model (module docstring).

    Args (``--model_args key=value,...``):
        pretrained: the model directory (or a Hub id mmgpt resolves).
        device: ``cpu``, ``cuda``, ``cuda:1``, ... (default: cuda when available).
        batch_size: sequences per forward pass (an integer; ``auto`` is not supported).
        max_length: the context used, at most the model's ``block_size`` (its default).
        max_gen_toks: new tokens of ``generate_until`` when the task does not say (256).
        add_bos_token: frame texts with a bos (default: as the tokenizer frames text).
    """

    def __init__(
        self,
        pretrained: Any,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from mmgpt.multimodal import MultimodalGPT
        from mmgpt.pretrained import load_model, load_tokenizer, resolve_model_dir

        unused = {k: v for k, v in unused.items() if v is not None}
        unused.pop("max_batch_size", None)  # lm_eval passes it for "auto" batch sizes only
        if unused:
            raise ValueError(
                f"mmgpt model_args: unknown argument(s) {sorted(unused)}; expected pretrained, "
                "device, batch_size, max_length, max_gen_toks, add_bos_token"
            )
        if isinstance(pretrained, torch.nn.Module):
            raise TypeError("mmgpt model_args pretrained: expected a model directory")
        default = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device or default)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda unless told otherwise; its hf model falls
            # back to the cpu too
            logger.warning(
                "mmgpt: device %r requested but CUDA is not available; using cpu", device
            )
            self._device = torch.device("cpu")
        model_dir = resolve_model_dir(str(pretrained))
        model = load_model(model_dir, map_location=str(self._device)).eval()
        if isinstance(model, MultimodalGPT):
            self.model, self.tokenizer = model.gpt, model.tokenizer
        else:
            self.model, self.tokenizer = model, load_tokenizer(model_dir)
        self.pretrained = str(pretrained)
        self.batch_size = _positive_int("batch_size", 1 if batch_size is None else batch_size)
        block_size = self.model.config.block_size
        self._max_length = (
            block_size if max_length is None else _positive_int("max_length", max_length)
        )
        if not 2 <= self._max_length <= block_size:
            raise ValueError(
                f"mmgpt model_args max_length: expected 2..{block_size} (the model's block_size), "
                f"got {max_length!r}"
            )
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        pad_id = getattr(self.tokenizer, "pad_id", None)
        self.pad_id = self.tokenizer.eos_id if pad_id is None else pad_id  # padding is never read
        if add_bos_token is None:  # as mmgpt.generation.encode_prompt frames a prompt
            add_bos_token = getattr(self.tokenizer, "add_bos_token", None) is not False
        self.add_bos_token = bool(add_bos_token)

    # -- what TemplateLM needs ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if self.add_bos_token and bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"mmgpt:{self.pretrained}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer.encode(string, add_bos=add_bos))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # -- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """``(key, context ids, continuation ids)`` → ``(log-likelihood, is_greedy)`` each,
        ``batch_size`` right-padded rows a forward pass, longest first."""
        for key, _, continuation in requests:
            if not continuation:
                raise ValueError(f"loglikelihood request {key!r}: the continuation has no tokens")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"loglikelihood request {key!r}: a continuation of {len(continuation)} "
                    f"tokens does not fit the model's context (max_length={self.max_length})"
                )

        def longest_first(request: tuple[Any, list[int], list[int]]) -> tuple[int, tuple]:
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        collator = Collator(requests, sort_fn=longest_first)
        results: list[tuple[float, bool]] = []
        for chunk in collator.get_batched(n=self.batch_size):
            # keep the last max_length + 1 tokens (left-truncating the context); the last one
            # is only a target
            rows = [(c + k)[-(self.max_length + 1) :][:-1] for _, c, k in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)  # right padding: a causal model's
                # logits at real positions ignore what follows
            logits = self.model(input_ids=ids.to(self._device)).logits  # (B, T, V)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for r, ((key, _, continuation), row) in enumerate(zip(chunk, rows)):
                n = len(continuation)
                scores = logprobs[r, len(row) - n : len(row)]  # (n, V)
                target = torch.tensor(continuation, device=scores.device)
                answer = (
                    float(scores.gather(1, target[:, None]).sum()),
                    bool((scores.argmax(-1) == target).all()),
                )
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                results.append(answer)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after the prefix token, in disjoint windows."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=tokens,
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------
    def _generation_config(self, gen_kwargs: dict[str, Any], prompt_len: int) -> GenerationConfig:
        unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
        if unknown:
            raise ValueError(
                f"generate_until: unsupported generation argument(s) {unknown}; mmgpt reads "
                f"{sorted(_GEN_KEYS)}"
            )
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"generate_until: 'until' must be a string or a list, got {until!r}")
        wanted = _positive_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        # Room for the context: a context that fits with `wanted` new tokens is not cut; a
        # longer one keeps at least half of the window (generate_until left-truncates it).
        max_new = min(wanted, max(self.max_length - prompt_len, self.max_length // 2))
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new,
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_k=gen_kwargs.get("top_k") if do_sample else None,
            top_p=gen_kwargs.get("top_p") if do_sample else None,
            stop_token_ids=tokenizer_stop_ids(self.tokenizer),
            stop_strings=tuple(s for s in until if s),
            seed=0 if do_sample else None,
        )

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut before the first ``until`` string."""
        encoded = []
        for request in requests:
            context, gen_kwargs = request.args
            ids = self.tok_encode(context) or [self.prefix_token_id]
            config = self._generation_config(dict(gen_kwargs or {}), len(ids))
            # left-truncate: the context keeps what max_length leaves after the new tokens
            ids = ids[-(self.max_length - config.max_new_tokens) :]
            encoded.append((request.args, ids, config))

        # rows of one batch share a config (the same until and number of new tokens)
        collator = Collator(
            encoded,
            sort_fn=lambda item: (-len(item[1]), tuple(item[1])),
            group_fn=lambda item: dataclasses.asdict(item[2]),
            group_by="gen_kwargs",
        )
        results: list[str] = []
        for chunk in collator.get_batched(n=self.batch_size):
            out = generate(
                self.model,
                [ids for _, ids, _ in chunk],
                chunk[0][2],
                pad_id=self.pad_id,
                decode=self.tok_decode,
                return_dict=True,
            )
            for (args, _, _), text in zip(chunk, out.texts):
                self.cache_hook.add_partial("generate_until", args, text)
                results.append(text)
        return collator.get_original(results)


def main(argv: Sequence[str] | None = None) -> None:
    """lm_eval's command line, with ``"mmgpt"`` registered (``python -m mmgpt.eval.harness``);
    ``argv`` defaults to the process's arguments."""
    from lm_eval.__main__ import cli_evaluate

    saved = list(sys.argv)
    if argv is not None:  # lm_eval's parser reads sys.argv itself
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
