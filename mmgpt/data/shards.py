"""Tar shards in the webdataset layout, read as a stream (registry name ``shards``).

```
shards/
  shard-000000.tar      0001.jpg  0001.txt               a caption
                        0002.png  0002.json              {"conversations": [...]} or {"text": ...}
  shard-000001.tar      ...
```

- A *sample* is the run of consecutive members whose names share a key: the name up to the
  first ``.`` of its last component (``a/0001.jpg`` and ``a/0001.txt`` → key ``a/0001``), as
  webdataset groups them. Image members (``jpg``, ``png``, ``webp``, ... — the formats the safe
  loader accepts — or ``0.png``, ``1.jpg`` for several) are the sample's images, in member
  order; ``txt`` is a caption; ``json`` is
  a row of :mod:`mmgpt.data.columns` (``conversations``, ``texts``, ``text``/``caption``),
  the caption of a ``txt`` member filling its ``text``. Other members are ignored.
- ``path`` is a shard (``.tar``, ``.tar.gz``, ``.tgz``), a directory of them, or a pattern:
  a glob (``shards/*.tar``) or braces (``shard-{000000..000009}.tar``, ``{a,b}.tar``).
- Shards are read one after the other, never extracted, and image members are read only
  when their sample is batched. :class:`~mmgpt.data.loader.StreamingLoader` shuffles the
  shard order and a buffer of samples, and resumes exactly where a checkpoint left off.
- An unusable sample (no image, no text, bad JSON, a member above 64 MiB, a link) is skipped
  and counted; problems name the shard, the number of the sample's first member (as the
  ``line``) and the key (as the ``id``). A damaged shard header ends that shard with a problem.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from mmgpt.data.columns import InlineImage, Layout, PendingSample, parse_row
from mmgpt.data.errors import DataError
from mmgpt.data.imagefolder import DEFAULT_PROMPT_TEMPLATE
from mmgpt.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError
from mmgpt.data.loader import DEFAULT_SHUFFLE_BUFFER, StreamDataset, StreamItem
from mmgpt.data.records import Problem, RecordError, parse_json
from mmgpt.data.sample import DEFAULT_CAPTION_PROMPT
from mmgpt.registry import register

__all__ = [
    "MAX_MEMBER_BYTES",
    "SHARD_SUFFIXES",
    "ShardDataset",
    "TarMember",
    "entry_row",
    "expand_braces",
    "iter_entries",
    "resolve_shards",
    "split_key",
]

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_SUFFIXES = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
TEXT_SUFFIXES = ("txt", "json")
# A member larger than this is not read: a shard is untrusted input.
MAX_MEMBER_BYTES = 64 << 20
_DONE = -1  # a cursor offset: nothing more to read in this shard


# -- finding the shards ---------------------------------------------------------------------
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` → ``shard-000.tar``, ``shard-001.tar``, ``shard-002.tar``;
    ``{a,b}`` → ``a``, ``b``. A range keeps the zero padding of its bounds."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
        start, stop = int(first), int(last)
        step = 1 if stop >= start else -1
        if abs(stop - start) > 1_000_000:
            raise DataError(f"{pattern}: the range {{{body}}} has more than a million shards")
        options = [str(i).zfill(width) for i in range(start, stop + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _is_shard(path: Path) -> bool:
    return path.name.endswith(SHARD_SUFFIXES) and path.is_file()


def resolve_shards(spec: str | os.PathLike) -> list[Path]:
    """The shard files of ``spec``: a shard, a directory of shards (sorted), or a glob or
    brace pattern (in the pattern's order). ``DataError`` when there are none or one named
    by a brace pattern is missing."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if _is_shard(p))
        if not found:
            raise DataError(
                f"{path}: no tar shards ({', '.join(SHARD_SUFFIXES)}) in this directory"
            )
        return found
    if path.is_file():
        return [path]
    found = []
    for pattern in expand_braces(str(spec)):
        if glob.has_magic(pattern):
            found += sorted(Path(p) for p in glob.glob(pattern) if _is_shard(Path(p)))
        elif Path(pattern).is_file():
            found.append(Path(pattern))
        else:
            raise DataError(f"{pattern}: shard not found (from {spec})")
    if not found:
        raise DataError(f"{spec}: no tar shards match")
    return found


def split_key(name: str) -> tuple[str, str] | None:
    """``"a/0001.seg.png"`` → ``("a/0001", "seg.png")`` (webdataset's grouping); ``None``
    for a name without a suffix or a hidden file (``._0001.jpg`` of macOS archives)."""
    directory, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


# -- reading a shard ------------------------------------------------------------------------
@dataclass(frozen=True)
class TarMember:
    """An image member of a plain tar shard, read only when needed."""

    shard: Path
    name: str
    offset: int  # of the member's data
    size: int

    def read_bytes(self) -> bytes:
        """The member's bytes; ``ImageLoadError`` when the shard cannot give them."""
        try:
            with open(self.shard, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as exc:
            raise ImageLoadError(str(self), "unreadable_image", f"cannot read it ({exc})") from None
        if len(data) != self.size:
            raise ImageLoadError(
                str(self), "truncated_image", "the shard ends inside this member (truncated)"
            )
        return data

    def __str__(self) -> str:
        return f"{self.shard}: {self.name}"


@dataclass
class Entry:
    """The members of one sample: texts read, images as sources, what is wrong with it."""

    key: str
    offset: int  # of its first member's header
    member: int  # the number of its first member in the shard, from 1
    texts: dict[str, bytes] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)
    issues: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)
    next_offset: int = _DONE
    next_member: int = 0


def _open(path: Path) -> IO[bytes]:
    if path.name.endswith(".tar"):
        return open(path, "rb")
    return gzip.open(path, "rb")


def iter_entries(path: Path, offset: int = 0, member: int = 1) -> Iterator[Entry | Problem]:
    """The samples of the shard ``path`` from the member whose header is at ``offset`` on
    (``member``: its number, for messages). A damaged or truncated shard ends with a
    :class:`Problem` naming the member where reading stopped."""
    if offset == _DONE:
        return
    plain = path.name.endswith(".tar")
    try:
        handle = _open(path)
    except OSError as exc:
        yield Problem(str(path), None, "unreadable_shard", f"cannot open the shard ({exc})")
        return
    with handle:
        try:
            handle.seek(offset)
            tar = tarfile.TarFile(fileobj=handle, mode="r")
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            if offset == 0:
                yield Problem(str(path), member, "bad_shard", f"not a readable tar file ({exc})")
            else:
                yield Problem(
                    str(path), member, "bad_shard", f"cannot read the shard from here ({exc})"
                )
            return
        entry: Entry | None = None
        number = member - 1
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                if entry is not None:
                    yield entry
                yield Problem(
                    str(path),
                    number + 1,
                    "bad_shard",
                    f"unreadable tar header ({exc}); the rest of the shard is skipped",
                )
                return
            if info is None:
                break
            number += 1
            tar.members.clear()  # tarfile keeps every header otherwise
            parts = split_key(info.name)
            if parts is None or info.isdir():
                continue
            key, suffix = parts
            if entry is None or key != entry.key:
                if entry is not None:
                    entry.next_offset, entry.next_member = info.offset, number
                    yield entry
                entry = Entry(key, info.offset, number)
            _add_member(path, tar, info, suffix, entry, plain)
        end = tar.offset
        if entry is not None:
            entry.next_offset, entry.next_member = _DONE, number + 1
            yield entry
        problem = _trailing_garbage(path, handle, end, number)
        if problem is not None:
            yield problem


def _add_member(
    path: Path, tar: tarfile.TarFile, info: tarfile.TarInfo, suffix: str, entry: Entry, plain: bool
) -> None:
    is_image = suffix.rpartition(".")[2] in IMAGE_SUFFIXES  # "png", or "1.png" of several
    if not (is_image or suffix in TEXT_SUFFIXES):
        return
    if not info.isfile():
        entry.issues.append(("bad_member", f"{info.name} is a link or a special file, not read"))
        return
    if info.size > MAX_MEMBER_BYTES:
        entry.issues.append(
            ("too_large", f"{info.name} is {info.size} bytes, above {MAX_MEMBER_BYTES}")
        )
        return
    if is_image and plain:
        entry.images.append(TarMember(path, info.name, info.offset_data, info.size))
        return
    try:
        extracted = tar.extractfile(info)
        data = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        entry.issues.append(("truncated_image", f"{info.name}: cannot read it ({exc})"))
        return
    if len(data) != info.size:
        entry.issues.append(("truncated_image", f"{info.name}: the shard ends inside it"))
    elif is_image:
        entry.images.append(InlineImage(data, f"{path}: {info.name}"))
    elif suffix in entry.texts:
        entry.issues.append(("bad_value", f"two '{suffix}' members for key {entry.key!r}"))
    else:
        entry.texts[suffix] = data


def _trailing_garbage(path: Path, handle: IO[bytes], end: int, number: int) -> Problem | None:
    """A problem when what follows the last header tarfile read is neither the end of the
    file nor the zero blocks that end an archive (tarfile stops silently at a bad header)."""
    try:
        handle.seek(end)
        block = handle.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError, ValueError) as exc:
        return Problem(
            str(path), number + 1, "bad_shard", f"unreadable after member {number} ({exc})"
        )
    if block.strip(b"\0"):
        return Problem(
            str(path),
            number + 1,
            "bad_shard",
            f"unreadable tar header at byte {end} (after member {number}); the rest of the "
            "shard is skipped",
        )
    return None


def entry_row(entry: Entry) -> dict[str, Any]:
    """The row of a sample: its JSON, with the ``txt`` caption as ``text``. ``RecordError``."""
    row: dict[str, Any] = {}
    if "json" in entry.texts:
        try:
            text = entry.texts["json"].decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RecordError(
                "bad_encoding", f"{entry.key}.json is not UTF-8 ({exc.reason})"
            ) from None
        try:
            value = parse_json(text)
        except RecordError as exc:
            raise RecordError("bad_json", f"{entry.key}.json: {exc}") from None
        if not isinstance(value, dict):
            raise RecordError(
                "bad_type", f"{entry.key}.json must hold an object, got {type(value).__name__}"
            )
        row.update(value)
    if "txt" in entry.texts:
        try:
            caption = entry.texts["txt"].decode("utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            raise RecordError(
                "bad_encoding", f"{entry.key}.txt is not UTF-8 ({exc.reason})"
            ) from None
        row.setdefault("text", caption)
    if not row:
        raise RecordError(
            "missing_field", f"sample {entry.key!r} has no .txt or .json member (its text)"
        )
    return row


@register("dataset", "shards")
class ShardDataset(StreamDataset):
    """Samples streamed from tar shards; see the module docstring for the layout.

    Args:
        path: a shard, a directory of shards, or a glob or brace pattern.
        task: what a caption becomes: ``"caption"``, ``"t2i"`` (a drawing sample), ``"mixed"``
            (both, one after the other), as for an imagefolder. Conversations are used as is.
        caption_prompt: user text of caption samples (after ``"<image>\\n"``).
        prompt_template: the user turn of drawing samples, ``{text}`` replaced by the caption.
        text_column: the JSON field holding the caption (default ``text``, else ``caption``).
        shuffle_buffer: samples the training loader shuffles among (1: the shards' order).
        strict: raise on the first problem instead of skipping the sample.
        max_pixels: refuse larger images (see ``load_image``).
    """

    format_name = "shards"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        task: str | list[str] = "caption",
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        text_column: str | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        strict: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int):
            raise ValueError(f"shards: shuffle_buffer must be an integer, got {shuffle_buffer!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"shards: shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.layout = Layout.make(
            "shards",
            text_column=text_column,
            task=task,
            caption_prompt=caption_prompt,
            prompt_template=prompt_template,
        )
        self.task = task
        self.paths = resolve_shards(path)
        self.shards = [str(p) for p in self.paths]
        self.source = str(path)
        self.shuffle_buffer = shuffle_buffer
        self.strict = strict
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.problems: list[Problem] = []
        self.skipped: dict[str, int] = {}

    def fingerprint(self) -> str:
        sizes = [[p.name, p.stat().st_size] for p in self.paths]
        return hashlib.sha256(json.dumps(sizes).encode("utf-8")).hexdigest()[:16]

    def items(self, shard: int, entry: Entry) -> list[StreamItem]:
        """The stream items of one sample of ``shard``: one per conversation (two for a
        caption with ``task="mixed"``), or one problem."""
        path = self.paths[shard]
        after = [entry.next_offset, entry.next_member, 0]
        ref = [entry.offset, entry.member, 0]
        item = StreamItem(shard, ref, after, str(path), entry.member, entry.key)
        try:
            if entry.issues:
                raise RecordError(*entry.issues[0])
            row = parse_row(entry_row(entry), self.layout, images=entry.images)
        except RecordError as exc:
            item.problem = item.fail(exc.reason, str(exc))
            return [item]
        meta = {**row.meta, "key": entry.key, "source": str(path), "line": entry.member}
        conversations = row.conversations(self.layout)
        out = []
        for k, turns in enumerate(conversations):
            last = k == len(conversations) - 1
            cursor = after if last else [entry.offset, entry.member, k + 1]
            sample = PendingSample(turns, list(entry.images), dict(meta))
            ref = [entry.offset, entry.member, k]
            out.append(replace(item, ref=ref, cursor=cursor, sample=sample))
        return out

    def read_shard(self, shard: int, cursor: Any = None) -> Iterator[StreamItem]:
        offset, member, skip = cursor if cursor is not None else (0, 1, 0)
        path = self.paths[shard]
        for entry in iter_entries(path, int(offset), int(member)):
            if isinstance(entry, Problem):
                yield StreamItem(
                    shard, [_DONE, 0, 0], [_DONE, 0, 0], entry.file, entry.line, problem=entry
                )
                return
            items = self.items(shard, entry)
            if skip:
                items, skip = items[skip:], 0
            yield from items

    def read_item(self, shard: int, ref: Any) -> StreamItem:
        for item in self.read_shard(shard, ref):
            if item.problem is None and item.ref == list(ref):
                return item
            break
        raise DataError(
            f"{self.paths[shard]}: no usable sample at member {ref[1]} (byte {ref[0]}) any "
            "more; the shard changed since the position was saved",
            file=str(self.paths[shard]),
            line=int(ref[1]),
        )

    def decode(self, item: StreamItem) -> Any:
        return item.sample.load(self.max_pixels)
