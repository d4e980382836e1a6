"""``--task t2i``: draw an image for each prompt and measure the drawings.

**Your own images** (``--data`` an imagefolder; :func:`evaluate_t2i_folder`). Each row with a
caption is a drawing sample exactly as ``data.task=t2i`` trains it: the prompt is the caption
through ``prompt_template`` (by default the one the model's training run used, read from
the ``recipe.yaml`` beside its ``model/``). The model draws one image per prompt, and:

- ``judge`` (with ``--judge DIR`` from ``mmgpt train judge``): ``accuracy`` of the judge's
  prediction on the drawing against the row's label(s), per attribute and ``all``; beside it
  ``chance`` (drawings whose labels ignore the prompt but follow the data's label
  frequencies: Σ p²), ``majority`` (always the commonest label), ``real_accuracy`` (the judge
  on the real images of the same rows, at the decoder's resolution: the ceiling) and
  ``heldout_accuracy`` (the judge on its own held-out images, from ``judge.json``);
- ``clip`` (with ``--clip DIR``, :mod:`mmgpt.eval.clip_score`): the mean CLIP score of each
  drawing against its caption (``generated``), of the real image (``real``: the ceiling) and
  of another row's real image (``shuffled_real``: the floor);
- ``distribution`` (always, :mod:`mmgpt.eval.image_stats`): per-channel mean/std, colour
  histogram distance, Fréchet distance (on the judge's features, else CLIP's, else 8×8
  pixels) and diversity of the drawings against the real images.

**The shapes world** (:func:`evaluate_t2i`): for every prompt ("draw a large red circle on
the left") the first image of the reply is scored by the shapes judge (:mod:`mmgpt.eval.judge`,
a CNN trained on real rendered scenes only, cached by its config hash). Metrics (all 0–1):

- ``image_rate``: replies that drew an image (a reply without one counts as wrong below);
- ``accuracy``: per attribute the prompt names (``shape``, ``color``, ``size``, ``position``);
- ``shape_and_color``: both right — the headline figure; ``all_attributes``: every one right;
- ``diversity``: for the first ``diversity_prompts`` prompts, images drawn with
  ``diversity_seeds`` different seeds: ``pairwise_distance`` (mean RMS pixel distance in
  [0, 1] over all pairs of images of the same prompt; 0 = identical images) and
  ``judge_agreement`` (fraction of those pairs judged to have the same shape and colour);
- ``judge``: the judge's own accuracy on held-out real scenes (``heldout_accuracy``; the
  figures above mean little when its ``all`` is below ~0.95) and its cache ``hash``.

The shapes judge knows one-shape scenes: prompts describing several shapes are skipped
(counted in ``skipped``). ``data``: ``shapes[:KEY=VALUE,...]`` (one-shape drawing prompts of
the shapes world, seed 1 by default; the training recipes use seed 0), a text file with one
prompt per line, a JSONL file of ``{"prompt": ..., "scene": [...]?}``, or a LLaVA dataset
whose captions become ``"draw " + caption``. Attributes come from the sample's scene when it
has one, else from the prompt text (:func:`mmgpt.data.shapes.parse_caption`).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mmgpt.data.check import detect_format
from mmgpt.data.imagefolder import DEFAULT_PROMPT_TEMPLATE
from mmgpt.data.shapes import parse_caption
from mmgpt.eval.clip_score import ClipScorer, clip_scores
from mmgpt.eval.data import SHAPES_DEFAULTS, eval_items, load_eval_data, parse_shapes_spec
from mmgpt.eval.image_stats import distribution_report
from mmgpt.eval.judge import (
    ATTRIBUTES,
    ImageJudge,
    JudgeConfig,
    ShapeJudge,
    images_to_tensor,
    load_judge,
    load_or_train_judge,
)
from mmgpt.eval.judge_training import LabelledRow, row_label
from mmgpt.imagegen import ImageGenerationConfig, generate_images, require_image_generation
from mmgpt.multimodal import ARCHITECTURE, MultimodalGPT
from mmgpt.pretrained import require_architecture
from mmgpt.registry import create

__all__ = [
    "DrawingRow",
    "T2IPrompt",
    "evaluate_t2i",
    "evaluate_t2i_folder",
    "load_drawing_rows",
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


def _first_images(
    model: Any,
    prompts: list[str],
    image_config: ImageGenerationConfig,
    seed: int,
    batch_size: int,
    force_image: bool,
) -> list[Any | None]:
    """One drawing per prompt (``None`` where the model drew none), ``batch_size`` at a time."""
    drawn: list[Any | None] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [[{"role": "user", "text": p}] for p in prompts[i : i + batch_size]]
        out = generate_images(model, chunk, image_config, seeds=[seed], force_image=force_image)
        drawn += [images[0] if images else None for images in out[0]]
    return drawn


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
        texts = [p.prompt for p in prompts]
        firsts = _first_images(model, texts, image_config, seed, batch_size, force_image)
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


# --------------------------------------------------------------------------------------
# The user's own drawings: an imagefolder, a judge trained on its labels, a CLIP model
# --------------------------------------------------------------------------------------


@dataclass
class DrawingRow:
    """A row of an imagefolder seen as a drawing task: the prompt the t2i recipe trained on,
    the caption (the text CLIP compares with), the real image and the row's labels."""

    prompt: str
    caption: str
    image: Any
    labels: dict[str, str] | None
    source: str


def training_prompt_template(model_dir: str | os.PathLike) -> str | None:
    """``data.prompt_template`` of the run that trained ``model_dir`` (its ``recipe.yaml``
    sits beside ``model/``): the default ``{text}`` for an imagefolder run without one,
    ``draw {text}`` for a shapes-world run (its prompts are ``"draw " + caption``), None
    when no run recipe is found or the run trained on other data."""
    recipe = Path(model_dir).parent / "recipe.yaml"
    if not recipe.is_file():
        return None
    try:
        spec = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{recipe}: invalid YAML ({exc})") from exc
    data = spec.get("data") if isinstance(spec, dict) else None
    if isinstance(data, dict) and data.get("name") == "shapes":
        return DRAW_PREFIX + "{text}"
    if not isinstance(data, dict) or data.get("name") != "imagefolder":
        return None
    return str(data.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)


def load_drawing_rows(
    data: str | os.PathLike,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    *,
    label_sources: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[DrawingRow]:
    """The drawing samples of the imagefolder ``data`` as ``data.task=t2i`` makes them (the
    caption through ``prompt_template``; rows with ``conversations`` whose assistant turn
    holds the image), with the labels ``label_sources`` name (``folder`` or fields)."""
    dataset = create(
        "dataset", "imagefolder", path=str(data), task="t2i", prompt_template=prompt_template
    )
    rows: list[DrawingRow] = []
    for index in range(len(dataset)):
        if limit is not None and len(rows) >= limit:
            break
        sample = dataset[index]
        if not sample.output_images or sample.conversation[0].role != "user":
            continue  # not a drawing: nothing to compare a generated image with
        meta = sample.meta
        where = f"{meta.get('source', data)}:{meta.get('line', '?')}"
        labels = None
        if label_sources:
            image_path = Path(str(meta.get("source", data))).parent / str(meta.get("file_name"))
            row = LabelledRow(image_path, meta, where)
            labels = {s: row_label(row, s) for s in label_sources}
        prompt = sample.conversation[0].text
        caption = meta.get("text") if isinstance(meta.get("text"), str) else prompt
        rows.append(DrawingRow(prompt, caption, sample.output_images[0], labels, where))
    if not rows:
        raise ValueError(
            f"{data}: no drawing samples (rows with 'text', or conversations whose "
            "assistant turn holds the image)"
        )
    return rows


def _chance(targets: Sequence[Mapping[str, str]], attributes: Sequence[str]) -> dict[str, dict]:
    """Baselines of drawings that ignore the prompt: ``chance`` (drawn labels independent of
    the prompt, distributed as in the data: Σ p²) and ``majority`` (always the commonest)."""
    out: dict[str, dict[str, float]] = {"chance": {}, "majority": {}}
    keys = [*attributes, "all"]
    for key in keys:
        values = [tuple(t[a] for a in attributes) if key == "all" else t[key] for t in targets]
        freq = [c / len(values) for c in Counter(values).values()]
        out["chance"][key] = sum(f * f for f in freq)
        out["majority"][key] = max(freq)
    return out


def _judge_accuracy(
    verdicts: Sequence[Mapping[str, str] | None],
    targets: Sequence[Mapping[str, str]],
    attributes: Sequence[str],
) -> dict[str, float]:
    hits = {a: 0 for a in attributes}
    every = 0
    for verdict, target in zip(verdicts, targets):
        right = [verdict is not None and verdict[a] == target[a] for a in attributes]
        for a, ok in zip(attributes, right):
            hits[a] += ok
        every += all(right)
    n = len(targets)
    return {**{a: hits[a] / n for a in attributes}, "all": every / n}


def _check_judge_labels(
    judge: ImageJudge, rows: Sequence[DrawingRow], judge_path: str | os.PathLike
) -> None:
    for row in rows:
        for attribute, label in (row.labels or {}).items():
            if label not in judge.labels[attribute]:
                raise ValueError(
                    f"--judge {judge_path}: {row.source} has {attribute}={label!r}, a label the "
                    f"judge was not trained on (it knows {', '.join(judge.labels[attribute])}); "
                    "train the judge on this data's labels (mmgpt train judge --data ...)"
                )


def _derangement(n: int, seed: int) -> list[int]:
    """A permutation with no fixed point: each image moves to another row's caption."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    target = [0] * n
    for i in range(n):  # one step along a shuffled cycle through every row
        target[order[i]] = order[(i + 1) % n]
    return target


def evaluate_t2i_folder(
    model: MultimodalGPT,
    rows: Sequence[DrawingRow],
    *,
    judge: ImageJudge | None = None,
    judge_meta: Mapping[str, Any] | None = None,
    clip: ClipScorer | None = None,
    image_config: ImageGenerationConfig | None = None,
    batch_size: int = 32,
    force_image: bool = False,
    num_examples: int = 5,
) -> dict[str, Any]:
    """Draw each row's prompt and compare with the real images (module docstring of
    :mod:`mmgpt.eval.image_stats`; judge and CLIP figures when given)."""
    require_image_generation(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    size = int(model.image_decoder.image_size)
    image_config = image_config or ImageGenerationConfig(seed=0)
    seed = image_config.seed if image_config.seed is not None else 0
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        texts = [r.prompt for r in rows]
        drawn = _first_images(model, texts, image_config, seed, batch_size, force_image)
        elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    present = [i for i, im in enumerate(drawn) if im is not None]
    # real images as the decoder trains on them: centre square, resized to its size
    real = images_to_tensor([r.image for r in rows], size, crop=True)
    generated = images_to_tensor([drawn[i] for i in present], size)
    result: dict[str, Any] = {"num_prompts": len(rows), "image_rate": len(present) / len(rows)}
    features = None
    examples = [{"prompt": r.prompt, "target": r.labels} for r in rows[:num_examples]]
    if judge is not None:
        attributes = judge.attributes
        targets = [r.labels or {} for r in rows]
        # both sets at the decoder's resolution, then at the judge's input size
        judge_generated = images_to_tensor([drawn[i] for i in present], judge.image_size)
        judge_real = images_to_tensor(_to_pil(real), judge.image_size)
        generated_verdicts = judge.predict(judge_generated) if present else []
        verdicts: list[dict[str, str] | None] = [None] * len(rows)
        for i, v in zip(present, generated_verdicts):
            verdicts[i] = v
        meta = dict(judge_meta or {})
        result["judge"] = {
            "accuracy": _judge_accuracy(verdicts, targets, attributes),
            **_chance(targets, attributes),
            "real_accuracy": _judge_accuracy(judge.predict(judge_real), targets, attributes),
            "heldout_accuracy": meta.get("heldout_accuracy"),
            "attributes": list(attributes),
        }
        for example, verdict in zip(examples, verdicts):
            example["judged"] = verdict
        features = ("judge", judge.embed(judge_generated), judge.embed(judge_real))
    if clip is not None:
        texts = [r.caption for r in rows]
        text_embeds = clip.embed_texts(texts)
        # the real images at the decoder's resolution: the model cannot draw finer detail
        real_embeds = clip.embed_images(_to_pil(real))
        gen_embeds = clip.embed_images([drawn[i] for i in present])
        generated_scores = torch.zeros(len(rows))  # a prompt without an image scores 0
        if present:
            generated_scores[present] = clip_scores(gen_embeds, text_embeds[present])
        real_scores = clip_scores(real_embeds, text_embeds)
        section: dict[str, Any] = {
            "generated": float(generated_scores.mean()),
            "real": float(real_scores.mean()),
            "shuffled_real": None,
            "text": "caption",
        }
        if len(rows) >= 2:
            moved = _derangement(len(rows), seed)
            section["shuffled_real"] = float(clip_scores(real_embeds[moved], text_embeds).mean())
        result["clip"] = section
        for example, score in zip(examples, generated_scores.tolist()):
            example["clip_score"] = score
        if features is None and present:
            features = ("clip", gen_embeds, real_embeds)
    result["distribution"] = (
        distribution_report(generated, real, features=features) if present else None
    )
    result["sampling"] = {
        "steps": image_config.steps,
        "sampler": image_config.sampler,
        "guidance_scale": image_config.guidance_scale,
        "seconds_per_prompt": elapsed / len(rows),
        "images": len(present),
    }
    result["examples"] = examples
    return result


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).byte().numpy()
    return [Image.fromarray(a) for a in arrays]


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
    judge_dir: str | os.PathLike | None = None,
    clip_dir: str | os.PathLike | None = None,
    prompt_template: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``mmgpt eval --task t2i``: load the model in ``model_dir`` and evaluate it on ``data``.

    An imagefolder goes to :func:`evaluate_t2i_folder` (``judge_dir``: a judge from ``mmgpt
    train judge``; ``clip_dir``: a local CLIP model; ``prompt_template``: default the one
    the model's training run used); anything else to :func:`evaluate_t2i` with the shapes
    judge. Returns a JSON-ready dict (``task``, ``data``, ``model`` + the metrics);
    ``options`` go to the evaluation function."""
    require_architecture(model_dir, ARCHITECTURE, "--task t2i")
    folder = _is_imagefolder(data)
    if not folder and (judge_dir is not None or clip_dir is not None or prompt_template):
        raise ValueError(
            f"{data}: --judge, --clip and --prompt-template evaluate an imagefolder of your own "
            "images; the shapes world and prompt files are scored by the shapes judge"
        )
    if prompt_template is not None and "{text}" not in prompt_template:
        raise ValueError(
            f"--prompt-template must hold '{{text}}' (where the caption goes), got "
            f"{prompt_template!r}"
        )
    # everything the user named is checked before the model loads and draws
    judge = judge_meta = clip = None
    if judge_dir is not None:
        judge, judge_meta = load_judge(judge_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if clip_dir is not None:
        clip = ClipScorer(clip_dir, device=device)
    image_config = ImageGenerationConfig(
        steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed
    )
    if folder:
        origin = "--prompt-template"
        if prompt_template is None:
            prompt_template = training_prompt_template(model_dir)
            origin = "the training run's recipe.yaml"
        if prompt_template is None:
            prompt_template, origin = DEFAULT_PROMPT_TEMPLATE, "default"
        sources = None
        if judge is not None:
            sources = list((judge_meta or {}).get("label_sources") or judge.attributes)
        rows = load_drawing_rows(data, prompt_template, label_sources=sources, limit=limit)
        if judge is not None:
            _check_judge_labels(judge, rows, judge_dir)
        model = _load_drawing_model(model_dir, device)
        metrics = evaluate_t2i_folder(
            model,
            rows,
            judge=judge,
            judge_meta=judge_meta,
            clip=clip,
            image_config=image_config,
            batch_size=batch_size,
            **options,
        )
        if judge is not None:
            metrics["judge"]["dir"] = str(judge_dir)
        if clip is not None:
            metrics["clip"]["dir"] = str(clip_dir)
        return {
            "task": "t2i",
            "data": str(data),
            "model": str(model_dir),
            "prompt_template": {"template": prompt_template, "from": origin},
            **metrics,
        }
    model = _load_drawing_model(model_dir, device)
    prompts, skipped = load_t2i_prompts(
        data, image_size=int(model.image_decoder.image_size), limit=limit
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


def _is_imagefolder(data: str | os.PathLike) -> bool:
    path = Path(data)
    if not path.is_dir():
        return False
    fmt, _ = detect_format(path)
    return fmt == "imagefolder"


def _load_drawing_model(model_dir: str | os.PathLike, device: str) -> MultimodalGPT:
    model = MultimodalGPT.from_pretrained(model_dir, map_location=device).eval()
    if model.image_decoder is None:
        raise ValueError(f"{model_dir}: the model has no image decoder; --task t2i needs one")
    return model
