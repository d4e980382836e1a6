"""Programmatic preferences in the shapes world: right captions beat almost-right ones.

For a scene of :mod:`mmgpt.data.shapes`, the *chosen* answer is its caption (right in every
attribute) and the *rejected* one the caption of a corrupted scene that differs in exactly one
way: a shape's colour, a shape's kind, a shape's position, or the number of shapes (one added
or, with several, one dropped). Preferences are therefore decidable only by looking at the
image — exactly what a multimodal reward model or DPO has to learn.

``write_shapes_preferences(dir, n)`` writes ``preferences.jsonl`` + ``images/`` in the
preference JSONL format (``prompt``, ``image``, ``chosen``, ``rejected``; ``corruption`` and
``scene`` kept as metadata), which also serves as PPO prompt data (``"prompts"`` dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmgpt.data.shapes import COLORS, KINDS, POSITIONS, SIZES, Shape, ShapesWorld, caption

__all__ = ["CORRUPTIONS", "corrupt_scene", "shapes_preference", "write_shapes_preferences"]

CORRUPTIONS = ("color", "shape", "position", "count")


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
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(start, start + n):
        record = shapes_preference(world, index, corruptions)
        name = f"images/{index:06d}.png"
        world.render(world.scene(index)).save(directory / name)
        lines.append(json.dumps({**record, "image": name}))
    path = directory / "preferences.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


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
