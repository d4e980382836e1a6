"""Caption metrics: exact match, corpus BLEU and, for shapes-world scenes, per-attribute accuracy.

Per-attribute accuracy reads a generated caption back with
:func:`mmgpt.data.shapes.parse_caption` (lenient) and compares it with the scene the image was
drawn from. Shape ``i`` of the caption is compared with shape ``i`` of the scene, both in
reading order (the order captions list shapes in); a missing or an extra shape counts as wrong
for every attribute, so each attribute's accuracy is

    correct / sum over samples of max(shapes in the scene, shapes in the caption).

``count`` is the fraction of captions that describe as many shapes as the scene holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmgpt.data.shapes import POSITIONS, parse_caption
from mmgpt.eval.metrics import bleu, exact_match

__all__ = ["ATTRIBUTES", "attribute_accuracy", "caption_metrics"]

ATTRIBUTES = ("shape", "color", "size", "position")


def _reading_order(scene: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    def key(shape: Mapping[str, Any]) -> int:
        position = shape.get("position")
        return POSITIONS.index(position) if position in POSITIONS else len(POSITIONS)

    return sorted(scene, key=key)


def attribute_accuracy(
    predictions: Sequence[str], scenes: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, float]:
    """``{"shape", "color", "size", "position", "count"}`` accuracies (0–1) of captions against
    their scenes (lists of ``{shape, color, size, position}``); see the module docstring."""
    if len(predictions) != len(scenes):
        raise ValueError(f"got {len(predictions)} captions but {len(scenes)} scenes")
    if not predictions:
        raise ValueError("no captions to score")
    correct = dict.fromkeys(ATTRIBUTES, 0)
    slots = 0
    counts = 0
    for text, scene in zip(predictions, scenes):
        described = parse_caption(text)
        truth = _reading_order(scene)
        slots += max(len(truth), len(described))
        counts += len(described) == len(truth)
        for said, real in zip(described, truth):
            for attribute in ATTRIBUTES:
                correct[attribute] += said[attribute] == real[attribute]
    result = {a: correct[a] / slots if slots else 0.0 for a in ATTRIBUTES}
    result["count"] = counts / len(predictions)
    return result


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    scenes: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
) -> dict[str, Any]:
    """``exact_match`` (0–1), ``bleu`` (0–100) and, over the samples that have a scene,
    ``attributes`` (see :func:`attribute_accuracy`)."""
    result: dict[str, Any] = {
        "exact_match": exact_match(predictions, references),
        "bleu": bleu(predictions, references),
    }
    if scenes is not None:
        with_scene = [(p, s) for p, s in zip(predictions, scenes) if s]
        if with_scene:
            result["attributes"] = attribute_accuracy(*zip(*with_scene))
            result["num_with_scene"] = len(with_scene)
    return result
