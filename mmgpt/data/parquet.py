"""Parquet files and Hugging Face ``datasets`` directories (registry names ``parquet`` and
``hf_dataset``), read with pyarrow (``pip install "mmgpt[data]"``).

```
llava_instruct/                         the_cauldron/ai2d/
  train-00000-of-00002.parquet            train-00000-of-00001.parquet
  train-00001-of-00002.parquet              images: [{bytes, path}], texts: [{user, assistant, source}]
    image: "000000033471.jpg" (a path) or {bytes, path}, conversations: [{from, value}]

my_dataset/ (Dataset.save_to_disk)      my_dict/ (DatasetDict.save_to_disk)
  data-00000-of-00001.arrow               dataset_dict.json      {"splits": ["train", "test"]}
  dataset_info.json                       train/ (as on the left)   test/ ...
  state.json
```

- Rows become samples as :mod:`mmgpt.data.columns` says: LLaVA ``conversations``, the
  Cauldron's ``texts``, or a ``text``/``caption`` column with ``task`` caption, t2i or mixed
  (as an imagefolder's); images are the bytes ``datasets.Image`` stores, or paths relative to
  ``image_root`` (default: the parquet file's directory, or the ``datasets`` directory).
- ``path`` of ``parquet``: a ``.parquet`` file, a directory (every ``*.parquet`` below it,
  sorted) or a glob; ``split="train"`` keeps the files named ``train-*``/``train.*`` or
  lying in a ``train`` directory. ``path`` of ``hf_dataset``: a ``save_to_disk`` directory
  (a ``DatasetDict``'s: ``split``, default ``train``).
- Map-style datasets hold the table of each file (parquet: in memory; arrow files are memory
  mapped, as ``datasets`` does) and decode an image when its sample is read. Parquet larger
  than memory streams instead: ``parquet(..., streaming=True)`` (``data.streaming=true``)
  reads it row group by row group (:class:`~mmgpt.data.loader.StreamDataset`).
- Problems name the file and the row, counted from 1 (``train.parquet:12``); an image path
  that leaves ``image_root`` is refused unless ``allow_outside_root``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmgpt.data.columns import (
    InlineImage,
    Layout,
    PendingSample,
    build_sample,
    check_image_files,
    image_column,
    parse_row,
)
from mmgpt.data.errors import DataError
from mmgpt.data.imagefolder import DEFAULT_PROMPT_TEMPLATE
from mmgpt.data.images import DEFAULT_MAX_PIXELS, load_image_bytes
from mmgpt.data.llava import resolve_image
from mmgpt.data.loader import DEFAULT_SHUFFLE_BUFFER, StreamDataset, StreamItem
from mmgpt.data.records import (
    Problem,
    Record,
    RecordDataset,
    RecordError,
    outside_root,
    record_meta,
)
from mmgpt.data.sample import DEFAULT_CAPTION_PROMPT, Sample
from mmgpt.registry import register

__all__ = [
    "EmbeddedImage",
    "HFDiskDataset",
    "ParquetDataset",
    "ParquetStream",
    "TableRows",
    "hf_dataset_files",
    "parquet_dataset",
    "parquet_files",
    "read_table",
    "read_table_rows",
    "require_pyarrow",
]

_BATCH_ROWS = 256  # rows turned into Python objects at a time while reading


def require_pyarrow() -> Any:
    """``pyarrow``, or a ``ModuleNotFoundError`` that names the extra to install."""
    try:
        import pyarrow
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            'reading parquet files and datasets directories needs pyarrow: pip install "mmgpt[data]"',
            name="pyarrow",
        ) from exc
    return pyarrow


# -- files ----------------------------------------------------------------------------------
def _in_split(path: Path, root: Path, split: str) -> bool:
    name = path.name
    if name.startswith((f"{split}-", f"{split}.", f"{split}_")):
        return True
    return split in path.relative_to(root).parts[:-1]


def parquet_files(path: str | os.PathLike, split: str | None = None) -> list[Path]:
    """The parquet files of ``path`` (a file, a directory searched recursively, or a glob),
    sorted; with ``split`` only that split's. ``DataError`` when there are none."""
    spec = str(path)
    path = Path(path)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*.parquet") if p.is_file()), path
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else path
    else:
        raise DataError(f"{path}: no such file or directory")
    if not files:
        raise DataError(f"{spec}: no .parquet files found")
    if split is not None:
        kept = [p for p in files if _in_split(p, root, split)]
        if not kept:
            raise DataError(
                f"{spec}: no parquet file of split {split!r} (named {split}-* or in a "
                f"{split}/ directory) among {', '.join(p.name for p in files[:5])}"
            )
        files = kept
    return files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: cannot read it as JSON ({exc})", file=str(path)) from None


def hf_dataset_files(path: str | os.PathLike, split: str | None = None) -> tuple[Path, list[Path]]:
    """``(directory, arrow files)`` of a ``Dataset.save_to_disk`` directory, or of one split
    of a ``DatasetDict``'s (``split``; default ``train``, or its only split)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (a datasets directory is one)")
    if (root / "dataset_dict.json").is_file():
        splits = _read_json(root / "dataset_dict.json")
        splits = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise DataError(f"{root / 'dataset_dict.json'}: no list of 'splits'")
        if split is None:
            split = "train" if "train" in splits or len(splits) != 1 else splits[0]
        if split not in splits or "/" in split or split in ("", ".", ".."):
            raise DataError(
                f"{root}: no split {split!r}; this DatasetDict has {', '.join(splits) or 'none'}"
            )
        root = root / split
    elif split is not None:
        raise DataError(f"{root}: split={split!r} given, but this is not a DatasetDict directory")
    state_file = root / "state.json"
    if not state_file.is_file():
        raise DataError(
            f"{root}: no state.json; a datasets directory is what save_to_disk writes "
            "(state.json, dataset_info.json and .arrow files)"
        )
    state = _read_json(state_file)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{state_file}: no '_data_files' list", file=str(state_file))
    files = []
    for i, entry in enumerate(entries):
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise DataError(
                f"{state_file}: _data_files[{i}] must name a file of this directory, got "
                f"{name!r:.80}",
                file=str(state_file),
            )
        if not (root / name).is_file():
            raise DataError(f"{root / name}: listed in state.json but missing", file=str(root))
        files.append(root / name)
    return root, files


def read_table(path: Path) -> Any:
    """A pyarrow table from a parquet file or an arrow file of ``datasets`` (memory mapped),
    fully validated (its bytes are untrusted). ``DataError`` naming the file."""
    pa = require_pyarrow()
    try:
        if path.suffix == ".arrow":
            source = pa.memory_map(str(path))
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:  # the random-access layout
                table = pa.ipc.open_file(source).read_all()
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(str(path))
        table.validate(full=True)
        _check_names(table)
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError) as exc:
        kind = "an arrow" if path.suffix == ".arrow" else "a parquet"
        raise DataError(
            f"{path}: not {kind} file pyarrow can read ({type(exc).__name__}: {exc})",
            file=str(path),
            reason="bad_table",
        ) from None
    return table


def _check_names(table: Any) -> None:
    """Column and field names must be text: validation does not look at them, and reading a
    row with a name that is not UTF-8 fails (``UnicodeDecodeError``, a ``ValueError``)."""
    fields = list(table.schema)
    while fields:
        field = fields.pop()
        field.name  # noqa: B018 (decoding the name is the check)
        kind = field.type
        if hasattr(kind, "value_type") and not hasattr(kind, "field"):  # a dictionary
            kind = kind.value_type
        if hasattr(kind, "field"):
            fields += [kind.field(i) for i in range(kind.num_fields)]


# -- rows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddedImage:
    """An image stored in a table cell: ``row`` counts from 0, ``index`` within a list cell."""

    file: str
    row: int
    column: str
    index: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.row + 1} column {self.column!r}" + (
            f"[{self.index}]" if self.index else ""
        )


def _iter_rows(table: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number from 0, row)`` of a table, a few hundred rows at a time."""
    row = 0
    for batch in table.to_batches(max_chunksize=_BATCH_ROWS):
        for values in batch.to_pylist():
            yield row, values
            row += 1


def _sources(
    images: Iterable[bytes | str], file: str, row: int, column: str | None, root: Path
) -> list[Any]:
    """A row's images as record sources: embedded ones by reference, paths under ``root``."""
    out: list[Any] = []
    for index, image in enumerate(images):
        if isinstance(image, bytes):
            out.append(EmbeddedImage(file, row, column or "", index))
        else:
            out.append(resolve_image(root, image))
    return out


@dataclass
class TableRows:
    """What reading tables gave: records, problems, and the image column of each table."""

    records: list[Record]
    problems: list[Problem]
    tables: dict[str, Any]

    def image_bytes(self, ref: EmbeddedImage) -> bytes:
        table = self.tables[ref.file]
        cell = table.column(ref.column)[ref.row].as_py()
        items = cell if isinstance(cell, list) else [cell]
        item = items[ref.index]
        return item["bytes"] if isinstance(item, dict) else item


def read_table_rows(
    files: Iterable[Path],
    layout: Layout,
    image_root: str | os.PathLike | None = None,
) -> TableRows:
    """Records and problems of every row of ``files`` (parquet or arrow).

    Embedded images are referenced (:class:`EmbeddedImage`), not copied; path images are
    resolved against ``image_root`` (default: each file's directory) and checked to exist.
    """
    records: list[Record] = []
    problems: list[Problem] = []
    tables: dict[str, Any] = {}
    for path in files:
        table = read_table(path)
        root = Path(image_root) if image_root is not None else path.parent
        base = root.resolve()
        file = str(path)
        columns: set[str] = set()
        for row, values in _iter_rows(table):
            try:
                parsed = parse_row(values, layout)
                column = image_column(values, layout)
                sources = _sources(parsed.images, file, row, column, root)
                check_image_files([s for s in sources if isinstance(s, Path)])
            except RecordError as exc:
                problems.append(Problem(file, row + 1, exc.reason, str(exc)))
                continue
            paths = [s for s in sources if isinstance(s, Path)]
            leaving = outside_root(base, paths)
            if len(paths) < len(sources) and column is not None:
                columns.add(column)
            for turns in parsed.conversations(layout):
                records.append(
                    Record(file, row + 1, parsed.id, sources, turns, dict(parsed.meta), leaving)
                )
        if columns:  # keep what images are read from; the rest of the table can go
            tables[file] = table.select(sorted(columns))
    return TableRows(records, problems, tables)


class TableDataset(RecordDataset):
    """Map-style samples of table rows (parquet files, ``datasets`` directories)."""

    format_name = "table"

    def __init__(
        self,
        files: list[Path],
        *,
        source: str,
        layout: Layout,
        image_root: str | os.PathLike | None,
        strict: bool,
        max_pixels: int | None,
        verify_images: bool,
        allow_outside_root: bool,
    ) -> None:
        read = read_table_rows(files, layout, image_root)
        self.layout = layout
        self.task = layout.tasks if len(layout.tasks) > 1 else layout.tasks[0]
        self._rows = read
        super().__init__(
            read.records,
            read.problems,
            source=source,
            strict=strict,
            max_pixels=max_pixels,
            verify_images=verify_images,
            allow_outside_root=allow_outside_root,
        )

    def load_record_image(self, source: Any) -> Any:
        if isinstance(source, EmbeddedImage):
            data = self._rows.image_bytes(source)
            return load_image_bytes(data, name=str(source), max_pixels=self.max_pixels)
        return super().load_record_image(source)

    def build(self, record: Record, images: list[Any]) -> Sample:
        return build_sample(record.data, images, record_meta(record))


_COMMON_ARGS = """
        task: what a caption row becomes: ``"caption"``, ``"t2i"`` (a drawing sample: the
            image is what the model draws), ``"mixed"`` (both), as for an imagefolder.
            Conversation rows are used as is.
        caption_prompt: user text of caption samples (after ``"<image>\\n"``).
        prompt_template: the user turn of drawing samples, ``{text}`` replaced by the caption.
        image_column, text_column: the columns to read (default: ``images`` or ``image``;
            ``text`` or ``caption``).
        image_root: what image paths are relative to.
        strict: raise on the first problem (naming file and row) instead of skipping it.
        max_pixels: refuse larger images (see ``load_image``).
        verify_images: decode every image now, so ``skipped`` is complete before training.
        allow_outside_root: accept image paths that leave ``image_root``."""


class ParquetDataset(TableDataset):
    __doc__ = f"""Map-style samples of parquet files (see :mod:`mmgpt.data.parquet`).

    Args:
        path: a ``.parquet`` file, a directory of them, or a glob.
        split: only the files of this split (``train-*.parquet``, ``train/``).{_COMMON_ARGS}
    """

    format_name = "parquet"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        image_root: str | os.PathLike | None = None,
        image_column: str | None = None,
        text_column: str | None = None,
        task: str | list[str] = "caption",
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        strict: bool = False,
        max_pixels: int | None = None,
        verify_images: bool = False,
        allow_outside_root: bool = False,
    ) -> None:
        layout = Layout.make(
            "parquet",
            image_column=image_column,
            text_column=text_column,
            task=task,
            caption_prompt=caption_prompt,
            prompt_template=prompt_template,
        )
        super().__init__(
            parquet_files(path, split),
            source=str(path),
            layout=layout,
            image_root=image_root,
            strict=strict,
            max_pixels=max_pixels,
            verify_images=verify_images,
            allow_outside_root=allow_outside_root,
        )


@register("dataset", "hf_dataset")
class HFDiskDataset(TableDataset):
    __doc__ = f"""Map-style samples of a Hugging Face ``datasets`` directory written by
    ``save_to_disk`` (see :mod:`mmgpt.data.parquet`); its arrow files are memory mapped.

    Args:
        path: the directory (of a ``Dataset``, or of a ``DatasetDict``).
        split: a ``DatasetDict``'s split (default ``train``, or its only one).{_COMMON_ARGS}
    """

    format_name = "hf_dataset"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        image_root: str | os.PathLike | None = None,
        image_column: str | None = None,
        text_column: str | None = None,
        task: str | list[str] = "caption",
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        strict: bool = False,
        max_pixels: int | None = None,
        verify_images: bool = False,
        allow_outside_root: bool = False,
    ) -> None:
        layout = Layout.make(
            "hf_dataset",
            image_column=image_column,
            text_column=text_column,
            task=task,
            caption_prompt=caption_prompt,
            prompt_template=prompt_template,
        )
        root, files = hf_dataset_files(path, split)
        super().__init__(
            files,
            source=str(path),
            layout=layout,
            image_root=root if image_root is None else image_root,
            strict=strict,
            max_pixels=max_pixels,
            verify_images=verify_images,
            allow_outside_root=allow_outside_root,
        )


# -- streaming ------------------------------------------------------------------------------
class ParquetStream(StreamDataset):
    """Parquet rows streamed row group by row group (each row group is a shard of the
    stream; the training loader shuffles their order and a buffer of samples, and resumes
    exactly). Arguments as :class:`ParquetDataset`'s, plus ``shuffle_buffer``."""

    format_name = "parquet"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        image_root: str | os.PathLike | None = None,
        layout: Layout,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        strict: bool = False,
        max_pixels: int | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        require_pyarrow()
        import pyarrow.parquet as pq

        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int):
            raise ValueError(f"parquet: shuffle_buffer must be an integer, got {shuffle_buffer!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"parquet: shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.layout = layout
        self.task = layout.tasks if len(layout.tasks) > 1 else layout.tasks[0]
        self.source = str(path)
        self.image_root = None if image_root is None else Path(image_root)
        self.shuffle_buffer = shuffle_buffer
        self.strict = strict
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.allow_outside_root = allow_outside_root
        self.problems: list[Problem] = []
        self.skipped: dict[str, int] = {}
        # one shard per row group: (file, group, number of the group's first row)
        self.groups: list[tuple[Path, int, int]] = []
        for file in parquet_files(path, split):
            try:
                metadata = pq.ParquetFile(str(file)).metadata
            except Exception as exc:  # pyarrow's errors for a damaged footer vary
                raise DataError(
                    f"{file}: not a parquet file pyarrow can read ({type(exc).__name__}: {exc})",
                    file=str(file),
                    reason="bad_table",
                ) from None
            first = 0
            for group in range(metadata.num_row_groups):
                self.groups.append((file, group, first))
                first += metadata.row_group(group).num_rows
        self.shards = [f"{file}#row_group={group}" for file, group, _ in self.groups]
        self._cache: dict[int, list[dict[str, Any]]] = {}

    def fingerprint(self) -> str:
        names = [[f"{f.name}#{g}", f.stat().st_size] for f, g, _ in self.groups]
        return hashlib.sha256(json.dumps(names).encode("utf-8")).hexdigest()[:16]

    def _rows(self, shard: int) -> list[dict[str, Any]]:
        """The rows of a row group (the last two read are kept, for resuming a buffer)."""
        if shard not in self._cache:
            import pyarrow.parquet as pq

            pa = require_pyarrow()
            file, group, _ = self.groups[shard]
            try:
                table = pq.ParquetFile(str(file)).read_row_group(group)
                table.validate(full=True)
                _check_names(table)
            except (pa.ArrowException, OSError, ValueError, TypeError, IndexError) as exc:
                raise DataError(
                    f"{file}: row group {group} cannot be read ({type(exc).__name__}: {exc})",
                    file=str(file),
                    reason="bad_table",
                ) from None
            while len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[shard] = table.to_pylist()
        return self._cache[shard]

    def _items(self, shard: int, row: int, values: dict[str, Any]) -> list[StreamItem]:
        file, _, first = self.groups[shard]
        line = first + row + 1
        item = StreamItem(shard, [row, 0], [row + 1, 0], str(file), line)
        try:
            parsed = parse_row(values, self.layout)
            item.id = parsed.id
            root = self.image_root if self.image_root is not None else file.parent
            sources: list[Any] = []
            for index, image in enumerate(parsed.images):
                if isinstance(image, bytes):
                    column = image_column(values, self.layout)
                    name = f"{file}:{line} column {column!r}" + (f"[{index}]" if index else "")
                    sources.append(InlineImage(image, name))
                else:
                    sources.append(resolve_image(root, image))
            paths = [s for s in sources if isinstance(s, Path)]
            check_image_files(paths)
        except RecordError as exc:
            item.problem = item.fail(exc.reason, str(exc))
            return [item]
        leaving = outside_root(root.resolve(), paths)
        if leaving and not self.allow_outside_root:
            raise DataError(
                f"parquet {self.source}: {file}:{line}: {leaving[0]}; pass "
                "allow_outside_root=True (in a recipe: data.allow_outside_root=true) to use "
                "images outside the dataset root",
                file=str(file),
                line=line,
                reason="outside_root",
            )
        meta = {**parsed.meta, "source": str(file), "line": line}
        if parsed.id is not None:
            meta["id"] = parsed.id
        conversations = parsed.conversations(self.layout)
        return [
            replace(
                item,
                ref=[row, k],
                cursor=[row + 1, 0] if k == len(conversations) - 1 else [row, k + 1],
                sample=PendingSample(turns, list(sources), dict(meta)),
            )
            for k, turns in enumerate(conversations)
        ]

    def read_shard(self, shard: int, cursor: Any = None) -> Iterator[StreamItem]:
        start, skip = cursor if cursor is not None else (0, 0)
        rows = self._rows(shard)
        for row in range(int(start), len(rows)):
            items = self._items(shard, row, rows[row])
            if skip:
                items, skip = items[skip:], 0
            yield from items

    def read_item(self, shard: int, ref: Any) -> StreamItem:
        for item in self.read_shard(shard, ref):
            if item.problem is None and item.ref == list(ref):
                return item
            break
        file, group, _ = self.groups[shard]
        raise DataError(
            f"{file}: row group {group} has no usable row {ref[0]} any more; the file changed "
            "since the position was saved",
            file=str(file),
        )

    def decode(self, item: StreamItem) -> Any:
        return item.sample.load(self.max_pixels)


@register("dataset", "parquet")
def parquet_dataset(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    task: str | list[str] = "caption",
    caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    streaming: bool = False,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    strict: bool = False,
    max_pixels: int | None = None,
    verify_images: bool = False,
    allow_outside_root: bool = False,
) -> ParquetDataset | ParquetStream:
    """Samples of parquet files: a map-style :class:`ParquetDataset`, or with
    ``streaming=True`` a :class:`ParquetStream` read row group by row group (for data larger
    than memory; ``shuffle_buffer`` samples are shuffled among, ``verify_images`` does not
    apply: check the data with ``mmgpt data check``). The other arguments are
    :class:`ParquetDataset`'s."""
    if not isinstance(streaming, bool):
        raise ValueError(f"parquet: streaming must be true or false, got {streaming!r}")
    if not streaming:
        return ParquetDataset(
            path,
            split=split,
            image_root=image_root,
            image_column=image_column,
            text_column=text_column,
            task=task,
            caption_prompt=caption_prompt,
            prompt_template=prompt_template,
            strict=strict,
            max_pixels=max_pixels,
            verify_images=verify_images,
            allow_outside_root=allow_outside_root,
        )
    if verify_images:
        raise ValueError(
            "parquet: verify_images needs the whole dataset read up front, which streaming "
            "avoids; check the images with `mmgpt data check` instead"
        )
    layout = Layout.make(
        "parquet",
        image_column=image_column,
        text_column=text_column,
        task=task,
        caption_prompt=caption_prompt,
        prompt_template=prompt_template,
    )
    return ParquetStream(
        path,
        split=split,
        image_root=image_root,
        layout=layout,
        shuffle_buffer=shuffle_buffer,
        strict=strict,
        max_pixels=max_pixels,
        allow_outside_root=allow_outside_root,
    )
