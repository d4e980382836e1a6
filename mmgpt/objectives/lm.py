"""Next-token prediction: token-weighted cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmgpt.interfaces import ObjectiveOutput
from mmgpt.registry import register

__all__ = ["IGNORE_INDEX", "LMObjective", "lm_targets"]

IGNORE_INDEX = -100


def lm_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels aligned with ``input_ids`` (B, T): given ``labels``, else the ids with padding ignored."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        return input_ids
    return input_ids.masked_fill(mask == 0, IGNORE_INDEX)


@register("objective", "lm")
class LMObjective:
    """Cross-entropy of each next token, averaged over the target tokens of the batch.

    ``batch``: ``input_ids`` (B, T); optional ``attention_mask`` (B, T) (1 = token, 0 = pad);
    optional ``labels`` (B, T) aligned with ``input_ids``, ``-100`` = ignored. Position ``t``
    predicts ``labels[:, t + 1]``: the model reads ``input_ids[:, :-1]`` (a causal model's
    logits at ``t`` do not depend on later tokens, so dropping the last input is exact and
    lets a ``block_size + 1`` window fill the whole context).

    ``weight`` is the number of target tokens, so the trainer accumulates micro-batches as
    sum of token losses / total tokens rather than a mean of means.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        input_ids = batch.get("input_ids")
        if input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"lm objective: batch['input_ids'] must be (batch, time), got {shape}")
        if input_ids.size(1) < 2:
            raise ValueError("lm objective: sequences need at least 2 tokens (input + target)")
        labels = lm_targets(batch)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"lm objective: labels shape {tuple(labels.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        mask = batch.get("attention_mask")
        out = model(
            input_ids=input_ids[:, :-1],
            attention_mask=None if mask is None else mask[:, :-1],
        )
        logits = out.logits if hasattr(out, "logits") else out  # (B, T-1, V)
        targets = labels[:, 1:]  # (B, T-1)
        # float32 for the softmax: bf16/fp16 logits lose precision in the log-sum-exp
        loss_sum = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        n_tokens = int((targets != self.ignore_index).sum())
        loss = loss_sum / max(n_tokens, 1)
        return ObjectiveOutput(
            loss=loss,
            metrics={"loss": float(loss.detach()), "tokens": float(n_tokens)},
            weight=float(n_tokens),
        )
