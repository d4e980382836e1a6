"""Programmatic preferences in the shapes world: right captions beat almost-right ones.

For a scene of :mod:`mmgpt.data.shapes`, the *chosen* answer is its caption (right in every
attribute) and the *rejected* one the caption of a corrupted scene that differs in exactly one
way: a shape's colour, a shape's kind, a shape's position, or the number of shapes (one added
or, with several, one dropped). Preferences are therefore decidable only by looking at the
image — exactly what a multimodal reward model or DPO has to learn.

``write_shapes_preferences(dir, n)`` writes ``preferences.jsonl`` + ``images/`` in the
preference JSONL format (``prompt``, ``image``, ``chosen``, ``rejected``; ``corruption`` and
``scene`` kept as metadata), which also serves as PPO prompt data (``"prompts"`` dataset).

A reward model trained on those pairs learns to tell the right caption from ONE corruption of
it, which is not what PPO asks of it: PPO climbs toward whatever caption the reward model
scores highest among everything the policy can say. ``write_shapes_reward_data(dir, n)``
writes ranked lists instead — per image the right caption, captions wrong in one to three
attributes (size included) and, given a ``policy``, that policy's own sampled captions — each
ranked by :func:`caption_errors`, the programmatic preference (fewer wrong attributes is
better; a caption off the grammar is worst). Every ordered pair of a list is a training pair
(:func:`mmgpt.data.preference.ranked_pairs`), so the reward model also learns that partly
right beats more wrong: a graded reward over the answers PPO will actually sample.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmgpt.data.shapes import (
    COLORS,
    KINDS,
    POSITIONS,
    SIZES,
    Shape,
    ShapesWorld,
    caption,
    parse_caption,
)

__all__ = [
    "ATTRIBUTE_CORRUPTIONS",
    "CORRUPTIONS",
    "MALFORMED_ERRORS",
    "caption_errors",
    "corrupt_attributes",
    "corrupt_scene",
    "shapes_preference",
    "shapes_ranked_answers",
    "write_shapes_preferences",
    "write_shapes_reward_data",
]

CORRUPTIONS = ("color", "shape", "position", "count")
# what corrupt_attributes may change: the pair corruptions plus a shape's size (the pairs of
# write_shapes_preferences never change the size, so a reward model trained on them ignores it)
ATTRIBUTE_CORRUPTIONS = (*CORRUPTIONS, "size")
_ATTRIBUTES = ("shape", "color", "size", "position")
# caption_errors of a caption off the grammar: above the 4 errors per shape of any well-formed
# caption in a world of nine cells
MALFORMED_ERRORS = 4 * len(POSITIONS) + 1


def corrupt_scene(
    scene: Sequence[Shape],
    kind: str,
    rng: random.Random,
    *,
    kinds: Sequence[str] = KINDS,
    colors: Sequence[str] = tuple(COLORS),
    sizes: Sequence[str] = SIZES,
    positions: Sequence[str] = POSITIONS,
) -> list[Shape] | None:
    """``scene`` changed in one ``kind`` of way (see :data:`CORRUPTIONS`); ``None`` when the
    scene leaves no room for it (e.g. every colour already used with that kind)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {kind!r}")
    shapes = list(scene)
    pairs = {(s.color, s.shape) for s in shapes}
    cells = {s.position for s in shapes}
    i = rng.randrange(len(shapes))
    s = shapes[i]
    if kind == "color":
        options = [c for c in colors if c != s.color and (c, s.shape) not in pairs]
        if not options:
            return None
        shapes[i] = Shape(s.shape, rng.choice(options), s.size, s.position)
    elif kind == "shape":
        options = [k for k in kinds if k != s.shape and (s.color, k) not in pairs]
        if not options:
            return None
        shapes[i] = Shape(rng.choice(options), s.color, s.size, s.position)
    elif kind == "position":
        options = [p for p in positions if p not in cells]
        if not options:
            return None
        shapes[i] = Shape(s.shape, s.color, s.size, rng.choice(options))
    else:  # count: drop a shape (when there are several) or add one
        if len(shapes) > 1 and rng.random() < 0.5:
            del shapes[i]
        else:
            free = [p for p in positions if p not in cells]
            new_pairs = [(c, k) for c in colors for k in kinds if (c, k) not in pairs]
            if not free or not new_pairs:
                return None
            color, shape = rng.choice(new_pairs)
            shapes.append(Shape(shape, color, rng.choice(list(sizes)), rng.choice(free)))
    return sorted(shapes, key=lambda x: POSITIONS.index(x.position))


def shapes_preference(
    world: ShapesWorld, index: int, corruptions: Sequence[str] = CORRUPTIONS
) -> dict[str, Any]:
    """The preference record of sample ``index`` of ``world`` (without the image path):
    ``{"id", "prompt", "chosen", "rejected", "corruption", "scene"}``. Deterministic in
    ``(world.seed, index)``."""
    scene = world.scene(index)
    rng = random.Random((world.seed * 1_000_003 + index) * 31 + 7)
    order = list(corruptions)
    rng.shuffle(order)
    for kind in order:
        corrupted = corrupt_scene(
            scene,
            kind,
            rng,
            kinds=world.kinds,
            colors=world.colors,
            sizes=world.sizes,
            positions=world.positions,
        )
        if corrupted is not None and caption(corrupted) != caption(scene):
            return {
                "id": f"{index:06d}",
                "prompt": world.caption_prompt,
                "chosen": caption(scene),
                "rejected": caption(corrupted),
                "corruption": kind,
                "scene": [s.to_dict() for s in scene],
            }
    raise ValueError(f"shapes sample {index}: no corruption of {list(corruptions)} applies")


def caption_errors(text: str, scene: Sequence[Shape | dict[str, Any]]) -> int:
    """How wrong the caption ``text`` of ``scene`` is: the programmatic preference.

    Shape ``i`` of the caption is compared with shape ``i`` of the scene in reading order;
    each wrong attribute (shape, colour, size, position) counts 1 and each missing or extra
    shape 4. A caption off the caption grammar (``parse_caption(strict=True)`` fails: e.g.
    ``"a small blue right"``) counts :data:`MALFORMED_ERRORS`, more than any well-formed
    caption of a scene of at most nine shapes can. 0 means exactly right.
    """
    truth = sorted(
        (s.to_dict() if isinstance(s, Shape) else dict(s) for s in scene),
        key=lambda s: POSITIONS.index(s["position"]),
    )
    try:
        described = parse_caption(text, strict=True)
    except ValueError:
        return MALFORMED_ERRORS
    errors = 4 * abs(len(described) - len(truth))
    for said, real in zip(described, truth):
        errors += sum(said[a] != real[a] for a in _ATTRIBUTES)
    return errors


def corrupt_attributes(
    scene: Sequence[Shape],
    attributes: Sequence[str],
    rng: random.Random,
    **options: Sequence[str],
) -> list[Shape] | None:
    """``scene`` changed in each of ``attributes`` (names of :data:`ATTRIBUTE_CORRUPTIONS`),
    one after the other; ``None`` when one of them does not apply. ``options``: ``kinds``,
    ``colors``, ``sizes``, ``positions`` of the world."""
    unknown = [a for a in attributes if a not in ATTRIBUTE_CORRUPTIONS]
    if unknown:
        raise ValueError(f"attributes must be among {ATTRIBUTE_CORRUPTIONS}, got {unknown}")
    shapes: list[Shape] | None = list(scene)
    sizes = options.get("sizes", SIZES)
    for attribute in attributes:
        if attribute == "size":
            i = rng.randrange(len(shapes))
            s = shapes[i]
            others = [z for z in sizes if z != s.size]
            if not others:
                return None
            shapes[i] = Shape(s.shape, s.color, rng.choice(others), s.position)
        else:
            shapes = corrupt_scene(shapes, attribute, rng, **options)
            if shapes is None:
                return None
    return shapes


def shapes_ranked_answers(
    world: ShapesWorld,
    index: int,
    *,
    negatives: int = 6,
    max_corrupted: int = 3,
    per_attribute: int = 0,
    extra_answers: Sequence[str] = (),
) -> dict[str, Any]:
    """The ranked-list preference record of sample ``index`` (without the image path):
    ``{"id", "prompt", "responses", "ranking", "scene"}``.

    ``responses``: the right caption, up to ``per_attribute`` captions wrong in ONLY that
    attribute for each of :data:`ATTRIBUTE_CORRUPTIONS` (the hardest negatives: a reward model
    shown a wrong colour only by chance, among multi-attribute corruptions, learns to tell
    colours apart last), up to ``negatives`` corruptions changing 1 to ``max_corrupted``
    attributes drawn at random, and ``extra_answers`` (e.g. a policy's samples); duplicates
    dropped. ``ranking``:
    :func:`caption_errors` of each (lower is better; equal ranks form no pair).
    Deterministic in ``(world.seed, index, extra_answers)``.
    """
    if negatives < 0 or max_corrupted < 1 or per_attribute < 0:
        raise ValueError(
            f"negatives and per_attribute must be >= 0 and max_corrupted >= 1, got "
            f"{negatives}, {per_attribute}, {max_corrupted}"
        )
    scene = world.scene(index)
    rng = random.Random((world.seed * 1_000_003 + index) * 37 + 11)
    options = dict(
        kinds=world.kinds, colors=world.colors, sizes=world.sizes, positions=world.positions
    )
    right = caption(scene)
    responses = [right]
    # a bounded number of tries: small worlds may have fewer distinct corruptions than asked
    # (two sizes: one wrong size only)
    for attribute in ATTRIBUTE_CORRUPTIONS if per_attribute else ():
        found = 0
        for _ in range(4 * per_attribute):
            if found == per_attribute:
                break
            corrupted = corrupt_attributes(scene, [attribute], rng, **options)
            if corrupted is not None and caption(corrupted) not in responses:
                responses.append(caption(corrupted))
                found += 1
    single = len(responses) - 1
    for _ in range(4 * negatives):
        if len(responses) > single + negatives:
            break
        n = rng.randint(1, min(max_corrupted, len(ATTRIBUTE_CORRUPTIONS)))
        corrupted = corrupt_attributes(scene, rng.sample(ATTRIBUTE_CORRUPTIONS, n), rng, **options)
        if corrupted is not None and caption(corrupted) not in responses:
            responses.append(caption(corrupted))
    for answer in extra_answers:
        if answer not in responses:
            responses.append(answer)
    return {
        "id": f"{index:06d}",
        "prompt": world.caption_prompt,
        "responses": responses,
        "ranking": [caption_errors(r, scene) for r in responses],
        "scene": [s.to_dict() for s in scene],
    }


def write_shapes_preferences(
    directory: str | os.PathLike,
    n: int,
    *,
    start: int = 0,
    corruptions: Sequence[str] = CORRUPTIONS,
    **world_options: Any,
) -> Path:
    """Write ``n`` shapes-world preference pairs (samples ``start..start+n-1``).

    ``world_options`` go to :class:`~mmgpt.data.shapes.ShapesWorld` (``seed``,
    ``image_size``, ``max_shapes``, ``colors``…). Returns the path of ``preferences.jsonl``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown or not corruptions:
        raise ValueError(
            f"corruptions must be a non-empty subset of {CORRUPTIONS}, got {corruptions}"
        )
    world = ShapesWorld(size=start + n, task="caption", **world_options)
    records = {i: shapes_preference(world, i, corruptions) for i in range(start, start + n)}
    return _write_records(world, Path(directory), records)


def write_shapes_reward_data(
    directory: str | os.PathLike,
    n: int,
    *,
    start: int = 0,
    negatives: int = 6,
    max_corrupted: int = 3,
    per_attribute: int = 0,
    policy: Any = None,
    policy_samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    sample_seed: int = 0,
    batch_images: int = 64,
    **world_options: Any,
) -> Path:
    """Write ``n`` ranked-list records (samples ``start..start+n-1``) for reward modelling:
    see :func:`shapes_ranked_answers`. With ``policy`` (a MultimodalGPT captioner, usually the
    SFT model PPO starts from), its ``policy_samples`` sampled captions of each image join the
    list, ranked by the same programmatic preference — the reward model then learns to rank
    what that policy actually says (answers it did not finish within ``max_new_tokens`` are
    left out). Returns the path of ``preferences.jsonl``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if policy is not None and policy_samples < 1:
        raise ValueError(f"policy_samples must be >= 1 with a policy, got {policy_samples}")
    world = ShapesWorld(size=start + n, task="caption", **world_options)
    indices = list(range(start, start + n))
    sampled: dict[int, list[str]] = {}
    if policy is not None:
        sampled = _sample_captions(
            policy,
            world,
            indices,
            samples=policy_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=sample_seed,
            batch_images=batch_images,
        )
    records = {
        index: shapes_ranked_answers(
            world,
            index,
            negatives=negatives,
            max_corrupted=max_corrupted,
            per_attribute=per_attribute,
            extra_answers=sampled.get(index, ()),
        )
        for index in indices
    }
    return _write_records(world, Path(directory), records)


def _write_records(world: ShapesWorld, directory: Path, records: dict[int, dict]) -> Path:
    """Each record's image as ``images/NNNNNN.png`` and the records as ``preferences.jsonl``."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, record in records.items():
        name = f"images/{index:06d}.png"
        world.render(world.scene(index)).save(directory / name)
        lines.append(json.dumps({**record, "image": name}))
    path = directory / "preferences.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sample_captions(
    policy: Any,
    world: ShapesWorld,
    indices: Sequence[int],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_images: int,
) -> dict[int, list[str]]:
    """``samples`` captions of each image sampled from ``policy`` (one seed per row, so the
    samples do not depend on the batching)."""
    from mmgpt.generation import GenerationConfig
    from mmgpt.rlhf.data import as_prompt
    from mmgpt.rlhf.rollout import generate_responses

    out: dict[int, list[str]] = {}
    for begin in range(0, len(indices), batch_images):
        chunk = indices[begin : begin + batch_images]
        prompts = [as_prompt(world[i]) for i in chunk for _ in range(samples)]
        seeds = [seed * 1_000_003 + i * samples + j for i in chunk for j in range(samples)]
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seeds
        )
        _, texts, ended = generate_responses(policy, prompts, config)
        for row, index in enumerate(chunk):
            rows = range(row * samples, (row + 1) * samples)
            # an answer cut off at max_new_tokens is left out: it may not fit the model's
            # context with the prompt, and PPO penalises it on its own (missing_eos_penalty)
            out[index] = [texts[r] for r in rows if ended[r]]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmgpt.rlhf.shapes DIR --n 1000``: write shapes-world preference pairs."""
    parser = argparse.ArgumentParser(
        prog="python -m mmgpt.rlhf.shapes", description=main.__doc__.split(": ", 1)[1]
    )
    parser.add_argument("directory", help="output directory (preferences.jsonl + images/)")
    parser.add_argument("--n", type=int, default=1000, help="number of pairs")
    parser.add_argument("--start", type=int, default=0, help="first sample index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--max-shapes", type=int, default=1)
    parser.add_argument(
        "--corruptions", default=",".join(CORRUPTIONS), help="comma-separated subset"
    )
    args = parser.parse_args(argv)
    path = write_shapes_preferences(
        args.directory,
        args.n,
        start=args.start,
        corruptions=[c for c in args.corruptions.split(",") if c],
        seed=args.seed,
        image_size=args.image_size,
        max_shapes=args.max_shapes,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
