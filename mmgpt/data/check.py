"""``mmgpt data check PATH``: validate a dataset before training on it.

The check reads a dataset with the same readers the datasets use, then decodes every image
and measures every sample, and reports: the format, counts, each problem with its file and
line (bad JSON, missing fields, missing/corrupt images, ``"<image>"`` placeholders that do not
match the images), warnings, and length statistics — tokens with a tokenizer, else
characters.

Parquet files, ``datasets`` directories and tar shards are checked the same way: problems
name the file and the row (counted from 1) or, in a shard, the number of the sample's first
member and its key.

Problems are entries the datasets would skip; any problem fails the check (exit status 1).
Warnings are suspicious but usable (an image no metadata row mentions, an empty text file, a
repeated id, an image path that leaves the dataset root, which training refuses unless
``allow_outside_root``); with ``strict=True`` they fail the check too.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgpt.data.columns import Layout, load_source
from mmgpt.data.imagefolder import read_imagefolder
from mmgpt.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    load_image,
    load_image_bytes,
)
from mmgpt.data.llava import read_llava
from mmgpt.data.loaders import load_input
from mmgpt.data.parquet import (
    EmbeddedImage,
    hf_dataset_files,
    parquet_files,
    read_table_rows,
)
from mmgpt.data.preference import read_preference
from mmgpt.data.records import DataError, Problem, Record, iter_jsonl
from mmgpt.data.shards import SHARD_SUFFIXES, ShardDataset, expand_braces
from mmgpt.data.text import read_utf8, resolve_text_files

__all__ = [
    "DOWNLOADED_FORMATS",
    "FORMATS",
    "CheckReport",
    "LengthStats",
    "check_dataset",
    "detect_format",
]

# the formats of datasets as they are downloaded (parquet, save_to_disk, webdataset)
DOWNLOADED_FORMATS = ("parquet", "hf_dataset", "shards")
FORMATS = ("imagefolder", "llava", "preference", "text", *DOWNLOADED_FORMATS)
_MAX_LISTED = 50


@dataclass
class LengthStats:
    """Length statistics of the samples' text (``unit`` is ``"tokens"`` or ``"chars"``)."""

    unit: str
    count: int
    min: int
    mean: float
    p95: int
    max: int

    @classmethod
    def of(cls, lengths: list[int], unit: str) -> LengthStats | None:
        if not lengths:
            return None
        ordered = sorted(lengths)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
        return cls(unit, len(ordered), ordered[0], sum(ordered) / len(ordered), p95, ordered[-1])


@dataclass
class CheckReport:
    """What ``check_dataset`` found; ``to_text()`` for people, ``to_dict()`` for JSON."""

    path: str
    format: str
    num_records: int = 0  # usable metadata entries (lines, list elements, text files)
    num_samples: int = 0  # samples a dataset would yield (preference: pairs)
    num_images: int = 0  # distinct image files that decoded
    # distinct files of other modalities that their loaders read, by modality
    num_inputs: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    lengths: LengthStats | None = None
    strict: bool = False

    @property
    def issues(self) -> list[Problem]:
        """Problems, plus warnings under ``strict``."""
        return self.problems + (self.warnings if self.strict else [])

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def exit_code(self) -> int:
        """What ``mmgpt data check`` exits with: 1 when there are problems (under ``strict``,
        warnings too), else 0."""
        return 0 if self.ok else 1

    @property
    def counts(self) -> dict[str, int]:
        """Problems per reason."""
        return dict(sorted(Counter(p.reason for p in self.problems).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "ok": self.ok,
            "strict": self.strict,
            "num_records": self.num_records,
            "num_samples": self.num_samples,
            "num_images": self.num_images,
            "num_inputs": dict(self.num_inputs),
            "problem_counts": self.counts,
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [p.to_dict() for p in self.warnings],
            "lengths": None if self.lengths is None else vars(self.lengths).copy(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [
            f"dataset:  {self.path}",
            f"format:   {self.format}",
            f"entries:  {self.num_records} parsed, {self.num_samples} usable samples, "
            f"{self.num_images} images decoded"
            + "".join(f", {n} {m} files read" for m, n in sorted(self.num_inputs.items())),
        ]
        for title, items in (("problems", self.problems), ("warnings", self.warnings)):
            if not items:
                lines.append(f"{title}: none")
                continue
            counts = Counter(p.reason for p in items)
            summary = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))
            lines.append(f"{title}: {len(items)} ({summary})")
            lines.extend(f"  {p}" for p in items[:_MAX_LISTED])
            if len(items) > _MAX_LISTED:
                lines.append(f"  ... and {len(items) - _MAX_LISTED} more")
        if self.lengths is not None:
            s = self.lengths
            lines.append(
                f"lengths ({s.unit}): n={s.count} min={s.min} mean={s.mean:.1f} "
                f"p95={s.p95} max={s.max}"
            )
        if self.ok:
            lines.append("result:   OK")
        else:
            lines.append(f"result:   {len(self.issues)} issue(s)")
        # Paths and values from the data may hold lone surrogates (a "\ud800" JSON escape),
        # which a UTF-8 stdout refuses to print.
        return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


# -- format detection -----------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """``(format, path to read)`` for a dataset path; ``DataError`` when it cannot tell.

    A directory with ``metadata.jsonl``/``.csv`` is an imagefolder; one with ``state.json``
    or ``dataset_dict.json`` (``save_to_disk``) a ``datasets`` directory (``hf_dataset``); one
    with ``.tar`` shards (or a shard, or a glob or brace pattern of them) tar ``shards``; a
    ``.parquet`` file (or a directory or pattern of them) ``parquet``; a ``.json`` file (or a
    directory holding exactly one) is LLaVA; a ``.jsonl`` file is preference data when its
    first record has ``chosen``/``rejected``/``responses`` and LLaVA when it has
    ``conversations``; ``.txt`` files (or a directory of them) are plain text.
    """
    path = Path(path)
    if path.is_dir():
        if any(path.rglob("metadata.jsonl")) or any(path.rglob("metadata.csv")):
            return "imagefolder", path
        downloaded = _downloaded_directory(path)
        if downloaded is not None:
            return downloaded, path
        for suffix in (".json", ".jsonl"):
            found = sorted(p for p in path.iterdir() if p.suffix == suffix and p.is_file())
            if len(found) == 1:
                return detect_format(found[0])
            if len(found) > 1:
                raise DataError(
                    f"{path}: several {suffix} files ({', '.join(p.name for p in found[:5])}); "
                    "pass the one to check"
                )
        if any(path.rglob("*.txt")):
            return "text", path
        raise DataError(
            f"{path}: cannot tell the dataset format (no metadata.jsonl/metadata.csv, no .json "
            "or .jsonl file, no .txt files)"
        )
    if not path.exists():
        pattern = _pattern_format(str(path))
        if pattern is not None:
            return pattern, path
        raise DataError(f"{path}: no such file or directory")
    if path.name in ("metadata.jsonl", "metadata.csv"):
        return "imagefolder", path.parent
    if path.suffix == ".parquet":
        return "parquet", path
    if path.name.endswith(SHARD_SUFFIXES):
        return "shards", path
    hf_files = path.suffix == ".arrow" or path.name in ("state.json", "dataset_info.json")
    if hf_files and _downloaded_directory(path.parent) == "hf_dataset":
        return "hf_dataset", path.parent
    if path.name == "dataset_dict.json":
        return "hf_dataset", path.parent
    if path.suffix == ".json":
        return "llava", path
    if path.suffix == ".txt":
        return "text", path
    if path.suffix == ".jsonl":
        return _sniff_jsonl(path), path
    raise DataError(
        f"{path}: cannot tell the dataset format from the suffix {path.suffix!r} "
        "(expected a directory, .json, .jsonl, .txt, .parquet or .tar)"
    )


def _downloaded_directory(path: Path) -> str | None:
    """``hf_dataset``, ``shards`` or ``parquet`` for a directory holding one, else ``None``."""
    saved = (path / "state.json").is_file() and (
        (path / "dataset_info.json").is_file() or any(path.glob("*.arrow"))
    )
    if saved or (path / "dataset_dict.json").is_file():
        return "hf_dataset"
    if any(p.name.endswith(SHARD_SUFFIXES) and p.is_file() for p in path.iterdir()):
        return "shards"
    if any(p.is_file() for p in path.rglob("*.parquet")):
        return "parquet"
    return None


def _pattern_format(spec: str) -> str | None:
    """``shards`` or ``parquet`` for a glob or brace pattern naming such files."""
    if not any(c in spec for c in "*?[{"):
        return None
    try:
        patterns = expand_braces(spec)
    except DataError:
        return None
    names = [Path(p).name for p in patterns]
    if all(name.endswith(SHARD_SUFFIXES) for name in names):
        return "shards"
    if all(name.endswith(".parquet") for name in names):
        return "parquet"
    return None


def _sniff_jsonl(path: Path) -> str:
    for _, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            continue
        if {"chosen", "rejected", "responses"} & obj.keys():
            return "preference"
        if "conversations" in obj:
            return "llava"
        if "file_name" in obj:
            raise DataError(
                f"{path}: looks like imagefolder metadata; name it metadata.jsonl and check "
                "its directory"
            )
    raise DataError(
        f"{path}: no record with 'chosen'/'rejected'/'responses' (preference) or "
        "'conversations' (LLaVA) found"
    )


# -- the check ------------------------------------------------------------------------------
def check_dataset(
    path: str | os.PathLike,
    tokenizer: Any = None,
    strict: bool = False,
    *,
    format: str | None = None,
    image_root: str | os.PathLike | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> CheckReport:
    """Validate the dataset at ``path`` and report what is wrong with it.

    Args:
        path: an imagefolder directory, a LLaVA ``.json``/``.jsonl``, a preference ``.jsonl``,
            or text files (a ``.txt`` or a directory of them).
        tokenizer: anything with ``encode(text) -> list[int]``; lengths are in tokens with it
            (``"<image>"`` counts as its one token), in characters without.
        strict: count warnings as problems too (``report.ok``, ``report.exit_code``).
        format: one of ``FORMATS`` to skip detection.
        image_root: image directory of LLaVA/preference data (default: the file's directory).
        max_pixels: images above this are problems (``too_large``).

    Raises:
        DataError: when the path does not exist or its format cannot be told.
    """
    if format is None:
        format, target = detect_format(path)
    else:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        target = Path(path)
    report = CheckReport(str(path), format, strict=strict)

    unit = "chars" if tokenizer is None else "tokens"

    def measure(text: str) -> int:
        return len(text) if tokenizer is None else len(tokenizer.encode(text))

    if format == "text":
        lengths = _check_text(target, report, measure)
    elif format == "shards":
        lengths = _check_shards(target, report, measure, max_pixels)
    else:
        lengths = _check_records(target, format, report, measure, image_root, max_pixels)
    report.lengths = LengthStats.of(lengths, unit)
    return report


def _check_records(
    target: Path,
    format: str,
    report: CheckReport,
    measure: Callable[[str], int],
    image_root: str | os.PathLike | None,
    max_pixels: int | None,
) -> list[int]:
    records: list[Record] = []
    rows = None
    try:
        if format == "imagefolder":
            records, problems = read_imagefolder(target)
        elif format == "llava":
            records, problems = read_llava(target, image_root=image_root)
        elif format == "parquet":
            rows = read_table_rows(parquet_files(target), Layout(), image_root)
            records, problems = rows.records, rows.problems
        elif format == "hf_dataset":
            root, files = hf_dataset_files(target)
            rows = read_table_rows(files, Layout(), root if image_root is None else image_root)
            records, problems = rows.records, rows.problems
        else:
            records, problems = read_preference(target, image_root=image_root)
    except DataError as exc:
        # The whole file is unreadable (e.g. a JSON syntax error in a LLaVA list).
        problems = [
            Problem(exc.file or str(target), exc.line, exc.reason or "unreadable", str(exc))
        ]
    report.problems.extend(problems)

    # Decode each file once (images, and every other modality's through its loader); a
    # record with any bad file is not a usable sample.
    def load(modality: str, source: Any) -> None:
        if modality != "image":
            load_input(modality, source)
        elif isinstance(source, EmbeddedImage) and rows is not None:
            load_image_bytes(rows.image_bytes(source), name=str(source), max_pixels=max_pixels)
        else:
            load_image(source, max_pixels=max_pixels)

    outcome: dict[Any, DataError | None] = {}
    reported: set[tuple[str, int, Any]] = set()
    lengths: list[int] = []
    for record in records:
        good = True
        files = [("image", p) for p in record.image_paths] + [
            (m, p) for m, paths in record.inputs.items() for p in paths
        ]
        for modality, image_path in files:
            if image_path not in outcome:
                try:
                    load(modality, image_path)
                    outcome[image_path] = None
                except DataError as exc:
                    outcome[image_path] = exc
            error = outcome[image_path]
            if error is not None:
                good = False
                key = (record.file, record.line, image_path)
                if key not in reported:  # pairs of one preference line share their images
                    reported.add(key)
                    reason = error.reason or "unreadable_input"
                    report.problems.append(record.problem(reason, str(error)))
        if not good:
            continue
        report.num_samples += 1
        if format == "preference":
            prompt, chosen, rejected = record.data
            lengths += [measure(f"{prompt}\n{chosen}"), measure(f"{prompt}\n{rejected}")]
        else:
            lengths.append(measure("\n".join(turn.text for turn in record.data)))
    report.problems.sort(key=lambda p: (p.file, p.line or 0))
    report.num_records = len({(r.file, r.line) for r in records})
    image_files = {p for r in records for p in r.image_paths}
    report.num_images = sum(outcome.get(p, 1) is None for p in image_files)
    read = {(m, p) for r in records for m, ps in r.inputs.items() for p in ps}
    for modality, path in read:
        if path in outcome and outcome[path] is None:
            report.num_inputs[modality] = report.num_inputs.get(modality, 0) + 1

    leaving: set[tuple[str, int, str]] = set()
    for record in records:
        for message in record.outside_root:
            if (record.file, record.line, message) not in leaving:  # pairs share a line
                leaving.add((record.file, record.line, message))
                report.warnings.append(record.problem("outside_root", message))
    if format == "llava":
        first_line: dict[str, int] = {}
        for record in records:
            if record.id is None:
                continue
            if record.id in first_line:
                report.warnings.append(
                    record.problem("duplicate_id", f"id first used on line {first_line[record.id]}")
                )
            else:
                first_line[record.id] = record.line
    if format == "imagefolder":
        referenced = {p.resolve() for r in records for p in r.image_paths}
        for image_file in sorted(target.rglob("*")):
            if (
                image_file.suffix.lower() in IMAGE_EXTENSIONS
                and image_file.is_file()
                and image_file.resolve() not in referenced
            ):
                report.warnings.append(
                    Problem(
                        str(image_file),
                        None,
                        "unreferenced_image",
                        "no usable metadata row names this image",
                    )
                )
    return lengths


def _check_shards(
    target: Path, report: CheckReport, measure: Callable[[str], int], max_pixels: int | None
) -> list[int]:
    """Every sample of every shard, in order: problems name the shard, the number of the
    sample's first member and its key; a key seen before (in any shard) is a warning."""
    try:
        dataset = ShardDataset(target, shuffle_buffer=1, max_pixels=max_pixels)
    except DataError as exc:
        report.problems.append(
            Problem(exc.file or str(target), exc.line, exc.reason or "no_files", str(exc))
        )
        return []
    lengths: list[int] = []
    first_seen: dict[str, str] = {}
    entries: set[tuple[str, int | None]] = set()
    for shard in range(len(dataset.shards)):
        for item in dataset.read_shard(shard):
            if item.problem is not None:
                report.problems.append(item.problem)
                continue
            if (item.file, item.line) not in entries:
                entries.add((item.file, item.line))
                if item.id in first_seen:
                    report.warnings.append(
                        item.fail("duplicate_key", f"key first used at {first_seen[item.id]}")
                    )
                else:
                    first_seen[str(item.id)] = f"{Path(item.file).name}:{item.line}"
            try:
                for source in item.sample.images:
                    load_source(source, max_pixels)
                    report.num_images += 1
            except ImageLoadError as exc:
                report.problems.append(item.fail(exc.reason or "corrupt_image", str(exc)))
                continue
            report.num_samples += 1
            lengths.append(measure("\n".join(turn.text for turn in item.sample.turns)))
    report.num_records = len(entries)
    return lengths


def _check_text(target: Path, report: CheckReport, measure: Callable[[str], int]) -> list[int]:
    try:
        files = resolve_text_files(target)
    except (FileNotFoundError, ValueError) as exc:
        report.problems.append(Problem(str(target), None, "no_files", str(exc)))
        return []
    lengths = []
    for file in files:
        try:
            text = read_utf8(file)
        except ValueError as exc:
            report.problems.append(Problem(str(file), None, "bad_encoding", str(exc)))
            continue
        report.num_records += 1
        if not text.strip():
            report.warnings.append(Problem(str(file), None, "empty_file", "file has no text"))
            continue
        report.num_samples += 1
        lengths.append(measure(text))
    return lengths
