"""The evaluation data behind ``--data``: datasets, the shapes-world spec, reply items.

Shared by ``--task caption|vqa`` (:mod:`mmgpt.eval.run`) and ``--task t2i``
(:mod:`mmgpt.eval.t2i`). ``data`` is

- an imagefolder directory (``metadata.jsonl`` / ``metadata.csv``), a LLaVA JSON (or a
  directory holding one), parquet files, a ``datasets`` directory (``save_to_disk``) or tar
  shards (read in order), detected with :func:`mmgpt.data.check.detect_format`;
- ``shapes`` or ``shapes:KEY=VALUE,...``: the synthetic shapes world, generated on the fly for
  the task. Defaults: ``seed=1`` (the training recipes train on seed 0), ``size=200``,
  ``image_size`` = the model's image-encoder input size; any other option of the ``shapes``
  dataset (``max_shapes``, ``min_shapes``, ``caption_prompt``…) is accepted, e.g.
  ``shapes:seed=7,size=500,max_shapes=1``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgpt.data.check import detect_format
from mmgpt.data.loaders import placeholder_of
from mmgpt.data.sample import IMAGE_PLACEHOLDER
from mmgpt.files import parse_scalar
from mmgpt.registry import create

__all__ = [
    "EVAL_FORMATS",
    "EVAL_TASKS",
    "SHAPES_DEFAULTS",
    "EvalItem",
    "eval_items",
    "load_eval_data",
    "parse_shapes_spec",
]

EVAL_TASKS = ("caption", "vqa")
# Dataset formats --data may hold (detected as `mmgpt data check` does).
EVAL_FORMATS = ("imagefolder", "llava", "parquet", "hf_dataset", "shards")
SHAPES_DEFAULTS: dict[str, Any] = {"seed": 1, "size": 200}


@dataclass
class EvalItem:
    """One reply to generate: the conversation before it, its images (and items of other
    modalities, ``{modality: [item, …]}``), the reference reply."""

    prompt: list[Any]  # turns, ending with a user turn
    images: list[Any]
    reference: str
    meta: dict[str, Any]
    inputs: dict[str, list[Any]] = field(default_factory=dict)


def parse_shapes_spec(spec: str) -> dict[str, Any] | None:
    """``"shapes"`` → ``{}``, ``"shapes:seed=7,size=200"`` → ``{"seed": 7, "size": 200}``;
    ``None`` when ``spec`` does not name the shapes world. Values are YAML scalars."""
    name, sep, rest = spec.partition(":")
    if name.strip() != "shapes":
        return None
    options: dict[str, Any] = {}
    for part in rest.split(",") if sep and rest.strip() else []:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"data spec {spec!r}: {part!r} is not KEY=VALUE "
                "(expected e.g. shapes:seed=7,size=200,image_size=32)"
            )
        options[key.strip()] = parse_scalar(value.strip())
    return options


def load_eval_data(data: str | os.PathLike, task: str, *, image_size: int | None = None) -> Any:
    """The dataset behind ``data`` (see the module docstring) for ``task``."""
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {', '.join(EVAL_TASKS)}, got {task!r}")
    spec = None if Path(data).exists() else parse_shapes_spec(str(data))
    if spec is not None:
        if "task" in spec:
            raise ValueError(
                f"data spec {data!r}: the task comes from --task ({task}), not from the spec"
            )
        options = {**SHAPES_DEFAULTS, "task": task, **spec}
        if image_size is not None:
            options.setdefault("image_size", image_size)
        if options.get("size") is None:
            raise ValueError(f"data spec {data!r}: evaluation needs a finite size")
        try:
            return create("dataset", "shapes", **options)
        except TypeError as exc:  # an unknown option
            raise ValueError(f"data spec {data!r}: {exc}") from exc
    fmt, target = detect_format(data)
    if fmt not in EVAL_FORMATS:
        raise ValueError(
            f"{data}: detected a {fmt} dataset; --task {task} evaluates image-text data "
            "(an imagefolder directory, a LLaVA JSON, parquet files, a datasets directory, "
            "tar shards, or 'shapes[:KEY=VALUE,...]')"
        )
    if fmt == "shards":  # streamed in the shards' order: the first --limit samples
        return create("dataset", fmt, path=str(target), shuffle_buffer=1)
    return create("dataset", fmt, path=str(target))


def eval_items(dataset: Any, limit: int | None = None) -> list[EvalItem]:
    """One item per assistant turn of the first ``limit`` samples (all by default); a
    streamed dataset (tar shards) is read in order up to ``limit`` samples."""
    if hasattr(dataset, "__len__"):
        n = len(dataset) if limit is None else min(limit, len(dataset))
        samples: Any = (dataset[index] for index in range(n))
    else:
        samples = itertools.islice(iter(dataset), limit)
    items = []
    for sample in samples:
        turns = list(sample.conversation)
        for j, turn in enumerate(turns):
            if turn.role != "assistant" or j == 0:
                continue
            prompt = turns[:j]
            if prompt[-1].role != "user":
                continue  # two replies in a row: only the first has a question
            n_images = sum(t.text.count(IMAGE_PLACEHOLDER) for t in prompt)
            inputs = {}  # the items of the placeholders before this reply
            for modality, values in (getattr(sample, "inputs", None) or {}).items():
                mark = placeholder_of(modality)
                inputs[modality] = list(values[: sum(t.text.count(mark) for t in prompt)])
            item = EvalItem(prompt, list(sample.images[:n_images]), turn.text, sample.meta, inputs)
            items.append(item)
    if not items:
        raise ValueError("the evaluation data has no assistant reply to compare with")
    return items
