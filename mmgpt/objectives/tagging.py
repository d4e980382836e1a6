"""Supervised pretraining of an encoder on labelled items (objective ``"tagging"``).

Each item (an image, or a plugin modality's item) carries named labels; the model predicts
every one of them from the encoder's tokens, one classification head per label. It is the
supervised counterpart of the ``clip`` recipe's contrastive stage, for data that has labels
(vision towers are commonly pretrained this way).

- **Labels.** ``labels: cells`` is the shapes world's dense label set
  (:func:`mmgpt.data.shapes.cell_labels`: the shape, colour and size in each of its 9 grid
  cells, ``none`` where a cell is empty), read from each sample's ``meta["scene"]``. A list of
  names, ``labels: [color, kind]``, reads those fields of each sample's ``meta``: an
  imagefolder's extra metadata columns land there. The classes of a named label are the values
  the training and evaluation data hold, sorted.
- **Heads.** Each label has a learned query that attends over the encoder's tokens (one
  multi-head attention shared by all labels), then its own small MLP classifier. Mean pooling
  (the contrastive towers') averages away *where* things are; a query per label lets the label
  "top left/shape" read the tokens of that cell, so the encoder's tokens are trained to keep
  per-region detail — what a language model reading those tokens needs.
- **Loss.** The mean over labels of each label's cross-entropy (a label whose value is not
  one of its known classes counts for nothing). Metrics: ``accuracy`` (over labels and
  items) and ``all_correct`` (items with every label right); no per-label figures, which
  for the 27 cell labels would flood the log.

:meth:`TaggingObjective.build_trainer` is what ``mmgpt train tagging`` runs. The saved model
directory is the backbone MultimodalGPT's (so ``model.encoder.from=DIR`` and
``model.from=DIR`` start other recipes from the trained encoder; the GPT and projectors are
not trained here), plus the heads:

    tagging_head.safetensors   the queries, the attention and the classifiers
    tagging_config.json        {"architecture": "tagging", "format_version": 1,
                                "modality": "image", "classes": {label: [class, ...]}, ...}
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import IterableDataset, Subset

from mmgpt.data.records import record_meta
from mmgpt.data.sample import Sample
from mmgpt.data.shapes import cell_label_classes, cell_labels
from mmgpt.head_directory import HeadDirectory
from mmgpt.interfaces import ObjectiveOutput
from mmgpt.multimodal import MultimodalGPT
from mmgpt.processor import IGNORE_INDEX  # a label without a known class: no loss, no accuracy
from mmgpt.registry import register
from mmgpt.rlhf.data import fields_to
from mmgpt.trainer import Trainer

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from mmgpt.trainer import TrainConfig

__all__ = [
    "CELLS",
    "TaggingBatch",
    "TaggingCollator",
    "TaggingModel",
    "TaggingObjective",
    "label_classes",
    "sample_labels",
]

CELLS = "cells"  # the shapes world's per-cell labels
HEAD_NAME = "tagging_head.safetensors"
CONFIG_NAME = "tagging_config.json"
ARCHITECTURE = "tagging"
FORMAT_VERSION = 1


def _source(sample: Sample, index: int) -> str:
    return str((sample.meta or {}).get("source", f"sample {index}"))


def check_label_names(labels: Any) -> str | list[str]:
    """``labels`` as given in the recipe: ``"cells"`` or a non-empty list of field names."""
    if labels == CELLS:
        return CELLS
    if isinstance(labels, str):
        labels = [labels]
    if (
        not isinstance(labels, (list, tuple))
        or not labels
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ValueError(
            f"tagging objective: labels must be '{CELLS}' (the shapes world's cells) or a list "
            f"of distinct metadata field names, e.g. [color, kind]; got {labels!r}"
        )
    return list(labels)


def sample_labels(sample: Sample, labels: str | Sequence[str], index: int = 0) -> dict[str, str]:
    """The labels of one sample (module docstring), as strings."""
    meta = sample.meta or {}
    if labels == CELLS:
        if "scene" not in meta:
            raise ValueError(
                f"tagging objective: {_source(sample, index)} has no shapes scene "
                f"(meta['scene']); labels: {CELLS} is for the shapes world; name your data's "
                "label fields instead, e.g. objective.labels=[color,kind]"
            )
        return cell_labels(meta["scene"])
    missing = [name for name in labels if meta.get(name) in (None, "")]
    if missing:
        raise ValueError(
            f"tagging objective: {_source(sample, index)} has no {', '.join(map(repr, missing))} "
            f"field; every item needs each of objective.labels={list(labels)} in its metadata"
        )
    return {name: str(meta[name]) for name in labels}


def _metas(dataset: Any) -> Iterator[tuple[Sample, int]]:
    """Each item as a sample whose ``meta`` holds its labels: from the dataset's records (no
    item loaded) where it keeps them, also through a ``Subset``; else the items themselves."""
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, list(dataset.indices)
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "tagging objective: named labels need a dataset whose items can be counted "
            "(imagefolder, LLaVA JSON, parquet), not a stream: the classes are read first"
        )
    indices = range(len(dataset)) if indices is None else indices
    records = getattr(dataset, "records", None)
    for i in indices:
        yield (Sample([], meta=record_meta(records[i])) if records is not None else dataset[i]), i


def label_classes(labels: str | Sequence[str], datasets: Sequence[Any]) -> dict[str, list[str]]:
    """Every label's classes: fixed for ``cells``, else the values in ``datasets``, sorted."""
    if labels == CELLS:
        return cell_label_classes()
    values: dict[str, set[str]] = {name: set() for name in labels}
    for dataset in datasets:
        if dataset is None:
            continue
        for sample, i in _metas(dataset):
            for name, value in sample_labels(sample, labels, i).items():
                values[name].add(value)
    few = [name for name, v in values.items() if len(v) < 2]
    if few:
        raise ValueError(
            f"tagging objective: label(s) {few} take fewer than 2 values in the data; a "
            "classifier needs at least two classes"
        )
    return {name: sorted(v) for name, v in values.items()}


# -- batches ------------------------------------------------------------------------------------
@dataclass
class TaggingBatch:
    """``inputs`` (B, …): the encoder's preprocessed items; ``targets`` (B, L): each label's
    class index (``-100`` where the item's value is not a known class)."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.size(0))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaggingBatch:
        """A copy with every tensor on ``device``."""
        return fields_to(self, device, non_blocking)


class TaggingCollator:
    """Samples (one item of ``modality`` each, with labels) → a :class:`TaggingBatch`."""

    def __init__(
        self,
        encoder: Any,
        classes: Mapping[str, Sequence[str]],
        labels: str | Sequence[str],
        *,
        modality: str = "image",
    ) -> None:
        self.encoder = encoder
        self.labels = labels
        self.modality = modality
        self.names = list(classes)
        self.index = {name: {c: k for k, c in enumerate(cs)} for name, cs in classes.items()}

    def __call__(self, samples: Sequence[Sample]) -> TaggingBatch:
        items, rows = [], []
        for i, sample in enumerate(samples):
            found = (
                sample.images if self.modality == "image" else sample.inputs.get(self.modality, [])
            )
            if len(found) != 1:
                raise ValueError(
                    f"tagging objective: {_source(sample, i)} has {len(found)} {self.modality} "
                    "item(s); each labelled sample needs exactly one"
                )
            items.append(found[0])
            values = sample_labels(sample, self.labels, i)
            rows.append([self.index[n].get(values[n], IGNORE_INDEX) for n in self.names])
        return TaggingBatch(
            inputs=self.encoder.preprocess(items), targets=torch.tensor(rows, dtype=torch.long)
        )


# -- the model ----------------------------------------------------------------------------------
class TaggingModel(HeadDirectory, nn.Module):
    """A MultimodalGPT ``backbone`` whose encoder for ``modality`` feeds one classification head
    per label (module docstring). ``classes`` maps each label to its class names."""

    head_file, config_file = HEAD_NAME, CONFIG_NAME
    architecture, kind, recipe = ARCHITECTURE, "tagging model", "tagging"

    def __init__(
        self,
        backbone: MultimodalGPT,
        classes: Mapping[str, Sequence[str]],
        *,
        modality: str = "image",
        attention_heads: int = 4,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if modality not in backbone.encoders:
            raise ValueError(
                f"tagging objective: the model has no {modality!r} encoder "
                f"(it has: {', '.join(backbone.encoders) or 'none'})"
            )
        if not classes or any(len(c) < 2 for c in classes.values()):
            raise ValueError(f"tagging objective: each label needs >= 2 classes, got {classes!r}")
        d = int(backbone.encoders[modality].output_dim)
        for name, value in (("attention_heads", attention_heads), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tagging objective: {name} must be an int >= 1, got {value!r}")
        if d % attention_heads:
            raise ValueError(
                f"tagging objective: attention_heads={attention_heads} must divide the encoder's "
                f"width {d}"
            )
        self.backbone = backbone
        self.modality = modality
        self.classes = {str(k): [str(c) for c in v] for k, v in classes.items()}
        self.attention_heads = attention_heads
        self.hidden = hidden
        L, C = len(self.classes), max(len(c) for c in self.classes.values())
        self.queries = nn.Parameter(torch.randn(L, d) * 0.02)  # (L, d)
        self.attention = nn.MultiheadAttention(d, attention_heads, batch_first=True)
        # every label's classifier (LayerNorm → Linear → GELU → Linear) as stacked weights, so
        # that 27 labels cost one batched matmul rather than 27 small modules' launches
        self.norm = nn.LayerNorm(d, elementwise_affine=False)  # then each label's own affine
        self.norm_weight = nn.Parameter(torch.ones(L, d))
        self.norm_bias = nn.Parameter(torch.zeros(L, d))
        self.hidden_weight = nn.Parameter(torch.randn(L, d, hidden) * d**-0.5)
        self.hidden_bias = nn.Parameter(torch.zeros(L, hidden))
        self.out_weight = nn.Parameter(torch.randn(L, hidden, C) * hidden**-0.5)
        self.out_bias = nn.Parameter(torch.zeros(L, C))
        # labels with fewer classes than the widest: their padding columns never win
        counts = torch.tensor([len(c) for c in self.classes.values()])
        self.register_buffer(
            "padding", torch.arange(C)[None, :] >= counts[:, None], persistent=False
        )  # (L, C) bool
        # only the encoder and the heads are reached by the loss (DDP wants a gradient for
        # every trainable parameter, and nothing else should decay): the rest of the backbone
        # is frozen
        encoder = {id(p) for p in self.encoder.parameters()}
        for p in self.backbone.parameters():
            if id(p) not in encoder:
                p.requires_grad_(False)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoders[self.modality]

    @property
    def device(self) -> torch.device:
        return self.queries.device

    @property
    def tied_weight_keys(self) -> list[str]:
        return [f"backbone.{k}" for k in getattr(self.backbone, "tied_weight_keys", [])]

    def collator(self, labels: str | Sequence[str]) -> TaggingCollator:
        return TaggingCollator(self.encoder, self.classes, labels, modality=self.modality)

    def forward(self, inputs: Tensor) -> Tensor:
        """Preprocessed items → logits ``(B, L, C)``: label ``j``'s classes in its first
        ``len(classes[j])`` columns, the padding columns at ``-1e4``."""
        tokens = self.encoder(inputs)  # (B, K, d)
        queries = self.queries.unsqueeze(0).expand(tokens.size(0), -1, -1)  # (B, L, d)
        pooled, _ = self.attention(queries, tokens, tokens, need_weights=False)  # (B, L, d)
        x = self.norm(pooled) * self.norm_weight + self.norm_bias  # (B, L, d)
        x = F.gelu(torch.einsum("bld,ldh->blh", x, self.hidden_weight) + self.hidden_bias)
        logits = torch.einsum("blh,lhc->blc", x, self.out_weight) + self.out_bias  # (B, L, C)
        return logits.masked_fill(self.padding, -1e4)

    # -- checkpoints ------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "architecture": ARCHITECTURE,
            "format_version": FORMAT_VERSION,
            "modality": self.modality,
            "attention_heads": self.attention_heads,
            "hidden": self.hidden,
            "classes": self.classes,
        }

    @classmethod
    def _from_config(cls, backbone: MultimodalGPT, config: Mapping[str, Any]) -> TaggingModel:
        return cls(
            backbone,
            config["classes"],
            modality=config["modality"],
            attention_heads=config["attention_heads"],
            hidden=config["hidden"],
        )

    @torch.no_grad()
    def predict(self, items: Sequence[Any]) -> list[dict[str, str]]:
        """Raw items (e.g. PIL images) → each item's predicted class of every label."""
        picks = self(self.encoder.preprocess(list(items)).to(self.device)).argmax(-1).tolist()
        names = list(self.classes)
        return [{n: self.classes[n][row[j]] for j, n in enumerate(names)} for row in picks]


# -- the objective ------------------------------------------------------------------------------
@register("objective", "tagging")
class TaggingObjective:
    """Cross-entropy of every label head of a :class:`TaggingModel`.

    Args:
        labels: ``"cells"`` (the shapes world's 27 per-cell labels) or metadata field names.
        attention_heads: heads of the attention pooling (must divide the encoder's width).
        hidden: width of each label's classifier MLP.
        modality: the encoder trained.

    Metrics: ``loss``, ``accuracy`` (labels × items), ``all_correct`` (items with every label
    right), ``items``; ``weight`` is the number of items.
    """

    def __init__(
        self,
        labels: Any = CELLS,
        attention_heads: int = 4,
        hidden: int = 128,
        modality: str = "image",
    ) -> None:
        self.labels = check_label_names(labels)
        self.attention_heads = attention_heads
        self.hidden = hidden
        self.modality = modality

    def __call__(self, model: Any, batch: TaggingBatch) -> ObjectiveOutput:
        if not isinstance(batch, TaggingBatch):
            raise TypeError(
                f"tagging objective: expected a TaggingBatch (collate with "
                f"TaggingModel.collator()), got {type(batch).__name__}"
            )
        logits = model(batch.inputs).float()  # (B, L, C)
        targets = batch.targets  # (B, L)
        known = targets != IGNORE_INDEX  # (B, L)
        per_label = known.sum(dim=0)  # (L,) items with a known class
        if not bool(per_label.any()):
            raise ValueError("tagging objective: no item of the batch has a known label class")
        nll = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)  # (B, L), 0 where unknown
        # each label's mean over its items, then the mean over the labels present
        present = per_label > 0
        loss = (nll.sum(dim=0)[present] / per_label[present]).mean()
        with torch.no_grad():
            right = logits.argmax(-1) == targets  # (B, L)
            accuracy = (right & known).sum() / known.sum().clamp(min=1)
            all_correct = (right | ~known).all(dim=1).float().mean()
        n = len(batch)
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "loss": float(loss.detach()),
                "accuracy": float(accuracy),
                "all_correct": float(all_correct),
                "items": float(n),
            },
            weight=float(n),
        )

    def wrap(
        self, model: MultimodalGPT | TaggingModel, datasets: Sequence[Any] = ()
    ) -> TaggingModel:
        """``model`` itself when it is a TaggingModel, else heads for the labels of
        ``datasets`` around it."""
        if isinstance(model, TaggingModel):
            return model
        if not isinstance(model, MultimodalGPT):
            raise TypeError(
                "tagging objective: expected a MultimodalGPT (model.architecture: multimodal) "
                f"or a TaggingModel, got {type(model).__name__}"
            )
        return TaggingModel(
            model,
            label_classes(self.labels, datasets),
            modality=self.modality,
            attention_heads=self.attention_heads,
            hidden=self.hidden,
        )

    def build_trainer(
        self,
        model: MultimodalGPT | TaggingModel,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> Trainer:
        """A Trainer for the label heads around ``model`` (``truncation`` is unused: no text)."""
        wrapped = self.wrap(model, (train_data, eval_data))
        return Trainer(
            wrapped,
            self,
            train_data,
            config,
            eval_data=eval_data,
            collate_fn=wrapped.collator(self.labels),
            out_dir=out_dir,
        )
