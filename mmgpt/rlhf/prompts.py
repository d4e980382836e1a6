"""Prompt data for PPO: JSONL of prompts (with optional images), no answers needed.

One object per line::

    {"prompt": "Describe the image.", "image": "images/1.png"}

``image`` is a path or a list of paths relative to ``image_root`` (default: the file's
directory); the prompt gets ``"<image>\\n"`` per image prepended when it has no placeholder,
as in the preference format. A preference file works as a prompt file too: ``chosen``,
``rejected`` and ``responses`` are ignored (and kept in ``meta`` with every other key, so an
evaluation can compare against them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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

__all__ = ["PromptDataset", "read_prompts"]


def read_prompts(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None
) -> tuple[list[Record], list[Problem]]:
    """Parse a prompt JSONL file: one record per line, problems with their line numbers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    root = Path(image_root) if image_root is not None else path.parent
    base = root.resolve()
    return collect_records(
        path, iter_jsonl(path), lambda obj, line: [_parse_prompt(obj, root, base, str(path), line)]
    )


def _parse_prompt(obj: Any, root: Path, base: Path, file: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise RecordError("bad_type", f"a line must be a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if prompt is None:
        raise RecordError("missing_field", "missing field 'prompt'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("bad_type", "'prompt' must be a non-empty string")
    names = parse_image_field(obj.get("image"))
    (turn,) = insert_image_placeholders([Turn("user", prompt)], len(names))
    paths = [resolve_image(root, name) for name in names]
    check_images_exist(paths)
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "image")}
    return Record(file, line, record_id(obj), paths, turn.text, meta, outside_root(base, paths))


@register("dataset", "prompts")
class PromptDataset(FileRecordDataset):
    """Prompts (Samples with one user turn and its images) from a JSONL file; see the module
    docstring. Problems, ``skipped``, ``strict`` and ``allow_outside_root`` work as for the
    other file datasets."""

    format_name = "prompts"

    read = staticmethod(read_prompts)

    def build(self, record: Record, images: list[Any]) -> Sample:
        meta = record_meta(record)
        return Sample([Turn("user", record.data)], images, meta=meta)
