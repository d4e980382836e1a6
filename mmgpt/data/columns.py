"""Rows of downloaded datasets → conversations: the column layouts that parquet files, Hugging
Face ``datasets`` directories and tar shards share.

A *row* is a mapping of column → value (a parquet or arrow row, the JSON of a tar sample).
Its conversation comes from the first of these columns it has:

- ``conversations`` (LLaVA-Instruct): ``[{"from": "human"|"gpt", "value": ...}]``, with
  LLaVA's rules (:mod:`mmgpt.data.llava`): ``"<image>"`` prepended to the first human turn
  when the text has none, an ``"<image>"`` in a ``gpt`` turn is an image the model draws;
- ``texts`` (the Cauldron): ``[{"user": ..., "assistant": ..., "source": ...}]``, one user
  and one assistant turn per element, the images before the first user turn;
- ``text`` or ``caption`` (or the column ``text_column`` names): a caption, which becomes a
  caption sample, a drawing sample or both by ``task`` (as in an imagefolder).

Images come from the ``images`` or ``image`` column (or ``image_column``); a cell is one image
or a list of them, each the bytes of an image file, ``{"bytes": ..., "path": ...}`` (how
``datasets.Image`` stores them; the bytes win when both are there) or a path. Scalar columns
other than these go to ``Sample.meta``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgpt.data.imagefolder import (
    DEFAULT_PROMPT_TEMPLATE,
    _check_template,
    caption_turns,
    drawing_turns,
    row_tasks,
)
from mmgpt.data.images import DEFAULT_MAX_PIXELS, load_image, load_image_bytes
from mmgpt.data.llava import (
    check_images_exist,
    insert_image_placeholders,
    mark_output_images,
    parse_conversation,
)
from mmgpt.data.records import RecordError
from mmgpt.data.sample import DEFAULT_CAPTION_PROMPT, Sample, Turn, split_images

__all__ = [
    "IMAGE_COLUMNS",
    "TEXT_COLUMNS",
    "InlineImage",
    "Layout",
    "PendingSample",
    "Row",
    "check_image_files",
    "load_source",
    "parse_images",
    "parse_row",
]

IMAGE_COLUMNS = ("images", "image")
TEXT_COLUMNS = ("text", "caption")
CONVERSATION_COLUMNS = ("conversations", "texts")
_SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class InlineImage:
    """The bytes of an image file held in memory, and where they came from (for errors)."""

    data: bytes = field(repr=False)
    name: str

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.name


def load_source(source: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Any:
    """An RGB image from an image source: a file (``Path``) or anything with ``read_bytes()``
    (:class:`InlineImage`, a tar member), through the safe loader. Raises ``ImageLoadError``."""
    if isinstance(source, Path):
        return load_image(source, max_pixels=max_pixels)
    return load_image_bytes(source.read_bytes(), name=str(source), max_pixels=max_pixels)


def check_image_files(paths: Sequence[Path]) -> None:
    """``RecordError`` unless every path is an existing file (``missing_image``), also for
    a path the system cannot look up (too long, …)."""
    try:
        check_images_exist(paths)
    except OSError as exc:
        raise RecordError(
            "bad_value", f"an image path cannot be looked up ({exc.strerror or exc})"
        ) from None


@dataclass(frozen=True)
class Layout:
    """How rows become samples: the columns to read (``None``: the first of the usual names
    present) and, for caption rows, the tasks and prompts (see :mod:`mmgpt.data.imagefolder`)."""

    image_column: str | None = None
    text_column: str | None = None
    tasks: tuple[str, ...] = ("caption",)
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    @classmethod
    def make(
        cls,
        format_name: str,
        *,
        image_column: str | None = None,
        text_column: str | None = None,
        task: str | list[str] = "caption",
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    ) -> Layout:
        """A validated layout; a bad option is a ``ValueError`` naming ``format_name``."""
        for name, value in (("image_column", image_column), ("text_column", text_column)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{format_name}: {name} must be a column name, got {value!r}")
        if not isinstance(caption_prompt, str):
            raise ValueError(f"{format_name}: caption_prompt must be a string")
        try:
            tasks = row_tasks(task)
            template = _check_template(prompt_template)
        except ValueError as exc:  # the checks are imagefolder's: name this format instead
            raise ValueError(f"{format_name}: {str(exc).removeprefix('imagefolder: ')}") from None
        return cls(image_column, text_column, tasks, caption_prompt, template)


@dataclass
class Row:
    """A usable row: its images (``bytes`` or a path as the row writes it) and either a
    caption (``text``) or a whole conversation (``turns``, placeholders checked)."""

    images: list[bytes | str]
    text: str | None = None
    turns: list[Turn] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def conversations(self, layout: Layout) -> list[list[Turn]]:
        """The samples' conversations: the row's own, or one per task for a caption."""
        if self.turns is not None:
            return [self.turns]
        assert self.text is not None
        return [
            caption_turns(self.text, layout.caption_prompt)
            if task == "caption"
            else drawing_turns(self.text, layout.prompt_template)
            for task in layout.tasks
        ]


def parse_images(value: Any, column: str) -> list[bytes | str]:
    """An image cell → ``bytes`` (embedded) or ``str`` (a path) per image; ``RecordError``."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[bytes | str] = []
    for i, item in enumerate(items):
        where = f"{column!r}" if not isinstance(value, list) else f"{column}[{i}]"
        if isinstance(item, Mapping):
            data, path = item.get("bytes"), item.get("path")
            if data is not None:
                item = data
            elif path is not None:
                item = path
            else:
                raise RecordError("missing_image", f"{where} has neither 'bytes' nor 'path'")
        if isinstance(item, (bytes, bytearray)):
            if not item:
                raise RecordError("missing_image", f"{where} holds no bytes")
            out.append(bytes(item))
        elif isinstance(item, str):
            if not item or "\x00" in item:
                raise RecordError("bad_value", f"{where} is not a usable path: {item!r:.80}")
            out.append(item)
        else:
            raise RecordError(
                "bad_type",
                f"{where} must be image bytes, {{'bytes', 'path'}} or a path, "
                f"got {type(item).__name__}",
            )
    return out


def _cauldron_turns(value: Any) -> list[Turn]:
    if not isinstance(value, list):
        raise RecordError("bad_type", f"'texts' must be a list, got {type(value).__name__}")
    if not value:
        raise RecordError("bad_value", "'texts' is empty")
    turns = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise RecordError(
                "bad_type", f"texts[{i}] must be an object, got {type(item).__name__}"
            )
        for key in ("user", "assistant"):
            text = item.get(key)
            if text is None:
                raise RecordError("missing_field", f"texts[{i}] has no {key!r}")
            if not isinstance(text, str):
                raise RecordError(
                    "bad_type", f"texts[{i}].{key} must be a string, got {type(text).__name__}"
                )
            turns.append(Turn(key, text))
    return mark_output_images(turns, "texts")


def _text_column(row: Mapping[str, Any], layout: Layout) -> str | None:
    if layout.text_column is not None:
        return layout.text_column if row.get(layout.text_column) is not None else None
    return next((c for c in TEXT_COLUMNS if row.get(c) is not None), None)


def image_column(row: Mapping[str, Any], layout: Layout) -> str | None:
    """The column a row's images are in (``None`` when it has none)."""
    if layout.image_column is not None:
        return layout.image_column
    return next((c for c in IMAGE_COLUMNS if c in row), None)


def parse_row(row: Any, layout: Layout, images: Sequence[bytes | str] | None = None) -> Row:
    """A row → :class:`Row`; ``RecordError`` says what is unusable.

    ``images``: the row's images when they do not come from a column (tar members); the
    image columns are then ignored.
    """
    if not isinstance(row, Mapping):
        raise RecordError("bad_type", f"a row must be an object, got {type(row).__name__}")
    used: set[str] = set()
    if images is None:
        column = image_column(row, layout)
        found = parse_images(row.get(column), column) if column is not None else []
        used.add(column or "")
    else:
        found = list(images)
        used |= set(IMAGE_COLUMNS) | {layout.image_column or ""}
    text_column = _text_column(row, layout)
    if row.get("conversations") is not None:
        turns = mark_output_images(parse_conversation(row["conversations"]))
        result = Row(found, turns=insert_image_placeholders(turns, len(found)))
    elif row.get("texts") is not None:
        turns = _cauldron_turns(row["texts"])
        result = Row(found, turns=insert_image_placeholders(turns, len(found)))
    elif text_column is not None:
        text = row[text_column]
        if not isinstance(text, str):
            raise RecordError(
                "bad_type", f"{text_column!r} must be a string, got {type(text).__name__}"
            )
        if not text.strip():
            raise RecordError("bad_value", f"{text_column!r} is empty")
        if len(found) != 1:
            raise RecordError(
                "placeholder_mismatch",
                f"a caption row needs one image, got {len(found)}",
            )
        result = Row(found, text=text)
        used.add(text_column)
    else:
        wanted = layout.text_column or " or ".join(repr(c) for c in TEXT_COLUMNS)
        raise RecordError(
            "missing_field",
            f"needs a 'conversations' (LLaVA), 'texts' (the Cauldron) or {wanted} column",
        )
    used |= set(CONVERSATION_COLUMNS)
    result.meta = {
        k: v
        for k, v in row.items()
        if isinstance(k, str) and k not in used and (v is None or isinstance(v, _SCALARS))
    }
    ident = row.get("id")
    result.id = None if ident is None or not isinstance(ident, _SCALARS) else str(ident)
    return result


def build_sample(turns: list[Turn], images: list[Any], meta: dict[str, Any]) -> Sample:
    """The sample of a conversation whose images (in placeholder order) loaded."""
    inputs, outputs = split_images(turns, images)
    return Sample(list(turns), images=inputs, output_images=outputs, meta=meta)


@dataclass
class PendingSample:
    """A sample whose images are not loaded yet: the conversation, the image sources (in
    placeholder order, see :func:`load_source`) and ``meta``."""

    turns: list[Turn]
    images: list[Any]
    meta: dict[str, Any]

    def load(self, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Sample:
        """The sample, its images loaded through the safe loader (``ImageLoadError``)."""
        images = [load_source(source, max_pixels) for source in self.images]
        return build_sample(self.turns, images, self.meta)
