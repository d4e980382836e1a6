"""Preference data for reward models and DPO: JSONL of prompts with better and worse answers.

One object per line, either a pair::

    {"prompt": "What colour is the circle?", "image": "img/1.png", "chosen": "red", "rejected": "blue"}

or a ranked list, expanded into every ordered pair (better, worse)::

    {"prompt": "...", "responses": ["best", "middle", "worst"]}
    {"prompt": "...", "responses": ["a", "b", "c"], "ranking": [2, 1, 2]}

``responses`` alone is ordered best first. With ``ranking`` (one number per response, lower is
better, as in "1st, 2nd"), responses of equal rank form no pair. ``image`` (optional) is a path
or a list of paths relative to ``image_root`` (default: the file's directory); the prompt gets
``"<image>\\n"`` per image prepended when it has no placeholder (LLaVA's convention).
Other keys go to ``meta``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.data.llava import (
    check_images_exist,
    collect_records,
    insert_image_placeholders,
    parse_image_field,
    record_id,
    resolve_image,
)
from mmgpt.data.records import (
    DataError,
    FileRecordDataset,
    Problem,
    Record,
    RecordError,
    iter_jsonl,
    outside_root,
    record_meta,
)
from mmgpt.data.sample import Sample, Turn
from mmgpt.registry import register

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["PreferenceDataset", "PreferencePair", "ranked_pairs", "read_preference"]

_KNOWN_KEYS = ("prompt", "image", "chosen", "rejected", "responses", "ranking")
# A ranked list of k responses makes k(k-1)/2 pairs: without a bound, one 40 KB line of
# 10,000 responses would make 50 million records.
MAX_RANKED_RESPONSES = 100


@dataclass
class PreferencePair:
    """A prompt (with its images) and two answers, ``chosen`` preferred over ``rejected``."""

    prompt: str
    images: list[Image.Image]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    def samples(self) -> tuple[Sample, Sample]:
        """The chosen and the rejected conversation as two samples sharing the images."""
        return (
            Sample(
                [Turn("user", self.prompt), Turn("assistant", self.chosen)],
                list(self.images),
                meta=dict(self.meta),
            ),
            Sample(
                [Turn("user", self.prompt), Turn("assistant", self.rejected)],
                list(self.images),
                meta=dict(self.meta),
            ),
        )


def ranked_pairs(responses: list[str], ranking: list[float] | None = None) -> list[tuple[str, str]]:
    """Every ordered (better, worse) pair of a ranked list.

    Without ``ranking`` the list is ordered best first; with it, lower rank is better and ties
    form no pair. Pairs come in order of the better response, then the worse one.
    """
    ranks = list(range(len(responses))) if ranking is None else list(ranking)
    order = sorted(range(len(responses)), key=lambda i: (ranks[i], i))
    return [
        (responses[a], responses[b])
        for i, a in enumerate(order)
        for b in order[i + 1 :]
        if ranks[a] < ranks[b]
    ]


def read_preference(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None
) -> tuple[list[Record], list[Problem]]:
    """Parse a preference JSONL file: one record per *pair*, problems per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: preference file not found")
    root = Path(image_root) if image_root is not None else path.parent
    base = root.resolve()
    return collect_records(
        path, iter_jsonl(path), lambda obj, line: _parse_line(obj, root, base, str(path), line)
    )


def _string(obj: dict[str, Any], key: str) -> str:
    if key not in obj or obj[key] is None:
        raise RecordError("missing_field", f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("bad_type", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _parse_line(obj: Any, root: Path, base: Path, file: str, line: int) -> list[Record]:
    if not isinstance(obj, dict):
        raise RecordError("bad_type", f"a line must be a JSON object, got {type(obj).__name__}")
    prompt = _string(obj, "prompt")
    names = parse_image_field(obj.get("image"))
    (turn,) = insert_image_placeholders([Turn("user", prompt)], len(names))
    prompt = turn.text
    has_pair = "chosen" in obj or "rejected" in obj
    if has_pair and "responses" in obj:
        raise RecordError("bad_value", "give either 'chosen'/'rejected' or 'responses', not both")
    if has_pair:
        chosen, rejected = _string(obj, "chosen"), _string(obj, "rejected")
        if chosen == rejected:
            raise RecordError("bad_value", "'chosen' and 'rejected' are identical")
        pairs = [(chosen, rejected)]
    elif "responses" in obj:
        pairs = _ranked(obj)
    else:
        raise RecordError(
            "missing_field", "needs 'chosen' and 'rejected', or a ranked 'responses' list"
        )
    paths = [resolve_image(root, name) for name in names]
    check_images_exist(paths)
    meta = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    ident = record_id(obj)
    outside = outside_root(base, paths)
    return [
        Record(
            file,
            line,
            ident,
            paths,
            (prompt, chosen, rejected),
            {**meta, "pair_index": i, "num_pairs": len(pairs)},
            outside,
        )
        for i, (chosen, rejected) in enumerate(pairs)
    ]


def _ranked(obj: dict[str, Any]) -> list[tuple[str, str]]:
    responses = obj["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise RecordError("bad_type", "'responses' must be a list of strings")
    if len(responses) < 2:
        raise RecordError(
            "bad_value", f"'responses' needs at least 2 entries, got {len(responses)}"
        )
    if len(responses) > MAX_RANKED_RESPONSES:
        raise RecordError(
            "bad_value",
            f"'responses' has {len(responses)} entries, more than the {MAX_RANKED_RESPONSES} "
            "a ranked list may have (it makes every ordered pair); split it into several lines",
        )
    ranking = obj.get("ranking")
    if ranking is not None:
        if not isinstance(ranking, list) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranking
        ):
            raise RecordError("bad_type", "'ranking' must be a list of numbers (lower is better)")
        if len(ranking) != len(responses):
            raise RecordError(
                "bad_value",
                f"'ranking' has {len(ranking)} entries but 'responses' has {len(responses)}",
            )
    pairs = ranked_pairs(responses, ranking)
    if not pairs:
        raise RecordError("bad_value", "the ranking forms no pair (all responses tie)")
    return pairs


@register("dataset", "preference")
class PreferenceDataset(FileRecordDataset):
    """:class:`PreferencePair` items from a preference JSONL file (see the module docstring).

    ``len`` counts pairs, so a ranked list of ``k`` responses contributes ``k(k-1)/2``.
    Problems, ``skipped``, ``strict`` and ``allow_outside_root`` work as for the other file
    datasets.
    """

    format_name = "preference"

    read = staticmethod(read_preference)

    def build(self, record: Record, images: list[Any]) -> PreferencePair:
        prompt, chosen, rejected = record.data
        meta = record_meta(record)
        return PreferencePair(prompt, images, chosen, rejected, meta)
