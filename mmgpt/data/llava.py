"""LLaVA conversation data: a JSON list (or JSONL) of records with images and conversations.

```json
[{"id": "0001",
  "image": "coco/000000033471.jpg",
  "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the bus?"},
                    {"from": "gpt", "value": "Red and white."}]}]
```

- ``image`` is a path or a list of paths relative to ``image_root`` (default: the directory of
  the JSON file); absent or ``null`` for text-only records.
- ``from`` is ``human`` (or ``user``) and ``gpt`` (or ``assistant``).
- Each image needs one ``"<image>"`` placeholder, in image order. Following LLaVA's own
  convention, a record with images and *no* placeholder gets them prepended to its first
  human turn (``"<image>\\n"`` per image); any other count mismatch is a problem.
- **Images the model draws.** An ``"<image>"`` in a ``gpt`` turn is an *output* image (NExT-GPT
  style): the model learns to answer with its signal tokens and the image decoder to draw that
  image. It is written ``"<image_out>"`` in the sample (``"<image_out>"`` may also be written
  in a ``gpt`` turn directly; in a ``human`` turn it is a problem). Input and output images
  share the ``image`` list, in the order of their placeholders::

      {"image": "cat.png",
       "conversations": [{"from": "human", "value": "draw a cat on a sofa"},
                         {"from": "gpt", "value": "<image>"}]}

  becomes a drawing sample with ``output_images=[cat.png]``; with ``"image": ["a.png",
  "b.png"]``, ``"<image>\\nmake it blue"`` → ``"<image>"`` reads ``a.png`` and draws ``b.png``.
- **Other modalities.** A modality with a registered loader (:mod:`mmgpt.data.loaders`;
  e.g. a plugin's ``"audio"``) names its files under its own key, like ``image``
  (``"audio": "clip.wav"`` or a list), or all modalities at once under ``inputs``
  (``"inputs": {"audio": ["a.wav"], "image": ["x.png"]}``; ``image`` there is the same as the
  top-level key, which must then be absent). Each file needs one placeholder of its modality
  (the loader's ``placeholder``, e.g. ``"<audio>"``) in the text, in file order; a record
  with files and no placeholder of that modality gets them prepended to its first human turn,
  as images do. The files are read by the modality's loader into ``Sample.inputs``.
- Keys other than these go to ``Sample.meta``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mmgpt.data.loaders import loader_modalities, placeholder_of
from mmgpt.data.records import (
    DataError,
    FileRecordDataset,
    Problem,
    Record,
    RecordError,
    iter_json_array,
    iter_jsonl,
    outside_root,
    record_meta,
)
from mmgpt.data.sample import (
    IMAGE_OUT_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    Sample,
    Turn,
    output_placeholder,
    split_images,
)
from mmgpt.registry import register

__all__ = [
    "LlavaDataset",
    "count_placeholders",
    "insert_image_placeholders",
    "insert_input_placeholders",
    "mark_output_images",
    "parse_conversation",
    "parse_image_field",
    "parse_inputs",
    "read_llava",
    "turns_to_llava",
]

_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_LLAVA_ROLE = {"user": "human", "assistant": "gpt"}


def parse_conversation(value: Any, field: str = "conversations") -> list[Turn]:
    """LLaVA ``[{from, value}, ...]`` → turns; ``RecordError`` says what is malformed."""
    if value is None:
        raise RecordError("missing_field", f"missing field {field!r}")
    if not isinstance(value, list):
        raise RecordError("bad_type", f"{field!r} must be a list, got {type(value).__name__}")
    if not value:
        raise RecordError("bad_value", f"{field!r} is empty")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordError(
                "bad_type", f"{field}[{i}] must be an object, got {type(message).__name__}"
            )
        for key in ("from", "value"):
            if key not in message:
                raise RecordError("missing_field", f"{field}[{i}] has no {key!r}")
        role = _ROLE_OF.get(message["from"]) if isinstance(message["from"], str) else None
        if role is None:
            raise RecordError(
                "bad_value",
                f"{field}[{i}].from is {message['from']!r}; expected 'human' or 'gpt'",
            )
        if not isinstance(message["value"], str):
            raise RecordError(
                "bad_type",
                f"{field}[{i}].value must be a string, got {type(message['value']).__name__}",
            )
        turns.append(Turn(role, message["value"]))
    if not any(turn.role == "assistant" for turn in turns):
        raise RecordError("bad_value", f"{field!r} has no 'gpt' turn to learn from")
    return turns


def parse_image_field(value: Any, field: str = "image") -> list[str]:
    """``None`` | path | list of paths → list of paths."""
    if value is None:
        return []
    if isinstance(value, str):
        if not value:
            raise RecordError("bad_value", f"{field!r} is an empty string")
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise RecordError("bad_type", f"{field!r} must be a path or a list of paths, got {value!r:.80}")


def parse_inputs(obj: dict[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """A record's files: ``(image paths, {other modality: paths})`` from its ``image`` key,
    the keys named after modalities with a loader, and ``inputs`` (module docstring)."""
    images = parse_image_field(obj.get("image"))
    known = [m for m in loader_modalities() if m != "image"]
    others = {m: parse_image_field(obj[m], m) for m in known if obj.get(m) is not None}
    nested = obj.get("inputs")
    if nested is None:
        return images, {m: paths for m, paths in others.items() if paths}
    if not isinstance(nested, dict):
        raise RecordError(
            "bad_type",
            f"'inputs' must be an object {{modality: [paths]}}, got {type(nested).__name__}",
        )
    for modality, value in nested.items():
        if modality != "image" and modality not in known:
            raise RecordError(
                "unknown_modality",
                f"inputs[{modality!r}]: no loader reads {modality!r} files (modalities with a "
                f"loader: {', '.join(['image', *known])}); install the plugin of that modality",
            )
        if (modality == "image" and images) or modality in others:
            raise RecordError(
                "bad_value",
                f"{modality!r} files are given twice, under '{modality}' and under "
                f"'inputs.{modality}'; keep one",
            )
        paths = parse_image_field(value, f"inputs.{modality}")
        if modality == "image":
            images = paths
        else:
            others[modality] = paths
    return images, {m: paths for m, paths in others.items() if paths}


def insert_input_placeholders(turns: list[Turn], inputs: dict[str, Sequence[Any]]) -> list[Turn]:
    """:func:`insert_image_placeholders` for the other modalities: each modality's
    placeholders must number its files; with none at all they are prepended to the first user
    turn. Also checks that a modality without files has no placeholder in the text."""
    for modality in [m for m in loader_modalities() if m != "image"]:
        placeholder = placeholder_of(modality)
        count = len(inputs.get(modality, ()))
        # an assistant turn's placeholder is an output (mark_output_images) and takes a file too
        found = sum(
            t.text.count(placeholder) + t.text.count(output_placeholder(modality)) for t in turns
        )
        if found == count:
            continue
        if found == 0:
            i = next((i for i, t in enumerate(turns) if t.role == "user"), None)
            if i is None:
                raise RecordError(
                    "placeholder_mismatch",
                    f"{count} {modality} file(s) but no human turn to put {placeholder!r} in",
                )
            prefix = f"{placeholder}\n" * count
            turns = [*turns[:i], Turn("user", prefix + turns[i].text), *turns[i + 1 :]]
            continue
        raise RecordError(
            "placeholder_mismatch",
            f"{found} {placeholder!r} placeholder(s) in the text but {count} {modality} file(s)",
        )
    return turns


def count_placeholders(texts: Sequence[str]) -> int:
    """The ``"<image>"`` placeholders of ``texts`` (input images)."""
    return sum(text.count(IMAGE_PLACEHOLDER) for text in texts)


def mark_output_images(turns: list[Turn], field: str = "conversations") -> list[Turn]:
    """The images a conversation's assistant turns hold are images the model draws: their
    ``"<image>"`` becomes ``"<image_out>"`` (and any other modality's placeholder, e.g.
    ``"<audio>"``, becomes ``"<audio_out>"``: an output the model produces). An output
    placeholder (``"<image_out>"``, ``"<audio_out>"``…) in a user turn is a ``RecordError`` (a person's turn cannot ask the model to have drawn
    something)."""
    others = [(placeholder_of(m), output_placeholder(m)) for m in loader_modalities()]
    others = [(p, o) for p, o in others if o != IMAGE_OUT_PLACEHOLDER]
    outputs = [(IMAGE_PLACEHOLDER, IMAGE_OUT_PLACEHOLDER), *others]
    out = []
    for i, turn in enumerate(turns):
        if turn.role == "user":
            for placeholder, output in outputs:
                if output in turn.text:
                    raise RecordError(
                        "bad_value",
                        f"{field}[{i}] is a 'human' turn with '{output}'; an output the model "
                        f"produces belongs in a 'gpt' turn (where '{placeholder}' means the same)",
                    )
            out.append(turn)
        else:
            text = turn.text.replace(IMAGE_PLACEHOLDER, IMAGE_OUT_PLACEHOLDER)
            for placeholder, output in others:
                text = text.replace(placeholder, output)
            out.append(Turn(turn.role, text))
    return out


def insert_image_placeholders(turns: list[Turn], num_images: int) -> list[Turn]:
    """Check placeholders against images; with none at all, prepend them to the first user turn.

    Input (``"<image>"``) and output (``"<image_out>"``) placeholders both take one image each.
    Raises ``RecordError("placeholder_mismatch", ...)`` for any other mismatch.
    """
    texts = [t.text for t in turns]
    inputs = count_placeholders(texts)
    outputs = sum(text.count(IMAGE_OUT_PLACEHOLDER) for text in texts)
    found = inputs + outputs
    if found == num_images:
        return turns
    if found == 0:
        for i, turn in enumerate(turns):
            if turn.role == "user":
                prefix = (IMAGE_PLACEHOLDER + "\n") * num_images
                return [*turns[:i], Turn("user", prefix + turn.text), *turns[i + 1 :]]
        raise RecordError(
            "placeholder_mismatch",
            f"{num_images} image(s) but no human turn to put the '<image>' placeholder in",
        )
    drawn = f" and {outputs} in 'gpt' turns (images to draw)" if outputs else ""
    raise RecordError(
        "placeholder_mismatch",
        f"{inputs} '<image>' placeholder(s) in the text{drawn} but {num_images} image(s)",
    )


def turns_to_llava(turns: Sequence[Turn]) -> list[dict[str, str]]:
    """Turns → LLaVA ``[{from, value}]``."""
    return [{"from": _LLAVA_ROLE[t.role], "value": t.text} for t in turns]


def resolve_image(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


def check_images_exist(paths: Sequence[Path]) -> None:
    for path in paths:
        try:
            found = path.is_file()
        except OSError as exc:  # e.g. a name longer than the filesystem allows
            detail = f"{str(path)[:200]}: unusable path ({exc.strerror})"
            raise RecordError("bad_path", detail) from None
        if not found:
            raise RecordError("missing_image", f"{path}: file not found")


def check_inputs_exist(inputs: dict[str, list[Path]]) -> None:
    """Like :func:`check_images_exist` for other modalities' files (reason ``missing_file``)."""
    for modality, paths in inputs.items():
        for path in paths:
            try:
                found = path.is_file()
            except OSError as exc:
                detail = f"{str(path)[:200]}: unusable path ({exc.strerror})"
                raise RecordError("bad_path", detail) from None
            if not found:
                raise RecordError("missing_file", f"{path}: {modality} file not found")


def record_id(obj: dict[str, Any]) -> str | None:
    value = obj.get("id")
    return None if value is None else str(value)


def collect_records(
    path: Path,
    rows: Iterable[tuple[int, Any]],
    parse: Callable[[Any, int], list[Record]],
) -> tuple[list[Record], list[Problem]]:
    """Records from ``(line, object)`` rows of the file ``path``, ``parse(object, line)`` giving
    each row's records; a ``RecordError`` (raised by ``parse`` or yielded by the reader)
    becomes a :class:`Problem` of that line instead."""
    records: list[Record] = []
    problems: list[Problem] = []
    for line, obj in rows:
        ident = record_id(obj) if isinstance(obj, dict) else None
        try:
            if isinstance(obj, RecordError):
                raise obj
            records.extend(parse(obj, line))
        except RecordError as exc:
            problems.append(Problem(str(path), line, exc.reason, str(exc), ident))
    return records, problems


def read_llava(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None
) -> tuple[list[Record], list[Problem]]:
    """Parse a LLaVA ``.json`` list (or ``.jsonl``) into records and problems.

    A JSON syntax error in a ``.json`` file raises ``DataError`` (nothing after it can be
    read); everything else is a per-record problem with its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LLaVA data file not found")
    root = Path(image_root) if image_root is not None else path.parent
    base = root.resolve()
    rows = iter_jsonl(path) if path.suffix == ".jsonl" else iter_json_array(path)
    return collect_records(
        path, rows, lambda obj, line: [_parse_record(obj, root, base, str(path), line)]
    )


def _parse_record(obj: Any, root: Path, base: Path, file: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise RecordError("bad_type", f"a record must be an object, got {type(obj).__name__}")
    names, other_names = parse_inputs(obj)
    turns = mark_output_images(parse_conversation(obj.get("conversations")))
    turns = insert_image_placeholders(turns, len(names))
    turns = insert_input_placeholders(turns, other_names)
    paths = [resolve_image(root, name) for name in names]
    inputs = {m: [resolve_image(root, n) for n in ns] for m, ns in other_names.items()}
    others = [p for ps in inputs.values() for p in ps]
    check_images_exist(paths)
    check_inputs_exist(inputs)
    used = ("image", "conversations", "inputs", *inputs)
    meta = {k: v for k, v in obj.items() if k not in used}
    leaving = outside_root(base, paths + others)
    return Record(file, line, record_id(obj), paths, turns, meta, leaving, inputs)


@register("dataset", "llava")
class LlavaDataset(FileRecordDataset):
    """Samples from LLaVA conversation JSON; see the module docstring for the format (an
    ``"<image>"`` in a ``gpt`` turn is an image the model learns to draw).

    Args:
        path: the ``.json`` (list) or ``.jsonl`` file.
        image_root: directory the image paths are relative to (default: the file's directory).
        strict: raise on the first problem instead of skipping it.
        max_pixels: refuse larger images (see ``load_image``).
        verify_images: decode every image now, so ``skipped`` is complete before training.
        allow_outside_root: accept image paths that leave ``image_root`` (``..``, absolute
            paths, symlinks out); refused with a ``DataError`` otherwise.
    """

    format_name = "llava"

    read = staticmethod(read_llava)

    def build(self, record: Record, images: list[Any]) -> Sample:
        meta = record_meta(record)
        inputs, outputs = split_images(record.data, images)
        return Sample(list(record.data), images=inputs, output_images=outputs, meta=meta)
