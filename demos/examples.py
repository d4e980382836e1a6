"""Example prompts of the apps, with shapes-world images shipped in ``mmgpt/assets/examples``.

The images are rendered by :func:`mmgpt.data.shapes.render_scene` from the scenes below;
``python -m demos.examples`` renders them again (deterministic).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

# 128 px so they read well in the page; the shapes-tiny model resizes them to 32 px.
EXAMPLE_IMAGE_SIZE = 128


def examples_dir() -> Path:
    """The directory of the shipped example images."""
    return Path(str(files("mmgpt") / "assets" / "examples"))


@dataclass(frozen=True)
class Example:
    """A chat example: a prompt, and the scene of its image (``None``: text only)."""

    text: str
    scene: tuple[dict[str, str], ...] | None = None
    image: str | None = None  # file name under examples_dir()


CHAT_EXAMPLES = (
    Example(
        "Describe the image.",
        ({"shape": "circle", "color": "red", "size": "large", "position": "center"},),
        "red_circle.png",
    ),
    Example(
        "what colour is the square?",
        (
            {"shape": "square", "color": "blue", "size": "large", "position": "top left"},
            {"shape": "triangle", "color": "yellow", "size": "small", "position": "bottom right"},
        ),
        "blue_square_yellow_triangle.png",
    ),
    Example(
        "how many shapes are there?",
        (
            {"shape": "star", "color": "purple", "size": "large", "position": "top"},
            {"shape": "diamond", "color": "green", "size": "small", "position": "left"},
            {"shape": "circle", "color": "orange", "size": "large", "position": "bottom right"},
        ),
        "three_shapes.png",
    ),
    Example("draw a large green circle in the center"),
    Example("draw a small red square at the top left"),
)
DRAW_EXAMPLES = (
    "draw a large green circle in the center",
    "draw a small red square at the top left",
    "draw a large blue triangle on the right",
    "draw two shapes: a large yellow star at the top and a small purple diamond at the bottom",
)
PREFERENCE_EXAMPLES = (
    ("what colour is the square?", CHAT_EXAMPLES[1].image),
    ("Describe the image.", CHAT_EXAMPLES[2].image),
    ("draw a large red circle on the left", None),
)


def chat_examples() -> list[dict[str, Any]]:
    """``MultimodalTextbox`` values ``{"text", "files"}`` of the chat examples."""
    root = examples_dir()
    return [
        {"text": e.text, "files": [str(root / e.image)] if e.image else []} for e in CHAT_EXAMPLES
    ]


def render_examples(directory: str | Path | None = None) -> list[Path]:
    """Render the example images into ``directory`` (default: the shipped folder)."""
    from mmgpt.data.shapes import render_scene

    directory = Path(directory) if directory is not None else examples_dir()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for example in CHAT_EXAMPLES:
        if example.scene is None or example.image is None:
            continue
        path = directory / example.image
        render_scene(list(example.scene), EXAMPLE_IMAGE_SIZE).save(path, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    for written_path in render_examples(sys.argv[1] if len(sys.argv) > 1 else None):
        print(written_path)
