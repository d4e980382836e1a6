"""What the file-backed datasets share: problems with line numbers, JSON(L) reading that keeps
line numbers, and a map-style dataset that skips samples whose images fail to load.

A *record* is one usable metadata entry (one line of ``metadata.jsonl``, one element of a
LLaVA JSON list, one preference pair); a *problem* is an entry that cannot be used, with the
file and line to fix. Readers return ``(records, problems)``; datasets skip the problems (or
raise on the first one with ``strict=True``) and ``mmgpt data check`` lists them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mmgpt.data.errors import DataError
from mmgpt.data.images import DEFAULT_MAX_PIXELS, load_image
from mmgpt.data.loaders import load_input, placeholder_of
from mmgpt.data.sample import output_placeholder

__all__ = [
    "DataError",
    "Problem",
    "Record",
    "RecordDataset",
    "RecordError",
    "iter_json_array",
    "iter_jsonl",
    "outside_root",
    "parse_json",
    "summarize_problems",
]


class RecordError(ValueError):
    """Raised by a record parser: ``reason`` is a short category, the message says what."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Problem:
    """One unusable entry of a dataset.

    ``reason`` is a category such as ``bad_json``, ``missing_field``, ``bad_type``,
    ``bad_value``, ``placeholder_mismatch``, ``missing_image``, ``not_an_image``,
    ``unsupported_format``, ``truncated_image``, ``corrupt_image``, ``too_large``; for files
    of other modalities (:mod:`mmgpt.data.loaders`) also ``missing_file``,
    ``unknown_modality`` and ``unreadable_input`` (``unsupported_modality`` when ``mmgpt data
    convert`` meets them); as a warning of ``mmgpt data check``, also
    ``outside_root``.
    """

    file: str
    line: int | None
    reason: str
    message: str
    id: str | None = None

    @property
    def location(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return where if self.id is None else f"{where} (id {self.id})"

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Record:
    """One usable entry: where it came from, the image files it needs, its parsed content.

    ``inputs`` holds the files of other modalities by modality (``{"audio": [a.wav]}``), in
    the order of their placeholders; they are read by the modality's registered loader
    (:mod:`mmgpt.data.loaders`) into ``Sample.inputs``. ``outside_root`` says, for each path
    (image or other) that leaves the dataset root (``..``, an absolute path, a symlink out),
    where it leads (see :func:`outside_root`).
    """

    file: str
    line: int
    id: str | None
    image_paths: list[Path]
    data: Any
    meta: dict[str, Any] = field(default_factory=dict)
    outside_root: list[str] = field(default_factory=list)
    inputs: dict[str, list[Path]] = field(default_factory=dict)

    def problem(self, reason: str, message: str) -> Problem:
        return Problem(self.file, self.line, reason, message, self.id)


def outside_root(root: Path, paths: Sequence[Path]) -> list[str]:
    """For each of ``paths`` that leads outside the directory ``root`` once ``..`` and
    symlinks are resolved, a sentence saying where it leads; ``[]`` when all stay inside.

    ``root`` must be resolved already (``Path.resolve()``): readers resolve it once per file.
    """
    found = []
    for path in paths:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
            found.append(f"image path {str(path)!r} cannot be resolved ({exc})")
            continue
        if not resolved.is_relative_to(root):
            found.append(
                f"image path {str(path)!r} resolves to {resolved}, outside the dataset root {root}"
            )
    return found


def summarize_problems(problems: Sequence[Problem]) -> str:
    counts = Counter(p.reason for p in problems)
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


# -- JSON with line numbers -----------------------------------------------------------------
def parse_json(text: str) -> Any:
    """``json.loads``; every way untrusted text can fail it is a ``RecordError("bad_json")``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError("bad_json", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise RecordError("bad_json", "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts from text
        raise RecordError("bad_json", f"invalid JSON: {exc}") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` for each non-blank line; a line that is not valid JSON (or not
    UTF-8) yields ``(line_number, RecordError)`` instead, so the caller can go on."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield number, RecordError("bad_encoding", f"line is not UTF-8 ({exc.reason})")
                continue
            if not text.strip():
                continue
            try:
                value = parse_json(text)
            except RecordError as exc:
                value = exc
            yield number, value


_WHITESPACE = " \t\n\r"


def iter_json_array(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line_number, element)`` for each element of a JSON file holding one list.

    The line is where the element starts. A syntax error cannot be skipped (nothing after it
    can be located reliably), so it raises ``DataError`` with its line and column.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        number = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})",
            file=str(path),
            line=number,
            reason="bad_encoding",
        ) from None
    decoder = json.JSONDecoder()
    index, line, counted_to = 0, 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in _WHITESPACE:
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    def fail(i: int, message: str) -> DataError:
        column = i - (text.rfind("\n", 0, i) + 1) + 1
        number = line_at(i)
        return DataError(
            f"{path}:{number}:{column}: invalid JSON: {message}",
            file=str(path),
            line=number,
            reason="bad_json",
        )

    index = skip_ws(index)
    if index >= len(text) or text[index] != "[":
        raise fail(index, "expected a JSON list of records ('[' ...)")
    index = skip_ws(index + 1)
    if index < len(text) and text[index] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from None
        except RecursionError:
            raise fail(index, "a list element nested too deeply") from None
        except ValueError as exc:  # an integer of more digits than Python converts from text
            raise fail(index, str(exc)) from None
        yield line_at(index), value
        index = skip_ws(end)
        if index < len(text) and text[index] == ",":
            index = skip_ws(index + 1)
            continue
        if index < len(text) and text[index] == "]":
            if skip_ws(index + 1) != len(text):
                raise fail(skip_ws(index + 1), "extra data after the list")
            return
        raise fail(index, "expected ',' or ']' after a list element")


# -- the dataset ----------------------------------------------------------------------------
class RecordDataset(Dataset):
    """Map-style dataset over records whose images are loaded on access.

    A record whose image paths leave the dataset root (``../x.png``, an absolute path, a
    symlink out) is refused with a ``DataError`` naming its file, line and path, unless
    ``allow_outside_root=True``: a dataset file must not make training read arbitrary files.

    Unusable records found while reading the metadata are left out, counted in ``skipped``
    and summarized in one warning. An image that fails to load at access time is counted and
    warned about once, and the access returns the next loadable sample (index + 1, + 2, …,
    wrapping around): deterministic, because an unloadable file stays unloadable. With
    ``strict=True`` the first problem raises ``DataError`` naming the file and line instead.

    ``skipped`` maps reason → number of problems (one per bad metadata entry, one per
    unloadable image file); ``problems`` lists them. With ``DataLoader`` workers each worker
    counts in its own copy.
    """

    format_name = "records"

    def __init__(
        self,
        records: list[Record],
        problems: list[Problem],
        *,
        source: str,
        strict: bool = False,
        max_pixels: int | None = None,
        verify_images: bool = False,
        allow_outside_root: bool = False,
    ) -> None:
        if not allow_outside_root:
            _refuse_outside_root(records, self.format_name, source)
        self.records = records
        self.problems: list[Problem] = []
        self.skipped: dict[str, int] = {}
        self.source = source
        self.strict = strict
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self._bad_paths: dict[Path, Problem] = {}
        self._bad_indices: set[int] = set()
        self._loaded_inputs: dict[int, dict[str, list[Any]]] = {}
        if problems and strict:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            first = problems[0]
            raise DataError(f"{first}{more}", file=first.file, line=first.line, reason=first.reason)
        for problem in problems:
            self._count(problem)
        if verify_images:
            for index in range(len(records)):
                self._load_images(index, warn=False)
                self._loaded_inputs.pop(index, None)  # checked, not kept
        if self.problems:
            warnings.warn(
                f"{self.format_name} {source}: skipped {len(self.problems)} unusable entries "
                f"({summarize_problems(self.problems)}); {len(self.records) - len(self._bad_indices)}"
                f" of {len(self.records)} samples usable. First: {self.problems[0]}. "
                "See dataset.problems for all of them.",
                RuntimeWarning,
                stacklevel=3,
            )
        if not records:
            raise DataError(f"{self.format_name} {source}: no usable samples")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        for step in range(n):
            k = (index + step) % n
            images = self._load_images(k, warn=True)
            if images is not None:
                return self._with_inputs(self.build(self.records[k], images), k)
        raise DataError(
            f"{self.format_name} {self.source}: none of the {n} samples has loadable images "
            f"({summarize_problems(self.problems)})"
        )

    def build(self, record: Record, images: list[Any]) -> Any:
        """The item for a record whose images loaded (implemented by each format)."""
        raise NotImplementedError

    def load_record_image(self, source: Any) -> Any:
        """One of a record's ``image_paths`` as an RGB image; formats that hold images in
        memory (parquet cells) override it. Raises ``ImageLoadError``."""
        return load_image(source, max_pixels=self.max_pixels)

    def load_record_input(self, modality: str, path: Path) -> Any:
        """One of a record's ``inputs[modality]`` files, read by that modality's registered
        loader. Raises ``DataError`` (``InputLoadError``)."""
        return load_input(modality, path)

    def _with_inputs(self, sample: Any, index: int) -> Any:
        """``sample`` with its record's other-modality items (loaded and checked already by
        ``_load_images``) in ``sample.inputs``, or in ``sample.outputs`` for the files whose
        placeholder is an output one (``"<audio_out>"``: an assistant turn's ``"<audio>"``)."""
        loaded = self._loaded_inputs.pop(index, None)
        if not loaded:
            return sample
        inputs, outputs = dict(sample.inputs), dict(getattr(sample, "outputs", {}))
        for modality, items in loaded.items():
            # files are listed in the order of the modality's placeholders, inputs and outputs
            marks = (placeholder_of(modality), output_placeholder(modality))
            either = re.compile("|".join(re.escape(m) for m in marks))
            order = [m for turn in sample.conversation for m in either.findall(turn.text)]
            if marks[1] not in order or len(order) != len(items):
                inputs[modality] = items
                continue
            inputs[modality] = [x for x, m in zip(items, order) if m == marks[0]]
            outputs[modality] = [x for x, m in zip(items, order) if m == marks[1]]
        sample.inputs = {m: v for m, v in inputs.items() if v}
        if outputs:
            sample.outputs = outputs
        return sample

    def _load_images(self, index: int, *, warn: bool) -> list[Any] | None:
        """The record's images, its other-modality items kept aside for ``_with_inputs``;
        ``None`` when any file cannot be used (counted and warned about once)."""
        if index in self._bad_indices:
            return None
        record = self.records[index]
        images = []
        files = [("image", path) for path in record.image_paths] + [
            (modality, path) for modality, paths in record.inputs.items() for path in paths
        ]
        loaded: dict[str, list[Any]] = {}
        for modality, path in files:
            if path in self._bad_paths:
                self._bad_indices.add(index)
                return None
            try:
                if modality == "image":
                    images.append(self.load_record_image(path))
                else:
                    loaded.setdefault(modality, []).append(self.load_record_input(modality, path))
            except DataError as exc:
                problem = record.problem(exc.reason or "unreadable_input", str(exc))
                if self.strict:
                    raise DataError(
                        str(problem), file=record.file, line=record.line, reason=problem.reason
                    ) from None
                self._bad_paths[path] = problem
                self._bad_indices.add(index)
                self._count(problem)
                if warn:
                    warnings.warn(
                        f"{self.format_name} {self.source}: skipping a sample, {problem}; "
                        "using the next sample instead",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                return None
        if loaded:
            self._loaded_inputs[index] = loaded
        return images

    def _count(self, problem: Problem) -> None:
        self.problems.append(problem)
        self.skipped[problem.reason] = self.skipped.get(problem.reason, 0) + 1


def _refuse_outside_root(records: Sequence[Record], format_name: str, source: str) -> None:
    leaving = [r for r in records if r.outside_root]
    if not leaving:
        return
    first = leaving[0]
    more = f" ({len(leaving) - 1} more records do too)" if len(leaving) > 1 else ""
    raise DataError(
        f"{format_name} {source}: {first.file}:{first.line}: {first.outside_root[0]}{more}; "
        "pass allow_outside_root=True (in a recipe: data.allow_outside_root=true) to use "
        "images outside the dataset root",
        file=first.file,
        line=first.line,
        reason="outside_root",
    )


class FileRecordDataset(RecordDataset):
    """A :class:`RecordDataset` of one file whose entries name images relative to
    ``image_root`` (default: the file's directory). Subclasses set ``read``, a function
    ``read(path, image_root=...) -> (records, problems)``, and ``build``."""

    read: Callable[..., tuple[list[Record], list[Problem]]]

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_root: str | os.PathLike | None = None,
        strict: bool = False,
        max_pixels: int | None = None,
        verify_images: bool = False,
        allow_outside_root: bool = False,
    ) -> None:
        records, problems = type(self).read(path, image_root=image_root)
        super().__init__(
            records,
            problems,
            source=str(path),
            strict=strict,
            max_pixels=max_pixels,
            verify_images=verify_images,
            allow_outside_root=allow_outside_root,
        )


def record_meta(record: Record) -> dict[str, Any]:
    """A sample's ``meta``: the record's own, its file and line, and its id when it has one."""
    meta = {**record.meta, "source": record.file, "line": record.line}
    if record.id is not None:
        meta["id"] = record.id
    return meta
