"""VQA metrics: normalised exact match, overall and per question type.

A sample's question type is its ``meta["question_type"]`` (the shapes world sets it) or, when
absent, inferred from the question's opening words with the shapes-world grammar
(``"what colour …"`` → ``color``, ``"how many …"`` → ``count``, …); anything else is ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmgpt.eval.metrics import exact_match, normalize_answer

__all__ = ["infer_question_type", "vqa_metrics"]

_TYPE_PATTERNS = (
    ("color", re.compile(r"^(what|which) colou?r\b")),
    ("shape", re.compile(r"^(what|which) (shape|kind)\b")),
    ("size", re.compile(r"^(what|which) size\b")),
    ("position", re.compile(r"^where\b")),
    ("count", re.compile(r"^how many\b")),
    ("exists", re.compile(r"^(is|are) there\b")),
)


def infer_question_type(question: str) -> str:
    """``color``/``shape``/``size``/``position``/``count``/``exists`` from the question's
    start (placeholders and surrounding whitespace ignored), else ``other``."""
    text = normalize_answer(question.replace("<image>", " "))
    for name, pattern in _TYPE_PATTERNS:
        if pattern.search(text):
            return name
    return "other"


def vqa_metrics(
    predictions: Sequence[str], references: Sequence[str], question_types: Sequence[str]
) -> dict[str, object]:
    """``{"exact_match", "per_type": {type: {"exact_match", "count"}}}`` (accuracies 0–1)."""
    if len(question_types) != len(predictions):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(question_types)} question types"
        )
    per_type: dict[str, dict[str, float]] = {}
    for qtype in sorted(set(question_types)):
        rows = [i for i, t in enumerate(question_types) if t == qtype]
        per_type[qtype] = {
            "exact_match": exact_match(
                [predictions[i] for i in rows], [references[i] for i in rows]
            ),
            "count": len(rows),
        }
    return {"exact_match": exact_match(predictions, references), "per_type": per_type}
