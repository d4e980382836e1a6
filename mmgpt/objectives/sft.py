"""Supervised fine-tuning: next-token cross-entropy on the reply tokens only.

The processor (:class:`~mmgpt.processor.MultimodalProcessor`) puts labels on the assistant's
replies and their ``<eos>``; the prompt, the image slots and the padding are ``-100``. This
objective scores exactly those labels, so an image-conditioned model learns to *answer*, not to
reproduce its prompt. It works for

- a :class:`~mmgpt.multimodal.MultimodalGPT` on a :class:`~mmgpt.processor.MultimodalBatch`
  (images fused into their slots by the model), and
- a text :class:`~mmgpt.model.GPT` on a batch dict ``{input_ids, attention_mask, labels}`` (or on
  a ``MultimodalBatch`` without images).

Like the ``lm`` objective it is token-weighted by default: ``weight`` is the number of target
tokens, so the trainer's gradient accumulation averages over all target tokens of a step
exactly. ``reduction="sample"`` averages each sample's tokens first, then the samples (weight:
the samples with a target), so a one-word answer counts as much as a thirty-token caption in
a mix of both; with token averaging the answers would be a few percent of the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmgpt.interfaces import ObjectiveOutput
from mmgpt.processor import IGNORE_INDEX, MultimodalBatch
from mmgpt.registry import register

__all__ = ["REDUCTIONS", "SFTObjective", "sample_mean_cross_entropy", "shifted_cross_entropy"]

REDUCTIONS = ("token", "sample")  # how the reply tokens' losses are averaged


def shifted_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, int, int]:
    """Sum of next-token losses, number of targets, number predicted right.

    ``logits`` (B, T, V) at position ``t`` are scored against ``labels[:, t + 1]`` (B, T).
    """
    logits = logits[:, :-1]  # (B, T-1, V): the last position predicts nothing
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    flat_logits = logits.float().reshape(-1, logits.size(-1))  # fp32 log-sum-exp
    flat_targets = targets.reshape(-1)
    loss_sum = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum"
    )
    mask = flat_targets != ignore_index
    n_tokens = int(mask.sum())
    with torch.no_grad():
        correct = int((flat_logits.argmax(-1)[mask] == flat_targets[mask]).sum())
    return loss_sum, n_tokens, correct


def sample_mean_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, int]:
    """Mean over the samples with a target of each sample's mean next-token loss, and their
    number (``logits`` (B, T, V) at ``t`` scored against ``labels[:, t + 1]``, as in
    :func:`shifted_cross_entropy`). A batch without any target gives a zero loss and 0."""
    logits = logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=ignore_index, reduction="none"
    )  # (B, T-1), 0 where ignored
    counts = (targets != ignore_index).sum(dim=1)
    scored = counts > 0
    n_samples = int(scored.sum())
    if n_samples == 0:
        return logits.sum() * 0.0, 0
    per_sample = losses.sum(dim=1)[scored] / counts[scored]
    return per_sample.mean(), n_samples


def check_reduction(objective: str, reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{objective} objective: the loss reduction must be one of {', '.join(REDUCTIONS)} "
            f"(token: every reply token weighs the same; sample: every sample), got "
            f"{reduction!r}"
        )
    return reduction


@register("objective", "sft")
class SFTObjective:
    """Cross-entropy of the labelled (reply) tokens, averaged over them.

    Args:
        reduction: ``token`` (default): the mean over every reply token of the batch;
            ``sample``: the mean over samples of each sample's mean (module docstring).

    Metrics: ``loss``, ``tokens`` (targets in the batch) and ``token_accuracy`` (fraction of
    targets that are the argmax prediction). A batch without any target token gives a zero
    loss of weight 0 (it contributes nothing to the step).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "token") -> None:
        self.ignore_index = ignore_index
        self.reduction = check_reduction("sft", reduction)

    def __call__(self, model: Any, batch: MultimodalBatch | Mapping[str, Any]) -> ObjectiveOutput:
        labels = _labels(batch)
        input_ids = batch.input_ids if isinstance(batch, MultimodalBatch) else batch["input_ids"]
        if input_ids.dim() != 2 or input_ids.size(1) < 2:
            raise ValueError(
                f"sft objective: input_ids must be (batch, time) with time >= 2, got "
                f"{tuple(input_ids.shape)}"
            )
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"sft objective: labels shape {tuple(labels.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        out = _forward(model, batch)
        logits = out.logits if hasattr(out, "logits") else out  # (B, T, V)
        loss_sum, n_tokens, correct = shifted_cross_entropy(logits, labels, self.ignore_index)
        loss, weight = loss_sum / max(n_tokens, 1), n_tokens
        if self.reduction == "sample":
            loss, weight = sample_mean_cross_entropy(logits, labels, self.ignore_index)
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "tokens": float(n_tokens),
                "token_accuracy": correct / n_tokens if n_tokens else 0.0,
            },
            weight=float(weight),
        )


def _labels(batch: MultimodalBatch | Mapping[str, Any]) -> Tensor:
    labels = batch.labels if isinstance(batch, MultimodalBatch) else batch.get("labels")
    if labels is None:
        raise ValueError(
            "sft objective: the batch has no labels; build it with the model's processor "
            "(labels on the assistant replies), not with prompt_batch"
        )
    return labels


def _attention_mask(mask: Tensor | None) -> Tensor | None:
    """The mask to run with: all ones for right padding (exact for every real position under
    causal attention, and it takes the decoder's fast causal path), else ``mask`` itself."""
    if mask is None:
        return None
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())
    return torch.ones_like(mask) if right_padded else mask


def _forward(model: Any, batch: MultimodalBatch | Mapping[str, Any]) -> Any:
    """The full-length logits of ``batch`` for a multimodal or a text model."""
    core = getattr(model, "module", model)  # DDP/FSDP wrappers hold the model as .module
    multimodal = hasattr(core, "embed") and hasattr(core, "encoders")
    if isinstance(batch, MultimodalBatch):
        mask = _attention_mask(batch.attention_mask)
        if multimodal:
            return model(batch, attention_mask=mask)
        if batch.images is not None:
            raise ValueError(
                f"sft objective: the batch has {batch.images.size(0)} image(s) but the model "
                f"({type(core).__name__}) has no image encoder"
            )
        others = sorted(getattr(batch, "modality_inputs", None) or {})
        if others:
            raise ValueError(
                f"sft objective: the batch has {', '.join(others)} inputs but the model "
                f"({type(core).__name__}) has no encoder for them"
            )
        return model(input_ids=batch.input_ids, attention_mask=mask)
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": _attention_mask(batch.get("attention_mask")),
    }
    if batch.get("images") is not None:
        if not multimodal:
            raise ValueError(
                f"sft objective: the batch has images but the model ({type(core).__name__}) "
                "has no image encoder"
            )
        kwargs.update(images=batch["images"], image_positions=batch.get("image_positions"))
    return model(**kwargs)
