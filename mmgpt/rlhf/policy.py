"""Log-probabilities of answers under a multimodal policy, and its frozen reference.

The widely used RLHF libraries (TRL, OpenRLHF…) compute these on a text-only Hugging Face
causal LM; mmgpt's policies read images, so the objectives compute them here on
:class:`~mmgpt.multimodal.MultimodalGPT`'s own forward pass (image features fused into the
prompt), with the sums and shifts of :mod:`mmgpt.rlhf.losses`.
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmgpt.adapters import adapters_disabled
from mmgpt.adapters.directory import has_adapters
from mmgpt.files import save_tensors
from mmgpt.processor import MultimodalBatch
from mmgpt.rlhf.losses import sequence_logprobs

__all__ = [
    "VALUE_HEAD",
    "ReferencePolicy",
    "has_adapters",
    "model_device",
    "save_policy",
    "sequence_logps",
]


VALUE_HEAD = "value_head.safetensors"  # beside a PPO policy's weights


def model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def sequence_logps(model: nn.Module, batch: MultimodalBatch) -> Tensor:
    """Sum of log π(answer token | prefix, images) over each row's labelled tokens: ``(B,)``.

    ``batch.labels`` mark the answer (the processor labels the assistant's reply and its
    ``<eos>``; prompt, image slots and padding are ``-100``).
    """
    if batch.labels is None:
        raise ValueError("sequence_logps: the batch has no labels marking the answers")
    device = model_device(model)
    batch = batch.to(device)
    logits = model(batch, attention_mask=_right_padded_mask(batch.attention_mask)).logits
    return sequence_logprobs(logits, batch.labels)  # (B,)


def _right_padded_mask(mask: Tensor) -> Tensor:
    """All ones for right-padded rows: under causal attention no real position sees the pads
    after it, and the decoder then takes its fast mask-free path; else ``mask`` itself."""
    right = bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())
    return torch.ones_like(mask) if right else mask


class ReferencePolicy:
    """The frozen policy that KL penalties and DPO compare against.

    With LoRA adapters on the policy the reference is the SAME module run with its adapters
    disabled (:func:`mmgpt.adapters.adapters_disabled`), so no second copy of the weights is
    held; otherwise a frozen deep copy taken now (before any training step), or, with
    ``copy=False``, the policy itself — for a caller that uses the reference before the policy
    changes (DPO precomputes every reference log-probability before training).
    ``with reference.active() as ref: ref(batch)`` runs it, in eval mode and without gradients.
    """

    def __init__(self, policy: nn.Module, *, copy: bool = True) -> None:
        self.policy = policy
        self.shared = has_adapters(policy)
        self.copy: nn.Module | None = None
        if copy and not self.shared:
            self.copy = _copy.deepcopy(policy).eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> ReferencePolicy:
        if self.copy is not None:
            self.copy.to(device)
        return self

    @contextmanager
    def active(self) -> Iterator[Any]:
        if self.copy is not None:
            with torch.no_grad():
                yield self.copy
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                if self.shared:
                    with adapters_disabled(self.policy):
                        yield self.policy
                else:
                    yield self.policy
        finally:
            self.policy.train(was_training)


def save_policy(model: nn.Module, directory: str | Path) -> None:
    """Write a trained policy's model directory.

    ``model`` is a MultimodalGPT, or a PPO actor-critic: its ``policy`` is saved and the value
    head goes to ``value_head.safetensors`` beside it. With LoRA adapters the directory holds
    the base weights (the reference policy) and the adapters under ``adapters/<name>/``
    (``MultimodalGPT.save_pretrained``), and loads back as the tuned policy.
    """
    directory = Path(directory)
    getattr(model, "policy", model).save_pretrained(directory)
    value_head = getattr(model, "value_head", None)
    if value_head is not None:
        save_tensors(
            {"weight": value_head.weight, "bias": value_head.bias},
            directory / VALUE_HEAD,
            metadata={"format": "pt"},
        )
