"""Hugging Face *imagefolder* datasets: images plus a ``metadata.jsonl`` (or ``metadata.csv``).

```
data/
  metadata.jsonl        {"file_name": "images/0001.png", "text": "a red circle on the left"}
  images/0001.png       {"file_name": "b.jpg", "conversations": [{"from": "human", ...}]}
```

- ``file_name`` is relative to the directory of the metadata file; metadata files in
  subdirectories are all read (sorted), each for its own directory. ``split="train"`` reads
  ``data/train/`` only.
- A row with ``text`` becomes, by ``task``:

  - ``"caption"`` (default): a caption sample, user ``"<image>\\n" + caption_prompt``,
    assistant ``text``;
  - ``"t2i"``: a drawing sample, user ``prompt_template`` with ``{text}`` replaced by the
    caption (default: the caption itself), assistant ``"<image_out>"``: the image is the
    target the model learns to draw (``Sample.output_images``), cropped and resized to the
    image decoder's size by the decoder's own ``preprocess`` when batched;
  - ``"mixed"``: both, one after the other (twice as many samples as rows);
  - a list of tasks, as the shapes world takes (``[vqa, caption]``): a drawing sample when it
    holds ``t2i``, a caption sample when it holds ``caption`` or no ``t2i``. ``vqa`` adds
    nothing to a caption row: questions come from ``conversations`` rows.

- A row with ``conversations`` (LLaVA style ``[{from, value}]``) is used as is, whatever the
  task, with LLaVA's rules: ``"<image>"`` prepended to the first human turn when the text has
  none, and an ``"<image>"`` in a ``gpt`` turn is the image the model draws (see
  :mod:`mmgpt.data.llava`). ``conversations`` wins when a row has both.
- **Other modalities.** A row may name files of any modality with a registered loader
  (:mod:`mmgpt.data.loaders`): a column ``<modality>_file_name`` (``audio_file_name``) or
  ``inputs`` (``{"audio": ["a.wav"]}``; in ``metadata.csv`` a JSON cell), relative to the
  metadata file like ``file_name``, which a row with other files may leave out. A caption
  row's user turn starts with one placeholder per file (``"<image>\n<audio>\n"`` + prompt);
  a ``conversations`` row follows LLaVA's rules for each modality.
- Other columns go to ``Sample.meta``; in ``metadata.csv`` a ``conversations`` cell holds JSON.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmgpt.data.llava import (
    check_images_exist,
    check_inputs_exist,
    insert_image_placeholders,
    insert_input_placeholders,
    mark_output_images,
    parse_conversation,
    parse_image_field,
    parse_inputs,
)
from mmgpt.data.loaders import loader_modalities, placeholder_of
from mmgpt.data.records import (
    DataError,
    Problem,
    Record,
    RecordDataset,
    RecordError,
    iter_jsonl,
    outside_root,
    parse_json,
)
from mmgpt.data.sample import (
    DEFAULT_CAPTION_PROMPT,
    IMAGE_OUT_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    Sample,
    Turn,
    split_images,
)
from mmgpt.registry import register

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "TASKS",
    "ImageFolderDataset",
    "caption_turns",
    "drawing_turns",
    "find_metadata_files",
    "read_imagefolder",
    "row_tasks",
]

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# The tasks a caption row can serve, named as the shapes world names them (one recipe's
# data.task works for both); "mixed" is all of them.
TASKS = ("caption", "vqa", "t2i")
DEFAULT_PROMPT_TEMPLATE = "{text}"


def _text_only(caption: str) -> str:
    """A caption is text: an image placeholder in it would not match the row's one image
    (a problem for that row, found when the data is read rather than mid-training)."""
    if IMAGE_PLACEHOLDER in caption or IMAGE_OUT_PLACEHOLDER in caption:
        raise RecordError(
            "bad_value",
            f"the caption holds an image placeholder ({IMAGE_PLACEHOLDER!r} or "
            f"{IMAGE_OUT_PLACEHOLDER!r}); a caption is text only",
        )
    return caption


def caption_turns(
    caption: str, prompt: str = DEFAULT_CAPTION_PROMPT, placeholders: str = IMAGE_PLACEHOLDER
) -> list[Turn]:
    """The conversation of a captioned image (or of the items whose ``placeholders`` lead
    the user turn)."""
    caption = _text_only(caption)
    return [Turn("user", f"{placeholders}\n{prompt}"), Turn("assistant", caption)]


def drawing_turns(caption: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> list[Turn]:
    """The conversation of a drawing: the prompt (``template`` around the caption), then the
    assistant's image."""
    caption = _text_only(caption)
    return [
        Turn("user", template.replace("{text}", caption)),
        Turn("assistant", IMAGE_OUT_PLACEHOLDER),
    ]


def row_tasks(task: Any) -> tuple[str, ...]:
    """The samples a caption row gives, in order (``"caption"``, ``"t2i"`` or both) for a
    dataset ``task``: a name of :data:`TASKS`, ``"mixed"``, or a list of names.

    Raises ``ValueError`` naming the valid values."""
    valid = ", ".join([*TASKS, "mixed"])
    if task == "mixed":
        names = list(TASKS)
    elif isinstance(task, str):
        names = [task]
    elif isinstance(task, (list, tuple)) and task and all(isinstance(t, str) for t in task):
        names = list(task)
    else:
        raise ValueError(
            f"imagefolder: task must be one of {valid}, or a list of {', '.join(TASKS)}; "
            f"got {task!r}"
        )
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(
            f"imagefolder: task must be one of {valid}, or a list of {', '.join(TASKS)}; "
            f"got {task!r} ({unknown[0]!r} is not a task)"
        )
    out = []
    if "caption" in names or "t2i" not in names:
        out.append("caption")
    if "t2i" in names:
        out.append("t2i")
    return tuple(out)


def _check_template(template: Any) -> str:
    if not isinstance(template, str) or "{text}" not in template:
        # YAML reads an unquoted "{text}" (e.g. in a key=value override) as a mapping
        hint = " (quote it in YAML: '\"{text}\"')" if isinstance(template, dict) else ""
        raise ValueError(
            "imagefolder: prompt_template must be a string holding '{text}' (where each row's "
            f"caption goes), e.g. 'draw {{text}}'; got {template!r}{hint}"
        )
    for placeholder in (IMAGE_PLACEHOLDER, IMAGE_OUT_PLACEHOLDER):
        if placeholder in template:
            raise ValueError(
                f"imagefolder: prompt_template must not hold {placeholder!r}: a drawing prompt "
                f"is text only (the row's image is what the model draws); got {template!r}"
            )
    return template


def find_metadata_files(root: str | os.PathLike) -> list[Path]:
    """Every ``metadata.jsonl`` / ``metadata.csv`` under ``root``, sorted.

    Raises ``DataError`` when there is none, or when one directory has both.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (an imagefolder is a directory)")
    files = sorted(p for name in METADATA_NAMES for p in root.rglob(name) if p.is_file())
    if not files:
        raise DataError(
            f"{root}: no metadata.jsonl or metadata.csv found; an imagefolder needs one with a "
            "'file_name' column and a 'text' or 'conversations' column"
        )
    dirs = [p.parent for p in files]
    for directory in dirs:
        if dirs.count(directory) > 1:
            raise DataError(f"{directory}: has both metadata.jsonl and metadata.csv; keep only one")
    return files


# What bytes that are not UTF-8 decode to with errors="surrogateescape".
_UNDECODED = re.compile("[\udc80-\udcff]")


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    # Bytes that are not UTF-8 spoil only the rows that hold them, as in a JSONL file.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2  # line 1 is the header
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if None in row:  # more cells than header columns
                yield line, RecordError("bad_value", "row has more cells than the header")
                continue
            if any(_UNDECODED.search(f"{key}{value}") for key, value in row.items()):
                yield line, RecordError("bad_encoding", "row (or the header) is not UTF-8")
                continue
            inputs = row.get("inputs")
            if inputs:
                try:
                    row["inputs"] = parse_json(inputs)
                except RecordError as exc:
                    yield line, RecordError("bad_json", f"'inputs' cell: {exc}")
                    continue
            else:
                row.pop("inputs", None)
            conversations = row.get("conversations")
            if conversations:
                try:
                    row["conversations"] = parse_json(conversations)
                except RecordError as exc:
                    yield line, RecordError("bad_json", f"'conversations' cell: {exc}")
                    continue
            else:
                row.pop("conversations", None)
            yield line, row
    except csv.Error as exc:  # e.g. a cell above the csv module's size limit
        # The reader cannot resynchronize after this; nothing below it can be located.
        # ``start`` is where the failing row begins (the reader's own count lags behind).
        raise DataError(
            f"{path}:{start}: invalid CSV: {exc}", file=str(path), line=start, reason="bad_csv"
        ) from None


def read_imagefolder(
    root: str | os.PathLike,
    *,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    split: str | None = None,
    task: str | list[str] = "caption",
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> tuple[list[Record], list[Problem]]:
    """Parse every metadata file of an imagefolder into records and problems.

    ``task`` and ``prompt_template`` say which samples a caption row gives (module docstring);
    with two tasks a row gives two records, caption first. Image paths are checked against
    ``root`` (not the split's directory): images that a split's metadata shares from the
    dataset directory stay inside it.
    """
    tasks = row_tasks(task)
    prompt_template = _check_template(prompt_template)
    base = Path(root).resolve()
    root = Path(root) if split is None else Path(root) / split
    records: list[Record] = []
    problems: list[Problem] = []
    for meta_file in find_metadata_files(root):
        rows = iter_jsonl(meta_file) if meta_file.suffix == ".jsonl" else _iter_csv(meta_file)
        for line, row in rows:
            try:
                if isinstance(row, RecordError):
                    raise row
                records.extend(
                    _parse_row(row, meta_file, line, caption_prompt, base, tasks, prompt_template)
                )
            except RecordError as exc:
                problems.append(Problem(str(meta_file), line, exc.reason, str(exc)))
    return records, problems


def _parse_row(
    row: Any,
    meta_file: Path,
    line: int,
    caption_prompt: str,
    base: Path,
    tasks: tuple[str, ...] = ("caption",),
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> list[Record]:
    if not isinstance(row, dict):
        raise RecordError("bad_type", f"a metadata row must be an object, got {type(row).__name__}")
    name = row.get("file_name")
    other_names = _row_inputs(row)
    if name == "" and other_names:
        name = None  # an empty file_name cell of a CSV row that names other files
    if name is None and not other_names:
        raise RecordError("missing_field", "missing field 'file_name'")
    if name is not None and (not isinstance(name, str) or not name):
        raise RecordError("bad_type", f"'file_name' must be a non-empty string, got {name!r:.80}")
    names = [name] if name is not None else []
    if row.get("conversations") is not None:
        turns = mark_output_images(parse_conversation(row["conversations"]))
        turns = insert_image_placeholders(turns, len(names))
        conversations = [insert_input_placeholders(turns, other_names)]
    elif "text" in row and row["text"] is not None:
        text = row["text"]
        if not isinstance(text, str):
            raise RecordError("bad_type", f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RecordError("bad_value", "'text' is empty")
        if "t2i" in tasks and not names:
            raise RecordError(
                "bad_value", "task t2i needs an image ('file_name') to draw, and this row has none"
            )
        marks = [IMAGE_PLACEHOLDER] * len(names) + [
            placeholder_of(m) for m, ns in other_names.items() for _ in ns
        ]
        conversations = [
            caption_turns(text, caption_prompt, "\n".join(marks))
            if task == "caption"
            else drawing_turns(text, prompt_template)
            for task in tasks
        ]
    else:
        raise RecordError("missing_field", "needs a 'text' or a 'conversations' field")
    paths = [meta_file.parent / n for n in names]
    inputs = {m: [meta_file.parent / n for n in ns] for m, ns in other_names.items()}
    check_images_exist(paths)
    check_inputs_exist(inputs)
    used = {"conversations", "inputs", *(f"{m}_file_name" for m in inputs)}
    meta = {k: v for k, v in row.items() if k not in used}
    leaving = outside_root(base, paths + [p for ps in inputs.values() for p in ps])
    return [
        Record(str(meta_file), line, None, paths, turns, dict(meta), leaving, dict(inputs))
        for turns in conversations
    ]


def _row_inputs(row: dict[str, Any]) -> dict[str, list[str]]:
    """Other modalities' files of a metadata row: ``<modality>_file_name`` columns and
    ``inputs`` (module docstring)."""
    nested = {"inputs": row["inputs"]} if row.get("inputs") is not None else {}
    images, others = parse_inputs(nested)
    if images:
        raise RecordError(
            "bad_value", "an imagefolder row names its image in 'file_name', not 'inputs.image'"
        )
    for modality in [m for m in loader_modalities() if m != "image"]:
        column = f"{modality}_file_name"
        if row.get(column) in (None, ""):
            continue
        if modality in others:
            raise RecordError(
                "bad_value", f"{modality!r} files are given twice, in {column!r} and in 'inputs'"
            )
        others[modality] = parse_image_field(row[column], column)
    return others


@register("dataset", "imagefolder")
class ImageFolderDataset(RecordDataset):
    """Samples from a Hugging Face imagefolder; see the module docstring for the layout.

    Args:
        path: the dataset directory.
        caption_prompt: user text of caption samples (after ``"<image>\\n"``).
        split: read ``path/split`` only.
        task: what a row with ``text`` becomes: ``"caption"`` (a caption sample), ``"t2i"``
            (a drawing sample: the image is what the model draws), ``"mixed"`` (both), or a
            list of tasks (module docstring). Rows with ``conversations`` are used as is.
        prompt_template: the user turn of drawing samples; ``{text}`` is replaced by the
            row's caption (e.g. ``"draw {text}"``). Default: the caption itself.
        strict: raise on the first problem (naming file and line) instead of skipping it.
        max_pixels: refuse larger images (see ``load_image``).
        verify_images: decode every image now, so ``skipped`` is complete before training.
        allow_outside_root: accept ``file_name``s that leave ``path`` (``..``, absolute
            paths, symlinks out); refused with a ``DataError`` otherwise.
    """

    format_name = "imagefolder"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        split: str | None = None,
        task: str | list[str] = "caption",
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        strict: bool = False,
        max_pixels: int | None = None,
        verify_images: bool = False,
        allow_outside_root: bool = False,
    ) -> None:
        records, problems = read_imagefolder(
            path,
            caption_prompt=caption_prompt,
            split=split,
            task=task,
            prompt_template=prompt_template,
        )
        self.task = task
        super().__init__(
            records,
            problems,
            source=str(path),
            strict=strict,
            max_pixels=max_pixels,
            verify_images=verify_images,
            allow_outside_root=allow_outside_root,
        )

    def build(self, record: Record, images: list[Any]) -> Sample:
        meta = {**record.meta, "source": record.file, "line": record.line}
        inputs, outputs = split_images(record.data, images)
        return Sample(list(record.data), images=inputs, output_images=outputs, meta=meta)
