"""``mmgpt eval --task caption|vqa``: generate answers for a dataset and score them.

``run_eval(model_dir, data, task)`` loads a :class:`~mmgpt.multimodal.MultimodalGPT`, answers
every assistant turn of the data greedily (the turns before it, with their images, are the
prompt; batched with left padding) and returns a JSON-ready dict of metrics:

- ``caption``: ``exact_match`` (0–1, normalised), ``bleu`` (0–100, sacrebleu corpus BLEU) and,
  where samples carry a shapes-world scene, ``attributes``: accuracy of shape, color, size,
  position and count (:mod:`mmgpt.eval.caption`).
- ``vqa``: ``exact_match`` overall and ``per_type`` (:mod:`mmgpt.eval.vqa`).

``data`` is

- an imagefolder directory (``metadata.jsonl`` / ``metadata.csv``) or a LLaVA JSON (or a
  directory holding one), detected with :func:`mmgpt.data.check.detect_format`;
- ``shapes`` or ``shapes:KEY=VALUE,...``: the synthetic shapes world, generated on the fly for
  the task. Defaults: ``seed=1`` (the training recipes train on seed 0), ``size=200``,
  ``image_size`` = the model's image-encoder input size; any other option of the ``shapes``
  dataset (``max_shapes``, ``min_shapes``, ``caption_prompt``…) is accepted, e.g.
  ``shapes:seed=7,size=500,max_shapes=1``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EVAL_TASKS",
    "EvalItem",
    "eval_items",
    "load_eval_data",
    "parse_shapes_spec",
    "run_eval",
]

EVAL_TASKS = ("caption", "vqa")
SHAPES_DEFAULTS: dict[str, Any] = {"seed": 1, "size": 200}
NUM_EXAMPLES = 5


@dataclass
class EvalItem:
    """One reply to generate: the conversation before it, its images, the reference reply."""

    prompt: list[Any]  # turns, ending with a user turn
    images: list[Any]
    reference: str
    meta: dict[str, Any]


def parse_shapes_spec(spec: str) -> dict[str, Any] | None:
    """``"shapes"`` → ``{}``, ``"shapes:seed=7,size=200"`` → ``{"seed": 7, "size": 200}``;
    ``None`` when ``spec`` does not name the shapes world. Values are YAML scalars."""
    from mmgpt.recipe import parse_scalar

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
    from mmgpt.data.check import detect_format
    from mmgpt.registry import create

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
    if fmt not in ("imagefolder", "llava"):
        raise ValueError(
            f"{data}: detected a {fmt} dataset; --task {task} evaluates image-text data "
            "(an imagefolder directory, a LLaVA JSON, or 'shapes[:KEY=VALUE,...]')"
        )
    return create("dataset", fmt, path=str(target))


def eval_items(dataset: Any, limit: int | None = None) -> list[EvalItem]:
    """One item per assistant turn of the first ``limit`` samples (all by default)."""
    from mmgpt.data.sample import IMAGE_PLACEHOLDER

    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = []
    for index in range(n):
        sample = dataset[index]
        turns = list(sample.conversation)
        for j, turn in enumerate(turns):
            if turn.role != "assistant" or j == 0:
                continue
            prompt = turns[:j]
            if prompt[-1].role != "user":
                continue  # two replies in a row: only the first has a question
            n_images = sum(t.text.count(IMAGE_PLACEHOLDER) for t in prompt)
            items.append(EvalItem(prompt, list(sample.images[:n_images]), turn.text, sample.meta))
    if not items:
        raise ValueError("the evaluation data has no assistant reply to compare with")
    return items


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def generate_replies(
    model: Any, items: Sequence[EvalItem], *, batch_size: int = 16, max_new_tokens: int = 64
) -> list[str]:
    """Greedy replies to the items' prompts, ``batch_size`` prompts at a time."""
    from mmgpt.generation import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size and max_new_tokens must be positive, got {batch_size}, {max_new_tokens}"
        )
    processor = model.processor()
    block_size = model.config.block_size
    replies: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        lengths = [
            len(processor.encode_prompt(item.prompt, item.images, index=start + i).input_ids)
            for i, item in enumerate(chunk)
        ]
        room = block_size - max(lengths)
        if room < 1:
            worst = start + lengths.index(max(lengths))
            raise ValueError(
                f"evaluation item {worst} ({chunk[worst - start].meta.get('source', 'sample')}): "
                f"its prompt has {max(lengths)} tokens, leaving no room in the model's context "
                f"(block_size={block_size})"
            )
        config = GenerationConfig(
            max_new_tokens=min(max_new_tokens, room), temperature=0.0, do_sample=False
        )
        out = model.generate([i.prompt for i in chunk], [i.images for i in chunk], config)
        replies += list(out.texts)
    return replies


def run_eval(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    task: str = "caption",
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    device: str = "auto",
    num_examples: int = NUM_EXAMPLES,
) -> dict[str, Any]:
    """Evaluate the multimodal model in ``model_dir`` on ``data`` for ``task``.

    Args:
        model_dir: a directory written by ``MultimodalGPT.save_pretrained`` (e.g. ``run/model``).
        data: an imagefolder dir, a LLaVA JSON, or ``shapes[:KEY=VALUE,...]``.
        task: ``"caption"`` or ``"vqa"`` (``"t2i"`` goes to :func:`mmgpt.eval.t2i.run_t2i_eval`).
        batch_size: prompts generated together (default 16).
        max_new_tokens: longest reply (default 64; also capped by the model's context).
        limit: evaluate the first ``limit`` samples only.
        device: ``auto``, ``cpu``, ``cuda``…
        num_examples: how many (prompt, prediction, reference) examples to include.

    Returns a JSON-ready dict: ``task``, ``data``, ``model``, ``num_samples`` (replies scored),
    the task's metrics (module docstring) and ``examples``.
    """
    from mmgpt.checkpoint import read_model_config
    from mmgpt.eval.caption import caption_metrics
    from mmgpt.eval.vqa import infer_question_type, vqa_metrics
    from mmgpt.multimodal import ARCHITECTURE, MultimodalGPT

    if task == "t2i":
        from mmgpt.eval.t2i import run_t2i_eval

        if max_new_tokens is not None:
            raise ValueError("max_new_tokens applies to --task caption and vqa, not t2i")
        options = {"batch_size": batch_size} if batch_size is not None else {}
        return run_t2i_eval(model_dir, data, limit=limit, device=device, **options)
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {', '.join((*EVAL_TASKS, 't2i'))}, got {task!r}")
    batch_size = 16 if batch_size is None else batch_size
    max_new_tokens = 64 if max_new_tokens is None else max_new_tokens
    architecture = read_model_config(Path(model_dir)).get("architecture", "gpt")
    if architecture != ARCHITECTURE:
        raise ValueError(
            f"{model_dir}: --task {task} needs a multimodal model, this one is {architecture!r}"
        )
    model = MultimodalGPT.from_pretrained(model_dir, map_location=_resolve_device(device)).eval()
    encoder = dict(model.encoders.items()).get("image")
    input_size = getattr(encoder, "input_size", None)
    dataset = load_eval_data(data, task, image_size=input_size[-1] if input_size else None)
    items = eval_items(dataset, limit)
    predictions = generate_replies(
        model, items, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    references = [item.reference for item in items]

    result: dict[str, Any] = {
        "task": task,
        "data": str(data),
        "model": str(model_dir),
        "num_samples": len(items),
    }
    if task == "caption":
        scenes = [item.meta.get("scene") for item in items]
        result.update(caption_metrics(predictions, references, scenes))
    else:
        types = [
            item.meta.get("question_type") or infer_question_type(item.prompt[-1].text)
            for item in items
        ]
        result.update(vqa_metrics(predictions, references, types))
    result["examples"] = [
        {
            "prompt": item.prompt[-1].text,
            "prediction": prediction,
            "reference": item.reference,
        }
        for item, prediction in list(zip(items, predictions))[:num_examples]
    ]
    return result
