"""DPO's reference log-probabilities: computed once, before training, and cached.

The reference policy never changes during DPO, so its sequence log-probabilities of each
pair's chosen and rejected answer are computed in one pass over the data
(:func:`compute_reference_logps`), kept in memory beside the dataset
(:class:`WithReferenceLogps`: items become ``(pair, tensor([ref_chosen, ref_rejected]))``,
which :class:`~mmgpt.rlhf.data.PreferenceCollator` puts into the batch) and written to the run
directory (:func:`cached_reference_logps`), so a resumed run reads them back instead of running
the reference model again. The file records a fingerprint of the data and of the reference
weights; a mismatch (other data, other starting model) recomputes rather than silently using
stale values.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mmgpt.adapters.directory import has_adapters
from mmgpt.adapters.lora import base_fingerprint
from mmgpt.files import CorruptCheckpointError, atomic_write_bytes, load_tensors, save_tensors
from mmgpt.rlhf.policy import ReferencePolicy, sequence_logps
from mmgpt.weights import model_state_dict

__all__ = [
    "WithReferenceLogps",
    "cached_reference_logps",
    "compute_reference_logps",
    "data_fingerprint",
]


def data_fingerprint(dataset: Any) -> str:
    """A digest of every pair's text and source (prompt, answers, file and line, images)."""
    digest = hashlib.sha256(f"n={len(dataset)};".encode())
    base, indices = dataset, None
    if isinstance(dataset, Subset):  # e.g. the recipe's train/held-out split of a file
        base, indices = dataset.dataset, list(dataset.indices)
    records = getattr(base, "records", None)
    if records is not None:  # file datasets: the records, without loading any image
        if indices is None:
            indices = range(len(records))
        for r in (records[i] for i in indices):
            entry = [str(r.data), r.file, r.line, [str(p) for p in r.image_paths]]
            digest.update(json.dumps(entry).encode())
        return digest.hexdigest()[:32]
    for i in range(len(dataset)):
        item = dataset[i]
        chosen, rejected = item.samples()
        parts = [[(t.role, t.text) for t in s.conversation] for s in (chosen, rejected)]
        sizes = [getattr(im, "size", None) for im in [*chosen.images, *rejected.images]]
        digest.update(json.dumps([parts, str(sizes), str(getattr(item, "meta", ""))]).encode())
    return digest.hexdigest()[:32]


def _model_fingerprint(model: nn.Module) -> str:
    """A digest of the reference weights (the base weights under LoRA adapters)."""
    if has_adapters(model):
        return base_fingerprint(model)
    digest = hashlib.sha256()
    for key, value in sorted(model_state_dict(model).items()):
        v = value.detach().double()
        stats = (v.sum().item(), v.abs().sum().item()) if v.numel() else (0.0, 0.0)
        digest.update(f"{key}:{tuple(v.shape)}:{stats[0]:.6e}:{stats[1]:.6e};".encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(
    reference: ReferencePolicy,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Tensor:
    """``(N, 2)`` float32: the reference's log-probabilities of (chosen, rejected) per pair."""
    out = []
    starts = range(0, len(dataset), batch_size)
    if progress:
        starts = tqdm(starts, desc="reference log-probs", leave=False)
    with reference.active() as ref:
        for start in starts:
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate_fn(items)
            logps = sequence_logps(ref, batch.pairs).float().cpu()  # (2B,)
            B = len(items)
            out.append(torch.stack([logps[:B], logps[B:]], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


def cached_reference_logps(
    reference: ReferencePolicy,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any],
    path: str | os.PathLike,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Tensor:
    """Reference log-probs read from ``path`` when it matches data and model, else computed
    and written there (atomically)."""
    path = Path(path)
    fingerprint = {
        "data": data_fingerprint(dataset),
        "model": _model_fingerprint(
            reference.copy if reference.copy is not None else reference.policy
        ),
    }
    if path.is_file():
        try:
            tensors = load_tensors(path)
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        except (CorruptCheckpointError, OSError, ValueError):
            meta, tensors = None, {}
        logps = tensors.get("reference_logps")
        if meta == fingerprint and logps is not None and logps.shape == (len(dataset), 2):
            return logps
    logps = compute_reference_logps(
        reference, dataset, collate_fn, batch_size=batch_size, progress=progress
    )
    save_tensors({"reference_logps": logps}, path, metadata={"format": "pt"})
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(fingerprint) + "\n").encode())
    return logps


class WithReferenceLogps(Dataset):
    """``dataset`` whose item ``i`` is ``(pair_i, logps[i])`` (a ``(2,)`` tensor)."""

    def __init__(self, dataset: Any, logps: Tensor) -> None:
        if logps.shape != (len(dataset), 2):
            raise ValueError(
                f"WithReferenceLogps: {len(dataset)} pairs but reference log-probs of shape "
                f"{tuple(logps.shape)} (expected ({len(dataset)}, 2))"
            )
        self.dataset = dataset
        self.logps = logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        return self.dataset[index], self.logps[index]
