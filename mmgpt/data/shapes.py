"""The shapes world: a synthetic, deterministic image-text dataset of coloured shapes.

A *scene* is 1–3 (up to 9) shapes, each with a kind, a colour, a size and a cell of a 3x3
grid, drawn with PIL on a plain background. From the same scene come

- a caption:   ``"two shapes: a small blue square at the top and a large red circle on the left"``
- questions:   ``"what colour is the circle?"`` → ``"red"``, ``"how many shapes are there?"``
  → ``"two"``, ``"where is the red shape?"`` → ``"left"``, ``"is there a blue square?"`` → ``"no"``
- a drawing prompt: ``"draw a large red circle on the left"`` → the rendered scene.

Grammar (``parse_caption`` inverts it): one shape is ``"a {size} {colour} {kind} {place}"``
with place ``"on the left"``, ``"on the right"``, ``"in the center"`` or ``"at the {cell}"``
(``"at the top"``, ``"at the bottom right"``, …). Several shapes are
``"{count} shapes: "`` + the shapes in reading order (top row first, left to right), joined
by ``", "`` and a final ``" and "``. Within a scene no two shapes share both colour and
kind, so every question has exactly one answer.

Sample ``i`` of seed ``s`` is a pure function of ``(s, i)``: its generator is
``random.Random(s * 1_000_003 + i)`` (integers seed ``random`` without hashing), so any
sample can be regenerated alone, in any order, in any process.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmgpt.data.llava import turns_to_llava
from mmgpt.data.sample import (
    DEFAULT_CAPTION_PROMPT,
    IMAGE_OUT_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    Sample,
    Turn,
)
from mmgpt.registry import register

__all__ = [
    "BACKGROUND",
    "COLORS",
    "KINDS",
    "POSITIONS",
    "QUESTION_TYPES",
    "SIZES",
    "TASKS",
    "EndlessShapesWorld",
    "Shape",
    "ShapesWorld",
    "ask_question",
    "caption",
    "cell_label_classes",
    "cell_labels",
    "draw_prompt",
    "number_word",
    "parse_caption",
    "render_scene",
    "shapes_dataset",
]

KINDS = ("circle", "square", "triangle", "star", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 205, 0),
    "purple": (135, 50, 185),
    "orange": (250, 130, 0),
    "cyan": (0, 190, 205),
    "pink": (250, 110, 185),
}
SIZES = ("small", "large")
# 3x3 grid in reading order; the name is the answer to "where is ...?".
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
BACKGROUND = (250, 250, 250)
TASKS = ("caption", "vqa", "t2i")
QUESTION_TYPES = ("color", "shape", "size", "position", "count", "exists")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Radius as a fraction of a grid cell: large shapes nearly fill their cell, small ones are
# clearly smaller yet still several pixels wide at 32x32.
_RADIUS = {"small": 0.27, "large": 0.45}
_SUPERSAMPLE = 4


def number_word(n: int) -> str:
    """0..9 as an English word (``3`` → ``"three"``)."""
    if not 0 <= n < len(_NUMBERS):
        raise ValueError(f"number_word supports 0..{len(_NUMBERS) - 1}, got {n}")
    return _NUMBERS[n]


def place_phrase(position: str) -> str:
    """``"left"`` → ``"on the left"``, ``"center"`` → ``"in the center"``, ``"top"`` → ``"at the top"``."""
    if position in ("left", "right"):
        return f"on the {position}"
    if position == "center":
        return "in the center"
    return f"at the {position}"


def _plural(kind: str) -> str:
    return kind + "s"


@dataclass(frozen=True)
class Shape:
    """One shape of a scene; ``to_dict()`` is the ``meta["scene"]`` entry."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, value, known in (
            ("shape", self.shape, KINDS),
            ("color", self.color, tuple(COLORS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in known:
                raise ValueError(f"Shape.{name} must be one of {known}, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shape:
        return cls(data["shape"], data["color"], data["size"], data["position"])

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        """``"a large red circle on the left"``."""
        return f"a {self.size} {self.color} {self.shape} {place_phrase(self.position)}"


Scene = Sequence[Shape]


def _as_shapes(scene: Sequence[Shape | dict[str, Any]]) -> list[Shape]:
    shapes = [s if isinstance(s, Shape) else Shape.from_dict(s) for s in scene]
    if not shapes:
        raise ValueError("a scene needs at least one shape")
    cells = [s.position for s in shapes]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two shapes of a scene share a position: {cells}")
    # Reading order is the caption order; parse_caption returns shapes in it.
    return sorted(shapes, key=lambda s: POSITIONS.index(s.position))


# -- text ------------------------------------------------------------------------------------
def caption(scene: Sequence[Shape | dict[str, Any]]) -> str:
    """The caption of a scene (shapes in reading order)."""
    shapes = _as_shapes(scene)
    parts = [s.describe() for s in shapes]
    if len(parts) == 1:
        return parts[0]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{number_word(len(parts))} shapes: {listed}"


CELL_ATTRIBUTES = ("shape", "color", "size")
EMPTY_CELL = "none"


def cell_labels(scene: Sequence[Shape | dict[str, Any]]) -> dict[str, str]:
    """Dense labels of a scene: the shape, colour and size in each of the 9 grid cells,
    ``"none"`` where a cell is empty: ``{"top left/shape": "circle", "top left/color": "red",
    ..., "bottom right/size": "none"}`` (27 labels, cells in reading order)."""
    by_cell = {s.position: s for s in _as_shapes(scene)}
    labels: dict[str, str] = {}
    for cell in POSITIONS:
        shape = by_cell.get(cell)
        for attribute in CELL_ATTRIBUTES:
            labels[f"{cell}/{attribute}"] = getattr(shape, attribute) if shape else EMPTY_CELL
    return labels


def cell_label_classes() -> dict[str, list[str]]:
    """Every value each of :func:`cell_labels`' labels can take (``"none"`` first)."""
    values = {"shape": KINDS, "color": tuple(COLORS), "size": SIZES}
    return {
        f"{cell}/{attribute}": [EMPTY_CELL, *values[attribute]]
        for cell in POSITIONS
        for attribute in CELL_ATTRIBUTES
    }


def draw_prompt(scene: Sequence[Shape | dict[str, Any]]) -> str:
    """The text-to-image prompt of a scene: ``"draw "`` + its caption."""
    return "draw " + caption(scene)


_PLACES = {place_phrase(p): p for p in POSITIONS}
_CLAUSE = re.compile(
    r"an? (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) (?P<place>(?:on|in|at) the [a-z ]+)"
)
_PREFIX = re.compile(r"^(?P<count>[a-z]+) shapes\s*:\s*")
_SPLIT = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")


def parse_caption(text: str, *, strict: bool = False) -> list[dict[str, str | None]]:
    """Invert :func:`caption`: the scene (list of ``{shape, color, size, position}``).

    ``parse_caption(caption(scene)) == [s.to_dict() for s in scene]`` for a scene in reading
    order. For scoring model output the default is lenient: each clause yields a dict whose
    attributes are ``None`` where no known word was found, and text with no known attribute
    word yields ``[]``. ``strict=True`` raises ``ValueError`` on anything off the grammar
    (including a count prefix that disagrees with the number of shapes).
    """
    body = text.strip().lower().rstrip(".").strip()
    prefix = _PREFIX.match(body)
    count = None
    if prefix:
        count = prefix.group("count")
        body = body[prefix.end() :]
    clauses = [c for c in _SPLIT.split(body) if c]
    shapes = [_parse_clause(c, strict) for c in clauses]
    shapes = [s for s in shapes if any(v is not None for v in s.values())]
    if strict:
        expected = 1 if count is None else (_NUMBERS.index(count) if count in _NUMBERS else -1)
        if expected != len(shapes) or (count is not None and len(shapes) < 2):
            raise ValueError(
                f"caption {text!r}: count {count or 'one'!r} but {len(shapes)} shape(s) described"
            )
    return shapes


def _parse_clause(clause: str, strict: bool) -> dict[str, str | None]:
    if strict:
        match = _CLAUSE.fullmatch(clause)
        place = _PLACES.get(match.group("place")) if match else None
        if (
            match is None
            or place is None
            or match.group("size") not in SIZES
            or match.group("color") not in COLORS
            or match.group("shape") not in KINDS
        ):
            raise ValueError(f"{clause!r} is not 'a <size> <colour> <kind> <place>'")
        return {
            "shape": match.group("shape"),
            "color": match.group("color"),
            "size": match.group("size"),
            "position": place,
        }
    words = clause.split()
    found: dict[str, str | None] = {
        "shape": next((w for w in words if w in KINDS or w.rstrip("s") in KINDS), None),
        "color": next((w for w in words if w in COLORS), None),
        "size": next((w for w in words if w in SIZES), None),
        "position": None,
    }
    if found["shape"] is not None and found["shape"] not in KINDS:
        found["shape"] = found["shape"].rstrip("s")
    # Longest cell name first, so "top left" wins over "top" and "left".
    for position in sorted(POSITIONS, key=len, reverse=True):
        if re.search(rf"\b{position}\b", clause):
            found["position"] = position
            break
    return found


def ask_question(
    scene: Sequence[Shape],
    rng: random.Random,
    *,
    kinds: Sequence[str] = KINDS,
    colors: Sequence[str] = tuple(COLORS),
    question_types: Sequence[str] = QUESTION_TYPES,
    type_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A question about ``scene`` with its one correct answer.

    Returns ``{"type", "question", "answer", "target"}``; ``target`` is the index (in reading
    order) of the shape the question refers to, or ``None`` (counts, absent shapes).
    ``kinds``/``colors`` bound the absent shapes "is there a …?" may ask about.
    ``type_weights`` (one per ``question_types``) makes some types more frequent; ``None``
    draws every type equally often.
    """
    shapes = _as_shapes(scene)
    if type_weights is None:
        qtype = rng.choice(list(question_types))
    else:  # a different draw than choice(): unweighted questions keep their stream
        qtype = rng.choices(list(question_types), weights=type_weights)[0]
    index = rng.randrange(len(shapes))
    target = shapes[index]
    n_kind = sum(s.shape == target.shape for s in shapes)
    n_color = sum(s.color == target.color for s in shapes)
    n_kind_size = sum(s.shape == target.shape and s.size == target.size for s in shapes)
    place = place_phrase(target.position)

    if qtype == "color":
        forms = [f"the shape {place}"]
        if n_kind == 1:
            forms.append(f"the {target.shape}")
        elif n_kind_size == 1:
            forms.append(f"the {target.size} {target.shape}")
        return _qa(qtype, f"what colour is {rng.choice(forms)}?", target.color, index)
    if qtype == "shape":
        forms = [f"what shape is {place}?"]
        if n_color == 1:
            forms.append(f"what shape is {target.color}?")
        return _qa(qtype, rng.choice(forms), target.shape, index)
    if qtype == "size":
        forms = [f"the {target.color} {target.shape}", f"the shape {place}"]
        if n_kind == 1:
            forms.append(f"the {target.shape}")
        return _qa(qtype, f"what size is {rng.choice(forms)}?", target.size, index)
    if qtype == "position":
        forms = [f"the {target.color} {target.shape}"]
        if n_color == 1:
            forms.append(f"the {target.color} shape")
        if n_kind == 1:
            forms.append(f"the {target.shape}")
        return _qa(qtype, f"where is {rng.choice(forms)}?", target.position, index)
    if qtype == "count":
        form = rng.choice(("all", "all", "color", "kind"))
        if form == "color":
            n = n_color
            question = f"how many {target.color} shapes are there?"
        elif form == "kind":
            n = n_kind
            question = f"how many {_plural(target.shape)} are there?"
        else:
            n = len(shapes)
            question = "how many shapes are there?"
        return _qa(qtype, question, number_word(n), None)
    if qtype == "exists":
        present = {(s.color, s.shape) for s in shapes}
        absent = [(c, k) for c in colors for k in kinds if (c, k) not in present]
        if absent and rng.random() < 0.5:
            color, kind = rng.choice(absent)
            return _qa(qtype, f"is there a {color} {kind}?", "no", None)
        return _qa(qtype, f"is there a {target.color} {target.shape}?", "yes", index)
    raise ValueError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


def _qa(qtype: str, question: str, answer: str, target: int | None) -> dict[str, Any]:
    return {"type": qtype, "question": question, "answer": answer, "target": target}


# -- pixels ----------------------------------------------------------------------------------
def render_scene(
    scene: Sequence[Shape | dict[str, Any]],
    image_size: int = 64,
    *,
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """Draw a scene as an ``image_size`` square RGB image.

    Shapes are drawn at 4x resolution and box-filtered down, which anti-aliases the edges
    (so 32x32 images still show which shape is which) and stays deterministic.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    cell = side / 3
    for shape in _as_shapes(scene):
        row, col = divmod(POSITIONS.index(shape.position), 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        _draw_shape(draw, shape.shape, cx, cy, _RADIUS[shape.size] * cell, COLORS[shape.color])
    return image.reduce(_SUPERSAMPLE)


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        h = r * 0.85  # same visual weight as the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif kind == "triangle":
        # Equilateral, pointing up, its centroid lowered so it sits centred in the cell.
        cy += r * 0.12
        points = [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a)))
            for a in (-90, 30, 150)
        ]
        draw.polygon(points, fill=fill)
    elif kind == "diamond":
        draw.polygon(
            [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)], fill=fill
        )
    elif kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


# -- the datasets ----------------------------------------------------------------------------
def _subset(name: str, given: Sequence[str] | None, known: Sequence[str]) -> tuple[str, ...]:
    if given is None:
        return tuple(known)
    if isinstance(given, str):
        given = [given]
    values = tuple(dict.fromkeys(given))
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise ValueError(f"{name} must be a non-empty subset of {tuple(known)}, got {list(given)}")
    return values


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_weights(
    name: str, weights: dict[str, float] | None, known: Sequence[str], what: str
) -> tuple[float, ...] | None:
    """Relative frequencies ``{key: weight}`` (the option ``name``) → one weight per ``known``
    key in its order (unnamed keys weigh 1); ``None``: all equally often."""
    if weights is None:
        return None
    if not isinstance(weights, dict):
        raise ValueError(
            f"{name} must be a mapping {what} -> weight, e.g. {{{known[0]}: 2}}, got {weights!r}"
        )
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(
            f"{name} names {what}s {unknown} that are not in this dataset's {what} mix "
            f"{list(known)}"
        )
    values = []
    for key in known:
        value = weights.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}.{key} must be a number >= 0, got {value!r}")
        values.append(float(value))
    if not any(values):
        raise ValueError(f"{name} gives every {what} weight 0: {weights!r}")
    return tuple(values)


class _ShapesGenerator:
    """Options and the pure function ``index → Sample`` shared by both dataset flavours."""

    def __init__(
        self,
        *,
        image_size: int = 64,
        max_shapes: int = 3,
        min_shapes: int = 1,
        task: str | Sequence[str] = "mixed",
        kinds: Sequence[str] | None = None,
        colors: Sequence[str] | None = None,
        sizes: Sequence[str] | None = None,
        positions: Sequence[str] | None = None,
        question_types: Sequence[str] | None = None,
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        draw_max_shapes: int | None = None,
        task_weights: dict[str, float] | None = None,
        questions_per_image: int = 1,
        question_weights: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        self.image_size = image_size
        self.kinds = _subset("kinds", kinds, KINDS)
        self.colors = _subset("colors", colors, tuple(COLORS))
        self.sizes = _subset("sizes", sizes, SIZES)
        self.positions = _subset("positions", positions, POSITIONS)
        self.question_types = _subset("question_types", question_types, QUESTION_TYPES)
        if task == "mixed":
            self.tasks = TASKS
        else:
            self.tasks = _subset("task", task, TASKS)
        self.task = task if isinstance(task, str) else "mixed"
        self.task_weights = _check_weights("task_weights", task_weights, self.tasks, "task")
        limit = min(len(self.positions), len(self.colors) * len(self.kinds))
        if not 1 <= min_shapes <= max_shapes <= limit:
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= {limit} (the free cells and distinct "
                f"colour-kind pairs), got min_shapes={min_shapes}, max_shapes={max_shapes}"
            )
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        if draw_max_shapes is not None and not _is_positive_int(draw_max_shapes):
            raise ValueError(
                f"draw_max_shapes must be an int >= 1 or null, got {draw_max_shapes!r}"
            )
        self.draw_max_shapes = draw_max_shapes
        if not _is_positive_int(questions_per_image):
            raise ValueError(
                f"questions_per_image must be an int >= 1, got {questions_per_image!r}"
            )
        self.questions_per_image = questions_per_image
        self.question_weights = _check_weights(
            "question_weights", question_weights, self.question_types, "question type"
        )
        self.caption_prompt = caption_prompt
        self.seed = int(seed)

    def rng(self, index: int) -> random.Random:
        """The generator of sample ``index``: seeded by ``seed * 1_000_003 + index``."""
        if index < 0:
            raise IndexError(f"shapes world indices start at 0, got {index}")
        return random.Random(self.seed * 1_000_003 + index)

    def _scene(self, rng: random.Random) -> list[Shape]:
        n = rng.randint(self.min_shapes, self.max_shapes)
        cells = rng.sample(self.positions, n)
        pairs = rng.sample([(c, k) for c in self.colors for k in self.kinds], n)
        shapes = [
            Shape(kind, color, rng.choice(self.sizes), cell)
            for cell, (color, kind) in zip(cells, pairs)
        ]
        return _as_shapes(shapes)

    def scene(self, index: int) -> list[Shape]:
        """The scene of sample ``index`` (in reading order)."""
        return self._scene(self.rng(index))

    def render(self, scene: Sequence[Shape | dict[str, Any]]) -> Image.Image:
        return render_scene(scene, self.image_size)

    def sample(self, index: int) -> Sample:
        """Sample ``index`` (any index >= 0): a pure function of ``(seed, index)``."""
        rng = self.rng(index)
        scene = self._scene(rng)
        if self.task_weights is None:
            task = rng.choice(self.tasks)
        else:  # a different draw than choice(): unweighted worlds keep their samples
            task = rng.choices(self.tasks, weights=self.task_weights)[0]
        if task == "t2i" and self.draw_max_shapes is not None and len(scene) > self.draw_max_shapes:
            # a drawing keeps a random subset of the scene (reading order kept)
            keep = sorted(rng.sample(range(len(scene)), self.draw_max_shapes))
            scene = [scene[i] for i in keep]
        image = self.render(scene)
        text = caption(scene)
        meta: dict[str, Any] = {
            "task": task,
            "scene": [s.to_dict() for s in scene],
            "caption": text,
            "seed": self.seed,
            "index": index,
            "source": f"shapes(seed={self.seed})[{index}]",
        }
        if task == "caption":
            turns = [
                Turn("user", f"{IMAGE_PLACEHOLDER}\n{self.caption_prompt}"),
                Turn("assistant", text),
            ]
            return Sample(turns, images=[image], meta=meta)
        if task == "vqa":
            # the first question is the sample's (meta, evaluation); more questions about the
            # same image follow as further turns, each answered (one image, k answers)
            asked = [self._question(scene, rng)]
            for _ in range(self.questions_per_image - 1):
                qa = self._question(scene, rng)
                if all(qa["question"] != q["question"] for q in asked):
                    asked.append(qa)
            qa = asked[0]
            meta.update(
                question_type=qa["type"],
                question=qa["question"],
                answer=qa["answer"],
                target=qa["target"],
            )
            turns = [
                Turn("user", f"{IMAGE_PLACEHOLDER}\n{qa['question']}"),
                Turn("assistant", qa["answer"]),
            ]
            for more in asked[1:]:
                turns += [Turn("user", more["question"]), Turn("assistant", more["answer"])]
            return Sample(turns, images=[image], meta=meta)
        turns = [Turn("user", draw_prompt(scene)), Turn("assistant", IMAGE_OUT_PLACEHOLDER)]
        return Sample(turns, output_images=[image], meta=meta)

    def _question(self, scene: list[Shape], rng: random.Random) -> dict[str, Any]:
        return ask_question(
            scene,
            rng,
            kinds=self.kinds,
            colors=self.colors,
            question_types=self.question_types,
            type_weights=self.question_weights,
        )

    def iter_samples(self, start: int = 0) -> Iterator[Sample]:
        index = start
        while True:
            yield self.sample(index)
            index += 1

    # -- export ------------------------------------------------------------------------------
    def _export(
        self, directory: str | os.PathLike, n: int, start: int
    ) -> Iterator[tuple[str, Sample]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        directory = Path(directory)
        (directory / "images").mkdir(parents=True, exist_ok=True)
        for index in range(start, start + n):
            sample = self.sample(index)
            name = f"images/{index:06d}.png"
            image = (sample.images or sample.output_images)[0]
            image.save(directory / name)
            yield name, sample

    def _exchange(self, sample: Sample) -> list[Turn]:
        """What an exported file holds: the VQA exchange, else (caption, t2i) the caption one."""
        if sample.meta["task"] == "vqa":
            return sample.conversation
        return [
            Turn("user", f"{IMAGE_PLACEHOLDER}\n{self.caption_prompt}"),
            Turn("assistant", sample.meta["caption"]),
        ]

    def write_imagefolder(self, directory: str | os.PathLike, n: int, *, start: int = 0) -> Path:
        """Export samples ``start..start+n-1`` as a Hugging Face imagefolder.

        Writes ``images/NNNNNN.png`` and ``metadata.jsonl``: a ``text`` caption per image, or
        ``conversations`` for VQA samples; every row also carries the ``scene``. Text-to-image
        samples are written as captions of their target image. Returns the metadata path.
        """
        rows = []
        for name, sample in self._export(directory, n, start):
            row: dict[str, Any] = {"file_name": name}
            if sample.meta["task"] == "vqa":
                row["conversations"] = turns_to_llava(sample.conversation)
            else:
                row["text"] = sample.meta["caption"]
            row["scene"] = sample.meta["scene"]
            rows.append(json.dumps(row))
        path = Path(directory) / "metadata.jsonl"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        return path

    def write_llava(self, directory: str | os.PathLike, n: int, *, start: int = 0) -> Path:
        """Export samples ``start..start+n-1`` as LLaVA JSON (``conversations.json`` + images).

        VQA samples keep their exchange, the others become caption exchanges; each record has
        ``id``, ``image``, ``conversations`` and ``scene``. Returns the JSON path.
        """
        records = [
            {
                "id": f"{sample.meta['index']:06d}",
                "image": name,
                "conversations": turns_to_llava(self._exchange(sample)),
                "scene": sample.meta["scene"],
            }
            for name, sample in self._export(directory, n, start)
        ]
        path = Path(directory) / "conversations.json"
        path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        return path


class ShapesWorld(_ShapesGenerator, Dataset):
    """Map-style shapes world of ``size`` samples; item ``i`` is ``sample(i)``.

    Args:
        image_size: side of the square images in pixels (>= 8; 32 and 64 are typical).
        max_shapes, min_shapes: shapes per scene (default 1–3, at most 9).
        task: ``"caption"``, ``"vqa"``, ``"t2i"``, ``"mixed"`` (all three, chosen per sample),
            or a list of tasks to mix.
        kinds, colors, sizes, positions: subsets of ``KINDS``, ``COLORS``, ``SIZES``,
            ``POSITIONS`` to draw from (hold one out for transfer experiments).
        question_types: subset of ``QUESTION_TYPES`` for VQA samples.
        caption_prompt: user text of caption samples, after ``"<image>\\n"``.
        draw_max_shapes: at most this many shapes in a drawing sample (a random subset of its
            scene); drawing several shapes from one prompt is much harder for a small decoder.
        task_weights: relative frequency of each task of the mix (``{"t2i": 2}``: drawings
            twice as often as each other task; unnamed tasks weigh 1). Default: equal.
        questions_per_image: VQA samples ask up to this many different questions about their
            image, one after another as a conversation (as VQA datasets ask several questions
            of each image): k answers learned per image read. The first question is the
            sample's ``meta`` and what evaluation asks. Default 1, the samples of earlier
            versions.
        question_weights: relative frequency of each question type (``{"exists": 2}``: "is
            there …?" twice as often as each other type; unnamed types weigh 1). Default:
            equal. Evaluation worlds keep the default, so the figures stay comparable.
        seed: sample ``i`` is a pure function of ``(seed, i)``.
        size: number of samples.
    """

    def __init__(self, *, size: int = 10_000, **options: Any) -> None:
        super().__init__(**options)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not -self.size <= index < self.size:
            raise IndexError(
                f"index {index} out of range for a shapes world of {self.size} samples"
            )
        return self.sample(index % self.size)


class EndlessShapesWorld(_ShapesGenerator, IterableDataset):
    """Endless shapes world: iterating yields ``sample(start)``, ``sample(start + 1)``, …

    Resume by index: ``start`` (or ``load_state_dict``) continues exactly where a single
    process left off. Under ``DataLoader`` workers and ``rank``/``world_size`` sharding each
    consumer takes a disjoint stride of the indices. Options are those of :class:`ShapesWorld`.
    """

    def __init__(
        self, *, start: int = 0, rank: int = 0, world_size: int = 1, **options: Any
    ) -> None:
        super().__init__(**options)
        if start < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"need start >= 0 and 0 <= rank < world_size, got {start}, {rank}, {world_size}"
            )
        self.start, self.rank, self.world_size = start, rank, world_size
        # First index of the next round of all consumers; with one consumer, the next index.
        self.position = start

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stride = workers * self.world_size
        offset = self.rank * workers + worker
        while True:
            sample = self.sample(self.position + offset)
            self.position += stride
            yield sample

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"state is for seed {state['seed']}, this dataset has seed {self.seed}"
            )
        self.position = int(state["position"])


@register("dataset", "shapes")
def shapes_dataset(
    *, size: int | None = 10_000, **options: Any
) -> ShapesWorld | EndlessShapesWorld:
    """``create("dataset", "shapes", image_size=64, task="mixed", seed=0, size=N)``.

    ``size=None`` gives the endless :class:`EndlessShapesWorld` (which also takes ``start``).
    """
    if size is None:
        return EndlessShapesWorld(**options)
    return ShapesWorld(size=size, **options)
