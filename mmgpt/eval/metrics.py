"""Text metrics for generated answers: normalised exact match and corpus BLEU.

Both are registered as kind ``metric`` and take ``(predictions, references)``, two equally long
lists of strings (one reference per prediction).
"""

from __future__ import annotations

from collections.abc import Sequence

from mmgpt.registry import register

__all__ = ["bleu", "exact_match", "normalize_answer"]


def normalize_answer(text: str) -> str:
    """Lowercase, strip, collapse runs of whitespace, drop one final period.

    ``"  A red  circle. "`` → ``"a red circle"``.
    """
    text = " ".join(text.lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not one string")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "they must pair up one to one"
        )
    if not predictions:
        raise ValueError("no predictions to score")


@register("metric", "exact_match")
def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0–1) of predictions equal to their reference after :func:`normalize_answer`."""
    _check_pairs(predictions, references)
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


@register("metric", "bleu")
def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0–100) of sacrebleu with its defaults (13a tokenisation, case-sensitive)."""
    _check_pairs(predictions, references)
    try:  # deferred: an optional extra ("eval"), imported by the one metric that needs it
        import sacrebleu
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('BLEU needs sacrebleu: pip install "mmgpt[eval]"') from exc
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
