"""``mmgpt data convert SRC DST --to imagefolder|parquet|shards``: rewrite a dataset in another
format.

Sources: COCO captions JSON (``images[{id, file_name}]`` + ``annotations[{image_id,
caption}]``: one row per caption), an imagefolder, LLaVA JSON, parquet files, a ``datasets``
directory and tar shards (detected as ``mmgpt data check`` does; ``source_format`` to choose).
Targets:

- ``imagefolder``: ``DST/images/00000000.png`` ... and ``DST/metadata.jsonl`` with
  ``file_name`` and ``text`` (a caption) or ``conversations`` (LLaVA's ``[{from, value}]``);
  an imagefolder row holds one image, so rows with none or several are problems;
- ``parquet``: ``DST/train-00000-of-0000N.parquet``, ``shard_size`` rows each: an ``image``
  column (``images``, a list, when some row has not exactly one) of ``{bytes, path}`` as
  ``datasets.Image`` stores them, ``text``, ``conversations`` and ``id``; the schema carries
  ``datasets``' feature metadata, so ``datasets.load_dataset("parquet", ...)`` decodes the
  images;
- ``shards``: ``DST/shard-000000.tar`` ..., ``shard_size`` samples each, in the webdataset
  layout (``00000000.png`` + ``00000000.txt``, or ``00000000.json`` holding
  ``{"conversations": ...}``; several images are ``00000000.0.png``, ``00000000.1.jpg``).

Images are copied byte for byte, never re-encoded, after the checks of the safe loader's
header reading (allowed formats, pixel and memory budgets); an image several rows share (COCO's
five captions) is written once. Image paths that leave the source's image directory are
problems unless ``allow_outside_root``. Unusable rows are skipped and reported with their file
and row; ``DST`` is written completely or not at all (``mmgpt.files.atomic_directory``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgpt.data.check import detect_format
from mmgpt.data.columns import Layout, image_column, parse_row
from mmgpt.data.errors import DataError
from mmgpt.data.imagefolder import caption_turns, read_imagefolder
from mmgpt.data.images import ImageLoadError, image_extension, open_image_bytes
from mmgpt.data.llava import read_llava, turns_to_llava
from mmgpt.data.parquet import (
    EmbeddedImage,
    TableRows,
    hf_dataset_files,
    parquet_files,
    read_table,
    require_pyarrow,
)
from mmgpt.data.records import Problem, RecordError, outside_root
from mmgpt.data.sample import IMAGE_OUT_PLACEHOLDER, IMAGE_PLACEHOLDER, Turn
from mmgpt.data.shards import Entry, entry_row, iter_entries, resolve_shards
from mmgpt.files import atomic_directory

__all__ = [
    "CONVERT_SOURCES",
    "CONVERT_TARGETS",
    "ConvertReport",
    "ConvertRow",
    "convert_dataset",
    "read_rows",
]

CONVERT_SOURCES = ("coco", "imagefolder", "llava", "parquet", "hf_dataset", "shards")
CONVERT_TARGETS = ("imagefolder", "parquet", "shards")
DEFAULT_SHARD_SIZE = 10_000
_MAX_LISTED = 50
_RESERVED = {"file_name", "text", "conversations", "image", "images", "source", "line"}


@dataclass
class ConvertRow:
    """One row to write: where it came from, its image sources (a ``Path``, or anything with
    ``read_bytes()``), and a caption (``text``) or a conversation (``turns``)."""

    file: str
    line: int | None
    images: list[Any]
    text: str | None = None
    turns: list[Turn] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def problem(self, reason: str, message: str) -> Problem:
        return Problem(self.file, self.line, reason, message)


@dataclass
class ConvertReport:
    """What ``convert_dataset`` did: rows and images written, rows skipped (``problems``)."""

    source: str
    target: str
    source_format: str
    target_format: str
    rows: int = 0
    images: int = 0
    files: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """What ``mmgpt data convert`` exits with: 1 when rows were skipped, else 0."""
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "from": self.source_format,
            "to": self.target_format,
            "rows": self.rows,
            "images": self.images,
            "files": self.files,
            "problem_counts": dict(sorted(Counter(p.reason for p in self.problems).items())),
            "problems": [p.to_dict() for p in self.problems],
        }

    def to_text(self) -> str:
        lines = [
            f"converted: {self.source} ({self.source_format}) -> {self.target} "
            f"({self.target_format})",
            f"written:   {self.rows} rows, {self.images} images, {self.files} files",
        ]
        if self.problems:
            counts = Counter(p.reason for p in self.problems)
            summary = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))
            lines.append(f"skipped:   {len(self.problems)} rows ({summary})")
            lines.extend(f"  {p}" for p in self.problems[:_MAX_LISTED])
            if len(self.problems) > _MAX_LISTED:
                lines.append(f"  ... and {len(self.problems) - _MAX_LISTED} more")
        else:
            lines.append("skipped:   none")
        return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


# -- reading --------------------------------------------------------------------------------
def _is_coco(path: Path) -> bool:
    if path.suffix != ".json" or not path.is_file():
        return False
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"{"):
        return False
    return b'"annotations"' in head or b'"images"' in head or b'"info"' in head


def detect_source(path: str | os.PathLike) -> tuple[str, Path]:
    """``(format, path to read)`` of a conversion source: COCO captions JSON (an object with
    ``images`` and ``annotations``) or what :func:`~mmgpt.data.check.detect_format` finds."""
    path = Path(path)
    if _is_coco(path):
        return "coco", path
    fmt, target = detect_format(path)
    if fmt not in CONVERT_SOURCES:
        raise DataError(
            f"{path}: a {fmt} dataset cannot be converted; sources are {', '.join(CONVERT_SOURCES)}"
        )
    return fmt, target


class _TableImage:
    """An image of a table row, read from the table when written."""

    def __init__(self, rows: TableRows, ref: EmbeddedImage) -> None:
        self.rows, self.ref = rows, ref

    def read_bytes(self) -> bytes:
        return self.rows.image_bytes(self.ref)

    def __str__(self) -> str:
        return str(self.ref)


def _scalars(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in meta.items()
        if k not in _RESERVED and (v is None or isinstance(v, (str, int, float, bool)))
    }


def _read_coco(
    path: Path, image_root: Path, allow_outside_root: bool
) -> Iterator[ConvertRow | Problem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})", file=str(path)) from None
    images, annotations = (
        (data.get("images"), data.get("annotations")) if isinstance(data, dict) else (None, None)
    )
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(
            f"{path}: COCO captions need lists 'images' [{{id, file_name}}] and "
            "'annotations' [{image_id, caption}]",
            file=str(path),
        )
    names: dict[Any, str] = {}
    for i, image in enumerate(images):
        if isinstance(image, dict) and isinstance(image.get("file_name"), str):
            ident = image.get("id")
            if isinstance(ident, (int, str)) and not isinstance(ident, bool):
                names[ident] = image["file_name"]
                continue
        yield Problem(str(path), None, "bad_value", f"images[{i}] needs an 'id' and a 'file_name'")
    base = image_root.resolve()
    for i, note in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(note, dict):
            yield Problem(str(path), None, "bad_type", f"{where} must be an object")
            continue
        caption, ident = note.get("caption"), note.get("image_id")
        if not isinstance(caption, str) or not caption.strip():
            yield Problem(str(path), None, "missing_field", f"{where} has no caption")
            continue
        if isinstance(ident, bool) or not isinstance(ident, (int, str)) or ident not in names:
            yield Problem(
                str(path), None, "bad_value", f"{where}: image_id {ident!r} not in images"
            )
            continue
        image = image_root / names[ident]
        leaving = outside_root(base, [image])
        if leaving and not allow_outside_root:
            yield Problem(str(path), None, "outside_root", f"{where}: {leaving[0]}")
            continue
        meta = {"image_id": ident}
        if isinstance(note.get("id"), (int, str)):
            meta["id"] = note["id"]
        yield ConvertRow(str(path), None, [image], text=caption.strip(), meta=meta)


def _caption_of(record: Any) -> str | None:
    """The caption of an imagefolder record read with task caption (``None``: a
    conversation row)."""
    text = record.meta.get("text")
    if not isinstance(text, str) or IMAGE_PLACEHOLDER in text or IMAGE_OUT_PLACEHOLDER in text:
        return None
    return text if record.data == caption_turns(text) else None


def read_rows(
    path: str | os.PathLike,
    source_format: str,
    *,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> Iterator[ConvertRow | Problem]:
    """The rows of a source, in order, with a :class:`Problem` for each unusable one.
    Images are read only when written."""
    path = Path(path)
    if source_format == "coco":
        root = Path(image_root) if image_root is not None else path.parent
        yield from _read_coco(path, root, allow_outside_root)
    elif source_format in ("imagefolder", "llava"):
        if source_format == "imagefolder":
            records, problems = read_imagefolder(path)
        else:
            records, problems = read_llava(path, image_root=image_root)
        yield from problems
        for record in records:
            if record.outside_root and not allow_outside_root:
                yield record.problem("outside_root", record.outside_root[0])
                continue
            if record.inputs:
                # the target formats carry images only: a row must not lose its other files
                kinds = ", ".join(sorted(record.inputs))
                yield record.problem(
                    "unsupported_modality",
                    f"the row has {kinds} files; data convert writes images only (train on "
                    "the LLaVA JSON or imagefolder as it is)",
                )
                continue
            caption = _caption_of(record) if source_format == "imagefolder" else None
            turns = None if caption is not None else list(record.data)
            meta = _scalars({**record.meta, **({"id": record.id} if record.id else {})})
            yield ConvertRow(
                record.file, record.line, list(record.image_paths), caption, turns, meta
            )
    elif source_format in ("parquet", "hf_dataset"):
        yield from _read_table_rows(path, source_format, image_root, allow_outside_root)
    elif source_format == "shards":
        for shard in resolve_shards(path):
            for entry in iter_entries(shard):
                if isinstance(entry, Problem):
                    yield entry
                    continue
                yield _shard_row(shard, entry)
    else:
        raise ValueError(f"source format must be one of {CONVERT_SOURCES}, got {source_format!r}")


def _read_table_rows(
    path: Path,
    source_format: str,
    image_root: str | os.PathLike | None,
    allow_outside_root: bool,
) -> Iterator[ConvertRow | Problem]:
    if source_format == "parquet":
        files, default_root = parquet_files(path), None
    else:
        default_root, files = hf_dataset_files(path)
    layout = Layout()
    for file in files:
        root = Path(image_root or default_root or file.parent)
        base = root.resolve()
        table = read_table(file)
        holder = TableRows([], [], {str(file): table})
        row_number = 0
        for batch in table.to_batches(max_chunksize=256):
            for values in batch.to_pylist():
                row, row_number = row_number, row_number + 1
                try:
                    parsed = parse_row(values, layout)
                except RecordError as exc:
                    yield Problem(str(file), row + 1, exc.reason, str(exc))
                    continue
                column = image_column(values, layout) or "image"
                sources: list[Any] = []
                for index, image in enumerate(parsed.images):
                    if isinstance(image, bytes):
                        ref = EmbeddedImage(str(file), row, column, index)
                        sources.append(_TableImage(holder, ref))
                    else:
                        sources.append(root / image)
                paths = [s for s in sources if isinstance(s, Path)]
                leaving = outside_root(base, paths)
                if leaving and not allow_outside_root:
                    yield Problem(str(file), row + 1, "outside_root", leaving[0])
                    continue
                meta = _scalars({**parsed.meta, **({"id": parsed.id} if parsed.id else {})})
                yield ConvertRow(str(file), row + 1, sources, parsed.text, parsed.turns, meta)


def _shard_row(shard: Path, entry: Entry) -> ConvertRow | Problem:
    try:
        if entry.issues:
            raise RecordError(*entry.issues[0])
        parsed = parse_row(entry_row(entry), Layout(), images=entry.images)
    except RecordError as exc:
        return Problem(str(shard), entry.member, exc.reason, str(exc), entry.key)
    meta = _scalars({**parsed.meta, "key": entry.key})
    return ConvertRow(str(shard), entry.member, list(entry.images), parsed.text, parsed.turns, meta)


# -- writing --------------------------------------------------------------------------------
class _Images:
    """Reads and checks image sources (each once) and names the files written for them:
    an image several rows share (by source, or by content) is written once."""

    def __init__(self) -> None:
        self.by_source: dict[str, str] = {}  # source → content digest
        self.written: dict[str, str] = {}  # content digest → file name

    @staticmethod
    def key(source: Any) -> str:
        return str(source.resolve()) if isinstance(source, Path) else str(source)

    @staticmethod
    def read(source: Any) -> tuple[bytes, str]:
        """``(bytes, extension)``; ``ImageLoadError`` when the source is no usable image."""
        if isinstance(source, Path):
            try:
                if not source.is_file():
                    raise ImageLoadError(source, "missing_image", "file not found")
                data = source.read_bytes()
            except OSError as exc:
                raise ImageLoadError(
                    source, "unreadable_image", f"cannot read it ({exc})"
                ) from None
        else:
            data = source.read_bytes()
        with open_image_bytes(data, name=str(source)) as image:
            extension = image_extension(image)
        return data, extension


def _check_target(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")


def _images_of(row: ConvertRow, images: _Images) -> list[tuple[str, bytes, str]]:
    """``(key, bytes, extension)`` of a row's images; ``ImageLoadError`` for a bad one."""
    out = []
    for source in row.images:
        data, extension = images.read(source)
        out.append((images.key(source), data, extension))
    return out


def _write_imagefolder(
    rows: Iterator[ConvertRow | Problem], out: Path, report: ConvertReport
) -> None:
    (out / "images").mkdir()
    images = _Images()
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for row in rows:
            if isinstance(row, Problem):
                report.problems.append(row)
                continue
            if len(row.images) != 1:
                report.problems.append(
                    row.problem(
                        "bad_value",
                        f"an imagefolder row holds one image; this row has {len(row.images)}",
                    )
                )
                continue
            key = images.key(row.images[0])
            if key not in images.by_source:
                try:
                    [(_, data, extension)] = _images_of(row, images)
                except ImageLoadError as exc:
                    report.problems.append(row.problem(exc.reason or "not_an_image", str(exc)))
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if digest not in images.written:
                    name = f"images/{len(images.written):08d}{extension}"
                    (out / name).write_bytes(data)
                    images.written[digest] = name
                    report.images += 1
                images.by_source[key] = digest
            entry: dict[str, Any] = {"file_name": images.written[images.by_source[key]]}
            if row.turns is not None:
                entry["conversations"] = turns_to_llava(row.turns)
            else:
                entry["text"] = row.text
            entry.update(row.meta)
            metadata.write(json.dumps(entry, ensure_ascii=False) + "\n")
            report.rows += 1
    report.files = 1 + report.images


def _hf_features(single: bool) -> bytes:
    image = {"_type": "Image"}
    string = {"dtype": "string", "_type": "Value"}
    features = {
        "image" if single else "images": image
        if single
        else {"feature": image, "_type": "Sequence"},
        "text": string,
        "conversations": [{"from": string, "value": string}],
        "id": string,
    }
    return json.dumps({"info": {"features": features}}).encode("utf-8")


def _write_parquet(
    rows: Iterator[ConvertRow | Problem], out: Path, report: ConvertReport, shard_size: int
) -> None:
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    usable: list[ConvertRow] = []
    for row in rows:  # the rows' metadata only: images are read file by file below
        if isinstance(row, Problem):
            report.problems.append(row)
        else:
            usable.append(row)
    single = all(len(row.images) == 1 for row in usable)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn_type = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema(
        [
            ("image" if single else "images", image_type if single else pa.list_(image_type)),
            ("text", pa.string()),
            ("conversations", pa.list_(turn_type)),
            ("id", pa.string()),
        ],
        metadata={"huggingface": _hf_features(single)},
    )
    images = _Images()
    parts: list[Path] = []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        part = out / f"part-{len(parts):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(batch, schema=schema), part, row_group_size=256)
        parts.append(part)
        batch.clear()

    for row in usable:
        try:
            read = _images_of(row, images)
        except ImageLoadError as exc:
            report.problems.append(row.problem(exc.reason or "not_an_image", str(exc)))
            continue
        cells = [
            {"bytes": data, "path": source.name if isinstance(source, Path) else None}
            for source, (_, data, _) in zip(row.images, read)
        ]
        ident = row.meta.get("id", row.meta.get("key"))
        batch.append(
            {
                "image" if single else "images": cells[0] if single else cells,
                "text": row.text,
                "conversations": None if row.turns is None else turns_to_llava(row.turns),
                "id": None if ident is None else str(ident),
            }
        )
        report.rows += 1
        report.images += len(cells)
        if len(batch) >= shard_size:
            flush()
    if batch or not parts:
        flush()
    for i, part in enumerate(parts):
        part.rename(out / f"train-{i:05d}-of-{len(parts):05d}.parquet")
    report.files = len(parts)
    report.problems.sort(key=lambda p: (p.file, p.line or 0))


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shards(
    rows: Iterator[ConvertRow | Problem], out: Path, report: ConvertReport, shard_size: int
) -> None:
    images = _Images()
    tar: tarfile.TarFile | None = None
    in_shard = 0
    try:
        for row in rows:
            if isinstance(row, Problem):
                report.problems.append(row)
                continue
            try:
                read = _images_of(row, images)
            except ImageLoadError as exc:
                report.problems.append(row.problem(exc.reason or "not_an_image", str(exc)))
                continue
            if tar is None or in_shard >= shard_size:
                if tar is not None:
                    tar.close()
                name = out / f"shard-{report.files:06d}.tar"
                # closed when the next shard starts, or below
                tar = tarfile.open(name, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
                report.files += 1
                in_shard = 0
            key = f"{report.rows:08d}"
            for j, (_, data, extension) in enumerate(read):
                suffix = extension if len(read) == 1 else f".{j}{extension}"
                _tar_member(tar, key + suffix, data)
            if row.turns is None:
                _tar_member(tar, f"{key}.txt", (row.text or "").encode("utf-8"))
            else:
                body = {"conversations": turns_to_llava(row.turns), **row.meta}
                _tar_member(tar, f"{key}.json", json.dumps(body, ensure_ascii=False).encode())
            report.rows += 1
            report.images += len(read)
            in_shard += 1
    finally:
        if tar is not None:
            tar.close()


def convert_dataset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    source_format: str | None = None,
    image_root: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    allow_outside_root: bool = False,
) -> ConvertReport:
    """Write the dataset ``src`` as ``to`` (``imagefolder``, ``parquet`` or ``shards``) into
    the directory ``dst`` (see the module docstring).

    Args:
        src: the source dataset (any of ``CONVERT_SOURCES``).
        dst: the directory to write; it must not exist unless ``overwrite``.
        to: the target format.
        source_format: the source's format, instead of detecting it.
        image_root: what the source's image paths are relative to (COCO: the image folder,
            e.g. ``train2017/``; default the JSON file's directory).
        shard_size: rows per parquet file, samples per tar shard.
        overwrite: replace an existing ``dst`` (only once the new one is complete).
        allow_outside_root: copy images whose paths leave the image root.

    Raises:
        DataError: when the source cannot be read, or no row of it is usable.
    """
    if to not in CONVERT_TARGETS:
        raise ValueError(f"to must be one of {', '.join(CONVERT_TARGETS)}, got {to!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if source_format is None:
        source_format, target = detect_source(src)
    elif source_format not in CONVERT_SOURCES:
        raise ValueError(
            f"source format must be one of {', '.join(CONVERT_SOURCES)}, got {source_format!r}"
        )
    else:
        target = Path(src)
    dst = Path(dst)
    _check_target(dst, overwrite)
    if dst.resolve() == Path(target).resolve():
        raise ValueError(f"{dst}: the destination is the source")
    report = ConvertReport(str(src), str(dst), source_format, to)
    rows = read_rows(
        target, source_format, image_root=image_root, allow_outside_root=allow_outside_root
    )
    with atomic_directory(dst) as out:
        if to == "imagefolder":
            _write_imagefolder(rows, out, report)
        elif to == "parquet":
            _write_parquet(rows, out, report, shard_size)
        else:
            _write_shards(rows, out, report, shard_size)
        if not report.rows:
            first = f"; first: {report.problems[0]}" if report.problems else ""
            raise DataError(
                f"{src}: no usable row to convert ({len(report.problems)} skipped{first})"
            )
    return report
