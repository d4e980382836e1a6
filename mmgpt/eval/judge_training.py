"""``mmgpt train judge``: an :class:`~mmgpt.eval.judge.ImageJudge` trained on the user's own
labelled images, to score what a text-to-image model draws from the same kind of data.

The data is an imagefolder. Each *attribute* the judge predicts has one *label source*:

- ``folder``: the name of the directory that holds the image (``red/0001.png`` → ``red``),
  Hugging Face's class-subfolder convention; the folder needs no metadata file then;
- any other name: a field of the metadata rows (``metadata.jsonl`` / ``metadata.csv``), e.g.
  ``label``, or ``color`` and ``kind`` for a judge of two attributes.

``data.labels`` lists the sources (``[color, kind]``); left out, it is ``[label]`` when every
metadata row has a ``label`` field, else ``[folder]`` when the images lie in class subfolders.
Every attribute needs at least two labels. A share of the rows (``data.eval_fraction``, drawn
with the run's seed) is held out; the judge's accuracy on it is written into ``judge.json``
beside the weights and is the ceiling of every figure the judge gives.

This module supplies the parts; :func:`mmgpt.recipe.run.run_judge` trains them with the one
:class:`~mmgpt.trainer.Trainer` (progress bar, ``metrics.jsonl``, checkpoints, an atomic final
directory).
"""

from __future__ import annotations

import csv
import io
import os
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmgpt.data.imagefolder import METADATA_NAMES, find_metadata_files
from mmgpt.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image
from mmgpt.data.records import DataError, RecordError, iter_jsonl, outside_root
from mmgpt.eval.judge import (
    ImageJudge,
    augment,
    images_to_tensor,
    judge_accuracy,
    judge_loss,
    save_judge,
)
from mmgpt.interfaces import ObjectiveOutput

__all__ = [
    "FOLDER",
    "JUDGE_SECTION_KEYS",
    "JudgeObjective",
    "LabelledImages",
    "LabelledRow",
    "build_judge_parts",
    "read_labelled_rows",
    "resolve_label_sources",
    "row_label",
]

FOLDER = "folder"
# The keys of a judge recipe's sections (model.architecture=judge): the network, the data
# (an imagefolder and where its labels come from), the augmentation of the objective.
JUDGE_MODEL_KEYS = ("architecture", "image_size", "width", "hidden", "dropout")
JUDGE_DATA_KEYS = ("name", "path", "labels", "eval_fraction", "max_pixels", "allow_outside_root")
JUDGE_OBJECTIVE_KEYS = ("name", "noise", "jitter", "shift", "flip")
JUDGE_SECTION_KEYS = {
    "model": JUDGE_MODEL_KEYS,
    "data": JUDGE_DATA_KEYS,
    "objective": JUDGE_OBJECTIVE_KEYS,
    "tokenizer": (),
}


@dataclass
class LabelledRow:
    """One image of the folder: its path, its metadata row (``{}`` without metadata) and
    where it was read (``file:line``)."""

    image: Path
    meta: dict[str, Any]
    where: str


def row_label(row: LabelledRow, source: str) -> str:
    """The label of ``row`` from ``source`` (``folder`` or a metadata field), as text."""
    if source == FOLDER:
        return row.image.parent.name
    if source not in row.meta or row.meta[source] in (None, ""):
        raise DataError(f"{row.where}: no {source!r} field (the label of the judge's attribute)")
    value = row.meta[source]
    if isinstance(value, (dict, list)):
        raise DataError(f"{row.where}: field {source!r} must be a label, got {value!r:.80}")
    return str(value)


def _metadata_rows(meta_file: Path, base: Path, allow_outside_root: bool) -> list[LabelledRow]:
    if meta_file.suffix == ".jsonl":
        lines: Any = iter_jsonl(meta_file)
    else:
        try:
            text = meta_file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{meta_file}: not UTF-8 ({exc.reason})") from None
        lines = enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2)
    rows = []
    for line, record in lines:
        where = f"{meta_file}:{line}"
        if isinstance(record, RecordError):
            raise DataError(f"{where}: {record}")
        if not isinstance(record, dict):
            raise DataError(f"{where}: a metadata row must be an object")
        name = record.get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: needs a 'file_name' string, got {name!r:.80}")
        image = meta_file.parent / name
        if not image.is_file():
            raise DataError(f"{where}: image {image} not found")
        leaving = outside_root(base, [image])
        if leaving and not allow_outside_root:
            raise DataError(f"{where}: {leaving[0]} (data.allow_outside_root=true accepts it)")
        rows.append(LabelledRow(image, dict(record), where))
    return rows


def read_labelled_rows(
    path: str | os.PathLike, *, allow_outside_root: bool = False
) -> list[LabelledRow]:
    """The images of an imagefolder with their metadata rows; a folder without metadata
    gives every image under it (class subfolders), sorted, with empty rows."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (judge data is an imagefolder)")
    base = root.resolve()
    if any(p.is_file() for name in METADATA_NAMES for p in root.rglob(name)):
        rows = []
        for meta_file in find_metadata_files(root):
            rows += _metadata_rows(meta_file, base, allow_outside_root)
    else:
        images = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        rows = [LabelledRow(p, {}, str(p)) for p in images]
    if not rows:
        raise DataError(f"{root}: no images found (an imagefolder or class subfolders of images)")
    return rows


def resolve_label_sources(rows: Sequence[LabelledRow], labels: Any, data: str) -> list[str]:
    """``data.labels`` as a list of sources (module docstring), checked against the rows."""
    if labels in (None, "auto"):
        if all(row.meta.get("label") not in (None, "") for row in rows):
            return ["label"]
        # class subfolders: the images lie in several directories (captions may sit beside)
        if len({r.image.parent for r in rows}) > 1:
            return [FOLDER]
        raise ValueError(
            f"{data}: no labels found; name them with data.labels=[FIELD,...] (metadata fields, "
            f"or '{FOLDER}' for the images' directory names), give every metadata row a "
            "'label' field, or put the images in class subfolders"
        )
    sources = [labels] if isinstance(labels, str) else labels
    if (
        not isinstance(sources, (list, tuple))
        or not sources
        or not all(isinstance(s, str) and s for s in sources)
        or len(set(sources)) != len(sources)
    ):
        raise ValueError(
            f"data.labels must be a field name or a list of distinct field names (or "
            f"'{FOLDER}'), got {labels!r}"
        )
    return list(sources)


class LabelledImages(Dataset):
    """Images ``(N, 3, S, S)`` in [0, 1] and their class indices ``(N, A)``; an item is
    ``(image, labels)``, so ``default_collate`` batches them."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.size(0)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def label_dict(self, attributes: Sequence[str]) -> dict[str, Tensor]:
        return {a: self.labels[:, j] for j, a in enumerate(attributes)}


class JudgeObjective:
    """Cross-entropy of every head (:func:`~mmgpt.eval.judge.judge_loss`) on augmented
    images (:func:`~mmgpt.eval.judge.augment`); ``accuracy_<attribute>`` and ``accuracy``
    (every head right) as metrics."""

    def __init__(
        self,
        attributes: Sequence[str],
        *,
        noise: float = 0.08,
        jitter: float = 0.06,
        shift: int = 2,
        flip: bool = False,
    ) -> None:
        for name, value in (("noise", noise), ("jitter", jitter), ("shift", shift)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"objective.{name} must be a number >= 0, got {value!r}")
        if shift != int(shift):
            raise ValueError(f"objective.shift must be a whole number of pixels, got {shift!r}")
        if not isinstance(flip, bool):
            raise ValueError(f"objective.flip must be true or false, got {flip!r}")
        self.attributes = tuple(attributes)
        self.noise, self.jitter, self.shift, self.flip = (
            float(noise),
            float(jitter),
            int(shift),
            flip,
        )

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> ObjectiveOutput:
        images, labels = batch
        if model.training:  # the trainer seeds the global generator
            images = augment(
                images, noise=self.noise, jitter=self.jitter, shift=self.shift, flip=self.flip
            )
        logits = model(images)
        targets = {a: labels[:, j] for j, a in enumerate(self.attributes)}
        every = torch.ones(images.size(0), dtype=torch.bool, device=images.device)
        metrics: dict[str, float] = {"samples": float(images.size(0))}
        for a in self.attributes:
            hit = logits[a].argmax(-1) == targets[a]
            every &= hit
            metrics[f"accuracy_{a}"] = float(hit.float().mean())
        metrics["accuracy"] = float(every.float().mean())
        return ObjectiveOutput(judge_loss(logits, targets), metrics, weight=float(images.size(0)))


@dataclass
class JudgeParts:
    """What ``run_judge`` trains: the network, its objective, the data, the writer of the
    final directory (which measures the held-out accuracy first)."""

    model: ImageJudge
    objective: JudgeObjective
    train_data: LabelledImages
    eval_data: LabelledImages | None
    save_fn: Callable[[nn.Module, Path], None]
    data_section: dict[str, Any]


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 <= fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {fraction!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def build_judge_parts(
    spec: Mapping[str, Any], data: str | os.PathLike | None, seed: int
) -> JudgeParts:
    """The parts of a judge recipe (``model``, ``data``, ``objective`` sections), reading and
    labelling the imagefolder at ``data`` (or ``data.path``)."""
    data_section = {k: v for k, v in spec["data"].items() if k != "name"}
    if spec["data"].get("name") != "imagefolder":
        raise ValueError(
            f"a judge recipe reads data.name=imagefolder, got {spec['data']['name']!r}"
        )
    if spec["objective"].get("name") != "judge":
        raise ValueError(f"a judge recipe trains objective.name=judge, got {spec['objective']!r}")
    if data is not None:
        data_section["path"] = str(data)
    path = data_section.get("path")
    if not path:
        raise ValueError("no training data: pass --data IMAGEFOLDER (or set data.path)")
    model_args = {k: v for k, v in spec["model"].items() if k != "architecture"}
    image_size = int(model_args.get("image_size", 32))
    rows = read_labelled_rows(path, allow_outside_root=bool(data_section.get("allow_outside_root")))
    sources = resolve_label_sources(rows, data_section.get("labels"), str(path))
    data_section["labels"] = sources
    names = [[row_label(row, s) for s in sources] for row in rows]
    vocab: dict[str, tuple[str, ...]] = {}
    for j, source in enumerate(sources):
        vocab[source] = tuple(sorted({n[j] for n in names}))
        if len(vocab[source]) < 2:
            raise ValueError(
                f"{path}: attribute {source!r} has one label ({vocab[source][0]!r}) over all "
                f"{len(rows)} images; a judge needs at least two labels per attribute"
            )
    index = torch.tensor([[vocab[s].index(n[j]) for j, s in enumerate(sources)] for n in names])
    max_pixels = data_section.get("max_pixels", DEFAULT_MAX_PIXELS)
    pictures = [load_image(row.image, max_pixels=max_pixels) for row in rows]
    images = images_to_tensor(pictures, image_size, crop=True)
    train_idx, eval_idx = _split(len(rows), float(data_section.get("eval_fraction", 0.2)), seed)
    train = LabelledImages(images[train_idx], index[train_idx])
    held = LabelledImages(images[eval_idx], index[eval_idx]) if eval_idx else None
    model = ImageJudge(vocab, **model_args)
    objective_args = {k: v for k, v in spec["objective"].items() if k != "name"}
    objective = JudgeObjective(sources, **objective_args)
    counts = {s: dict(Counter(n[j] for n in names)) for j, s in enumerate(sources)}
    info = {
        "label_sources": sources,
        "label_counts": counts,
        "data": str(path),
        "num_train": len(train_idx),
        "num_heldout": len(eval_idx),
    }

    def save_fn(judge: nn.Module, directory: Path) -> None:
        assert isinstance(judge, ImageJudge)
        accuracy = judge_accuracy(judge, held.images, held.label_dict(sources)) if held else None
        save_judge(judge, directory, {**info, "heldout_accuracy": accuracy})

    return JudgeParts(model, objective, train, held, save_fn, data_section)
