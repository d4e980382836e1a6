"""Perplexity of a text GPT on text files: ``exp`` of the mean next-token negative log-likelihood.

The files are tokenized and packed exactly as the ``text`` dataset does for training (each
document followed by ``eos``, windows of ``block_size + 1`` tokens with stride ``block_size``),
so every token after the first is scored exactly once and the result equals ``exp`` of the
``lm`` objective's loss over the same windows. The last, shorter window is scored too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmgpt.data.text import resolve_text_files, tokenize_files
from mmgpt.interfaces import Tokenizer
from mmgpt.registry import register

__all__ = ["perplexity", "token_nll"]


@torch.no_grad()
def token_nll(model: Any, tokens: Sequence[int], *, batch_size: int = 8) -> tuple[float, int]:
    """Sum of next-token NLLs over a token stream and the number of tokens scored."""
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    block = model.config.block_size
    ids = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a copy: tokens may be read-only
    windows = [ids[s : s + block + 1] for s in range(0, max(len(ids) - 1, 0), block)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            length = max(len(w) for w in chunk)
            # Right padding: a causal model's logits at real positions ignore what follows,
            # and padded targets are ignored.
            batch = torch.full((len(chunk), length), -100, dtype=torch.long)
            for row, w in enumerate(chunk):
                batch[row, : len(w)] = w
            batch = batch.to(device)
            logits = model(input_ids=batch[:, :-1].clamp(min=0)).logits  # (B, T, V)
            targets = batch[:, 1:]
            total += F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return total, count


@register("metric", "perplexity")
def perplexity(
    model: Any,
    tokenizer: Tokenizer,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """Perplexity of ``model`` on text files (a file, a directory of ``*.txt``, a glob or a list).

    Returns ``{"perplexity", "nll" (mean per token, nats), "tokens" (number scored)}``.
    """
    files = resolve_text_files(paths)
    tokens = tokenize_files(files, tokenizer)
    total, count = token_nll(model, tokens, batch_size=batch_size)
    if count == 0:
        raise ValueError(
            f"text data {[str(f) for f in files][:3]}: fewer than 2 tokens, nothing to score"
        )
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}
