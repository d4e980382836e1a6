"""``--task t2i``: draw an image for each prompt and let a judge check the prompted attributes.

For every prompt ("draw a large red circle on the left") the model generates its reply; the
images of complete signal spans are decoded (:func:`mmgpt.imagegen.generate_images`) and the
first image of each reply is scored by the shapes judge (:mod:`mmgpt.eval.judge`, a CNN
trained on real rendered scenes only, cached by its config hash). Metrics (all 0–1):

- ``image_rate``: replies that drew an image (a reply without one counts as wrong below);
- ``accuracy``: per attribute the prompt names (``shape``, ``color``, ``size``, ``position``);
- ``shape_and_color``: both right — the headline figure; ``all_attributes``: every one right;
- ``diversity``: for the first ``diversity_prompts`` prompts, images drawn with
  ``diversity_seeds`` different seeds: ``pairwise_distance`` (mean RMS pixel distance in
  [0, 1] over all pairs of images of the same prompt; 0 = identical images) and
  ``judge_agreement`` (fraction of those pairs judged to have the same shape and colour);
- ``judge``: the judge's own accuracy on held-out real scenes (``heldout_accuracy``; the
  figures above mean little when its ``all`` is below ~0.95) and its cache ``hash``.

The judge knows one-shape scenes: prompts describing several shapes are skipped (counted in
``skipped``). ``data``: ``shapes[:KEY=VALUE,...]`` (one-shape drawing prompts of the shapes
world, seed 1 by default; the training recipes use seed 0), a text file with one prompt per
line, a JSONL file of ``{"prompt": ..., "scene": [...]?}``, or an imagefolder / LLaVA dataset
whose captions become ``"draw " + caption``. Attributes come from the sample's scene when it
has one, else from the prompt text (:func:`mmgpt.data.shapes.parse_caption`).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmgpt.data.shapes import parse_caption
from mmgpt.eval.data import SHAPES_DEFAULTS, eval_items, load_eval_data, parse_shapes_spec
from mmgpt.eval.judge import (
    ATTRIBUTES,
    JudgeConfig,
    ShapeJudge,
    images_to_tensor,
    load_or_train_judge,
)
from mmgpt.imagegen import ImageGenerationConfig, generate_images, require_image_generation
from mmgpt.multimodal import ARCHITECTURE, MultimodalGPT
from mmgpt.pretrained import require_architecture
from mmgpt.registry import create

__all__ = [
    "T2IPrompt",
    "evaluate_t2i",
    "load_t2i_prompts",
    "run_t2i_eval",
    "score_images",
]

DRAW_PREFIX = "draw "


@dataclass
class T2IPrompt:
    """A drawing prompt and the attributes its image must show (``{"shape": "circle", …}``)."""

    prompt: str
    target: dict[str, str]
    source: str = ""


def _target_from_scene(scene: Sequence[Mapping[str, Any]]) -> dict[str, str] | None:
    if len(scene) != 1:
        return None
    return {a: str(scene[0][a]) for a in ATTRIBUTES if scene[0].get(a) is not None}


def _target_from_text(text: str) -> dict[str, str] | None:
    body = text.strip()
    if body.lower().startswith(DRAW_PREFIX):
        body = body[len(DRAW_PREFIX) :]
    shapes = parse_caption(body)
    if len(shapes) != 1:
        return None
    return {a: v for a, v in shapes[0].items() if v is not None}


def load_t2i_prompts(
    data: str | os.PathLike, *, image_size: int | None = None, limit: int | None = None
) -> tuple[list[T2IPrompt], int]:
    """The one-shape drawing prompts behind ``data`` (module docstring) and how many
    multi-shape ones were skipped."""
    path = Path(data)
    spec = None if path.exists() else parse_shapes_spec(str(data))
    rows: list[tuple[str, dict[str, str] | None, str]] = []
    if spec is not None:
        rows = _shapes_rows(str(data), spec, image_size, limit)
    elif path.is_file() and path.suffix in (".txt", ".jsonl"):
        rows = _file_rows(path)
    elif path.exists():
        for item in eval_items(load_eval_data(path, "caption"), limit):
            scene = item.meta.get("scene")
            prompt = DRAW_PREFIX + item.reference.strip()
            target = _target_from_scene(scene) if scene else _target_from_text(prompt)
            rows.append((prompt, target, str(item.meta.get("source", path))))
    else:
        raise FileNotFoundError(
            f"{data}: no such file or directory (t2i data is 'shapes[:KEY=VALUE,...]', a .txt "
            "or .jsonl file of prompts, or an imagefolder / LLaVA dataset)"
        )
    if limit is not None:
        rows = rows[:limit]
    prompts = [T2IPrompt(p, t, s) for p, t, s in rows if t]
    skipped = len(rows) - len(prompts)
    if not prompts:
        raise ValueError(
            f"{data}: no one-shape drawing prompt to evaluate ({skipped} skipped: the judge "
            "scores scenes of one shape)"
        )
    return prompts, skipped


def _shapes_rows(
    spec_text: str, spec: dict[str, Any], image_size: int | None, limit: int | None
) -> list[tuple[str, dict[str, str] | None, str]]:
    if "task" in spec:
        raise ValueError(f"data spec {spec_text!r}: the task is t2i, not {spec['task']!r}")
    options = {**SHAPES_DEFAULTS, "max_shapes": 1, **spec, "task": "t2i"}
    if image_size is not None:
        options.setdefault("image_size", image_size)
    if limit is not None:
        options["size"] = min(int(options["size"]), limit)
    try:
        world = create("dataset", "shapes", **options)
    except TypeError as exc:
        raise ValueError(f"data spec {spec_text!r}: {exc}") from exc
    rows = []
    for i in range(len(world)):
        sample = world[i]
        rows.append(
            (
                sample.conversation[0].text,
                _target_from_scene(sample.meta["scene"]),
                sample.meta.get("source", ""),
            )
        )
    return rows


def _file_rows(path: Path) -> list[tuple[str, dict[str, str] | None, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.suffix == ".txt":
            rows.append((line.strip(), _target_from_text(line), where))
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{where}: expected an object with a "prompt" string')
        scene = record.get("scene")
        target = _target_from_scene(scene) if scene else _target_from_text(record["prompt"])
        rows.append((record["prompt"], target, where))
    return rows


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def score_images(
    judge: ShapeJudge, images: Sequence[Any | None], targets: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    """Judge ``images[i]`` (``None``: no image, wrong on every attribute) against ``targets[i]``."""
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images for {len(targets)} prompts")
    drawn = [i for i, im in enumerate(images) if im is not None]
    judged = judge.predict([images[i] for i in drawn]) if drawn else []
    verdicts: list[dict[str, str] | None] = [None] * len(images)
    for i, v in zip(drawn, judged):
        verdicts[i] = v
    hits = {a: 0 for a in ATTRIBUTES}
    asked = {a: 0 for a in ATTRIBUTES}
    both = every = 0
    for verdict, target in zip(verdicts, targets):
        right = {a: verdict is not None and verdict[a] == target[a] for a in target}
        for a, ok in right.items():
            asked[a] += 1
            hits[a] += ok
        both += right.get("shape", False) and right.get("color", False)
        every += all(right.values())
    n = len(targets)
    return {
        "num_prompts": n,
        "image_rate": len(drawn) / n,
        "accuracy": {a: hits[a] / asked[a] for a in ATTRIBUTES if asked[a]},
        "shape_and_color": both / n,
        "all_attributes": every / n,
        "verdicts": verdicts,
    }


def _diversity(judge: ShapeJudge, groups: Sequence[Sequence[Any]], image_size: int) -> dict:
    distances, agree = [], []
    for images in groups:
        if len(images) < 2:
            continue
        x = images_to_tensor(images, image_size)  # (S, 3, H, W)
        verdicts = judge.predict(x)
        for i, j in itertools.combinations(range(len(images)), 2):
            distances.append(float((x[i] - x[j]).pow(2).mean().sqrt()))
            same = all(verdicts[i][a] == verdicts[j][a] for a in ("shape", "color"))
            agree.append(float(same))
    if not distances:
        return {"pairwise_distance": None, "judge_agreement": None, "pairs": 0}
    return {
        "pairwise_distance": sum(distances) / len(distances),
        "judge_agreement": sum(agree) / len(agree),
        "pairs": len(distances),
    }


def evaluate_t2i(
    model: MultimodalGPT,
    prompts: Sequence[T2IPrompt],
    *,
    judge: ShapeJudge | None = None,
    judge_accuracy: Mapping[str, float] | None = None,
    judge_config: JudgeConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_config: ImageGenerationConfig | None = None,
    batch_size: int = 32,
    diversity_prompts: int = 8,
    diversity_seeds: int = 4,
    force_image: bool = False,
    num_examples: int = 5,
) -> dict[str, Any]:
    """Generate, judge and summarise (module docstring). ``judge`` defaults to the cached judge
    of ``judge_config`` (default: the whole shapes world at the decoder's image size)."""
    require_image_generation(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    image_size = int(model.image_decoder.image_size)
    if judge is None:
        judge_config = judge_config or JudgeConfig(image_size=image_size)
        judge, judge_accuracy = load_or_train_judge(judge_config, cache_dir=cache_dir)
    image_config = image_config or ImageGenerationConfig(seed=0)
    seed = image_config.seed if image_config.seed is not None else 0
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        firsts: list[Any | None] = []
        for i in range(0, len(prompts), batch_size):
            chunk = [[{"role": "user", "text": p.prompt}] for p in prompts[i : i + batch_size]]
            drawn = generate_images(
                model, chunk, image_config, seeds=[seed], force_image=force_image
            )[0]
            firsts += [images[0] if images else None for images in drawn]
        elapsed = time.perf_counter() - start
        groups: list[list[Any]] = []
        if diversity_prompts > 0 and diversity_seeds > 1:
            chunk = [[{"role": "user", "text": p.prompt}] for p in prompts[:diversity_prompts]]
            seeds = [seed + 1000 + s for s in range(diversity_seeds)]
            per_seed = generate_images(
                model, chunk, image_config, seeds=seeds, force_image=force_image
            )
            for row in range(len(chunk)):
                groups.append([imgs[row][0] for imgs in per_seed if imgs[row]])
    finally:
        model.train(was_training)
    scores = score_images(judge, firsts, [p.target for p in prompts])
    verdicts = scores.pop("verdicts")
    n_images = sum(im is not None for im in firsts)
    result: dict[str, Any] = {
        **scores,
        "diversity": _diversity(judge, groups, image_size),
        "judge": {
            "heldout_accuracy": dict(judge_accuracy or {}),
            "hash": judge.config.hash(),
        },
        "sampling": {
            "steps": image_config.steps,
            "sampler": image_config.sampler,
            "guidance_scale": image_config.guidance_scale,
            "seconds_per_prompt": elapsed / len(prompts),
            "images": n_images,
        },
        "examples": [
            {"prompt": p.prompt, "target": p.target, "judged": v}
            for p, v in list(zip(prompts, verdicts))[:num_examples]
        ],
    }
    return result


def run_t2i_eval(
    model_dir: str | os.PathLike,
    data: str | os.PathLike = "shapes",
    *,
    batch_size: int = 32,
    limit: int | None = None,
    device: str = "auto",
    steps: int = 20,
    guidance_scale: float = 3.0,
    sampler: str = "dpm",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``mmgpt eval --task t2i``: load the model in ``model_dir`` and :func:`evaluate_t2i` it
    on ``data``. Returns a JSON-ready dict (``task``, ``data``, ``model``, ``skipped`` + the
    metrics); ``options`` go to :func:`evaluate_t2i`."""
    require_architecture(model_dir, ARCHITECTURE, "--task t2i")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MultimodalGPT.from_pretrained(model_dir, map_location=device).eval()
    if model.image_decoder is None:
        raise ValueError(f"{model_dir}: the model has no image decoder; --task t2i needs one")
    prompts, skipped = load_t2i_prompts(
        data, image_size=int(model.image_decoder.image_size), limit=limit
    )
    image_config = ImageGenerationConfig(
        steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed
    )
    metrics = evaluate_t2i(
        model,
        prompts,
        image_config=image_config,
        batch_size=batch_size,
        cache_dir=cache_dir,
        **options,
    )
    return {
        "task": "t2i",
        "data": str(data),
        "model": str(model_dir),
        "skipped": skipped,
        **metrics,
    }
