"""``mmgpt eval --task caption|vqa``: generate answers for a dataset and score them.

``run_eval(model_dir, data, task)`` loads a :class:`~mmgpt.multimodal.MultimodalGPT`, answers
every assistant turn of the data greedily (the turns before it, with their images, are the
prompt; batched with left padding) and returns a JSON-ready dict of metrics:

- ``caption``: ``exact_match`` (0–1, normalised), ``bleu`` (0–100, sacrebleu corpus BLEU) and,
  where samples carry a shapes-world scene, ``attributes``: accuracy of shape, color, size,
  position and count (:mod:`mmgpt.eval.caption`).
- ``vqa``: ``exact_match`` overall and ``per_type`` (:mod:`mmgpt.eval.vqa`).

``--task choice`` (multiple-choice questions, text or multimodal models) goes to
:func:`mmgpt.eval.choice.run_choice_eval`, ``--task t2i`` to :func:`mmgpt.eval.t2i.run_t2i_eval`,
``--task preferences`` (win rates in a preference file; no model) to
:func:`mmgpt.eval.preferences.preference_report` and ``--task reward`` (a reward model's
accuracy on a preference file) to :func:`mmgpt.eval.reward.reward_report`.

``data`` is an imagefolder, a LLaVA JSON or ``shapes[:KEY=VALUE,...]``
(:mod:`mmgpt.eval.data`, which also holds the helpers this module re-exports).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from mmgpt.eval.caption import caption_metrics
from mmgpt.eval.choice import run_choice_eval
from mmgpt.eval.data import EVAL_TASKS, EvalItem, eval_items, load_eval_data, parse_shapes_spec
from mmgpt.eval.preferences import preference_report
from mmgpt.eval.reward import reward_report
from mmgpt.eval.t2i import run_t2i_eval
from mmgpt.eval.vqa import infer_question_type, vqa_metrics
from mmgpt.generation import GenerationConfig
from mmgpt.multimodal import ARCHITECTURE, MultimodalGPT
from mmgpt.pretrained import require_architecture

__all__ = [
    "EVAL_TASKS",
    "EvalItem",
    "eval_items",
    "load_eval_data",
    "parse_shapes_spec",
    "run_eval",
]

NUM_EXAMPLES = 5


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def generate_replies(
    model: MultimodalGPT,
    items: Sequence[EvalItem],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy replies to the items' prompts, ``batch_size`` prompts at a time."""
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
            len(
                processor.encode_prompt(
                    item.prompt, item.images, inputs=item.inputs, index=start + i
                ).input_ids
            )
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
        out = model.generate(
            [i.prompt for i in chunk],
            [i.images for i in chunk],
            config,
            inputs=[i.inputs for i in chunk],
        )
        replies += list(out.texts)
    return replies


def run_eval(
    model_dir: str | os.PathLike | None,
    data: str | os.PathLike,
    task: str = "caption",
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    device: str = "auto",
    num_examples: int = NUM_EXAMPLES,
    shots: int | None = None,
) -> dict[str, Any]:
    """Evaluate the multimodal model in ``model_dir`` on ``data`` for ``task``.

    Args:
        model_dir: a directory written by ``MultimodalGPT.save_pretrained`` (e.g. ``run/model``);
            a reward model directory for ``"reward"``; ``None`` (and only then) for
            ``"preferences"``.
        data: an imagefolder dir, a LLaVA JSON, or ``shapes[:KEY=VALUE,...]``.
        task: ``"caption"`` or ``"vqa"`` (``"t2i"`` goes to :func:`mmgpt.eval.t2i.run_t2i_eval`,
            ``"choice"`` to :func:`mmgpt.eval.choice.run_choice_eval`, for any model;
            ``"preferences"`` and ``"reward"`` as the module docstring says).
        batch_size: prompts generated together (default 16).
        max_new_tokens: longest reply (default 64; also capped by the model's context).
        limit: evaluate the first ``limit`` samples only.
        device: ``auto``, ``cpu``, ``cuda``…
        num_examples: how many (prompt, prediction, reference) examples to include.
        shots: ``choice`` only: k-shot examples before each question (default 0).

    Returns a JSON-ready dict: ``task``, ``data``, ``model``, ``num_samples`` (replies scored),
    the task's metrics (module docstring) and ``examples``.
    """
    if shots is not None and task != "choice":
        raise ValueError(f"--shots applies to --task choice, not {task}")
    if task in ("preferences", "reward"):
        unused = {"max_new_tokens": max_new_tokens, "limit": limit}
        if task == "preferences":
            unused["batch_size"] = batch_size
        named = [f"--{k.replace('_', '-')}" for k, v in unused.items() if v is not None]
        if named:
            raise ValueError(f"{', '.join(named)} does not apply to --task {task}")
        if task == "preferences":
            if model_dir is not None:
                raise ValueError("--task preferences reads only --data; leave out --model")
            return preference_report(data)
        if model_dir is None:
            raise ValueError("--task reward needs --model (a reward model directory)")
        return reward_report(
            model_dir,
            data,
            batch_size=16 if batch_size is None else batch_size,
            device=_resolve_device(device),
        )
    if model_dir is None:
        raise ValueError(f"--task {task} needs --model")
    if task == "choice":
        if max_new_tokens is not None:
            raise ValueError("--max-new-tokens applies to --task caption and vqa, not choice")
        return run_choice_eval(
            model_dir,
            data,
            shots=shots or 0,
            limit=limit,
            batch_size=16 if batch_size is None else batch_size,
            device=_resolve_device(device),
            num_examples=num_examples,
        )
    if task == "t2i":
        if max_new_tokens is not None:
            raise ValueError("max_new_tokens applies to --task caption and vqa, not t2i")
        options = {"batch_size": batch_size} if batch_size is not None else {}
        return run_t2i_eval(model_dir, data, limit=limit, device=device, **options)
    if task not in EVAL_TASKS:
        raise ValueError(
            "task must be one of "
            f"{', '.join((*EVAL_TASKS, 't2i', 'choice', 'preferences', 'reward'))}, got {task!r}"
        )
    batch_size = 16 if batch_size is None else batch_size
    max_new_tokens = 64 if max_new_tokens is None else max_new_tokens
    require_architecture(model_dir, ARCHITECTURE, f"--task {task}")
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
