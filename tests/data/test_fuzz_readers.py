"""Every data reader, fed arbitrary bytes and arbitrary JSON, returns records and problems that
name their file and line, or raises ``DataError`` naming the file: never another exception,
never a hang. The same for the ``key=value`` recipe overrides, whose errors are ``ValueError``s.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmgpt.data.check import check_dataset
from mmgpt.data.imagefolder import read_imagefolder
from mmgpt.data.llava import read_llava
from mmgpt.data.preference import read_preference
from mmgpt.data.records import DataError, Problem, Record
from mmgpt.recipe import apply_overrides, load_recipe, parse_scalar
from mmgpt.rlhf.prompts import read_prompts

# Fixed examples, no example database: the same run every time, nothing written to the tree.
# The deadline catches hangs, not a busy machine (an example takes milliseconds).
FUZZ = settings(max_examples=60, deadline=10_000, derandomize=True, database=None)

# Field names and values of the formats, so that generated records get past the first check.
KEYS = [
    "file_name",
    "text",
    "conversations",
    "from",
    "value",
    "image",
    "id",
    "prompt",
    "chosen",
    "rejected",
    "responses",
    "ranking",
]
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["human", "gpt", "<image>", "a.png", "../a.png", "/", "", " "])
)
json_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=6)
    ),
    max_leaves=25,
)
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=7)
rows = st.lists(records | json_values, max_size=5)

# Inputs that once crashed a reader or could: deep nesting, huge numbers, bad bytes.
NASTY = [
    b"[" * 5000,
    b'{"a": ' * 3000,
    b"1" * 5000,
    b'{"prompt": "x", "chosen": 1' + b"0" * 5000 + b"}",
    b"\xff\xfe\x00bad",
    b'"\xed\xa0\x80"',
    b'{"file_name": "\\ud800.png", "text": "x"}',
    b'{"file_name": "a\\u0000.png", "text": "x"}',
    b"file_name,text\n" + b"x" * 200_000 + b",y\n",
    b'file_name,text\n"a.png,"\n',
    b"file_name,text,conversations\na.png,x,[[[[" + b"[" * 3000 + b"\n",
    b"\x00\x00\n\r\r\n",
]


def check_outcome(read: Callable[[Path], tuple[list[Record], list[Problem]]], path: Path) -> None:
    """The property every reader must have, on one file."""
    try:
        found, problems = read(path)
    except DataError as exc:
        assert exc.file is not None and Path(exc.file).name in str(exc), exc
        str(exc).encode("utf-8", "backslashreplace")
        return
    for problem in problems:
        assert Path(problem.file) == path or Path(problem.file).parent == path.parent
        assert isinstance(problem.line, int) and problem.line >= 1, problem
        assert f"{problem.file}:{problem.line}" in str(problem)
    for record in found:
        assert isinstance(record.line, int) and record.line >= 1


def fuzz_file(name: str, content: bytes, read: Callable[[Path], Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        check_outcome(read, path)


def check_report(target: Path) -> None:
    """``mmgpt data check`` on the same input: a report that prints, or a ``DataError``."""
    try:
        report = check_dataset(target)
    except DataError:
        return
    report.to_text().encode("utf-8")  # stdout is strict UTF-8: no lone surrogates
    json.loads(report.to_json())


def imagefolder(metadata: str) -> Callable[[Path], Any]:
    def read(path: Path) -> Any:
        assert path.name == metadata
        return read_imagefolder(path.parent)

    return read


READERS = {
    "imagefolder jsonl": ("metadata.jsonl", imagefolder("metadata.jsonl")),
    "imagefolder csv": ("metadata.csv", imagefolder("metadata.csv")),
    "llava json": ("data.json", read_llava),
    "llava jsonl": ("data.jsonl", read_llava),
    "preference": ("prefs.jsonl", read_preference),
    "prompts": ("prompts.jsonl", read_prompts),
}


@pytest.mark.parametrize("reader", READERS)
@FUZZ
@given(content=st.binary(max_size=300))
def test_readers_survive_arbitrary_bytes(reader: str, content: bytes) -> None:
    name, read = READERS[reader]
    fuzz_file(name, content, read)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("content", NASTY, ids=range(len(NASTY)))
def test_readers_survive_known_nasty_inputs(reader: str, content: bytes) -> None:
    name, read = READERS[reader]
    fuzz_file(name, content, read)


@pytest.mark.parametrize("reader", READERS)
@FUZZ
@given(values=rows)
def test_readers_survive_arbitrary_json(reader: str, values: list[Any]) -> None:
    name, read = READERS[reader]
    if name.endswith(".jsonl"):
        content = "".join(json.dumps(v) + "\n" for v in values)
    elif name.endswith(".json"):
        content = json.dumps(values if len(values) != 1 else values[0])  # lists and not-lists
    else:  # CSV: the records' values as cells, conversations as JSON text
        keys = sorted({k for v in values if isinstance(v, dict) for k in v}) or ["file_name"]
        lines = [",".join(keys)]
        for v in values:
            cells = v if isinstance(v, dict) else {}
            lines.append(",".join(json.dumps(json.dumps(cells.get(k, ""))) for k in keys))
        content = "\n".join(lines) + "\n"
    fuzz_file(name, content.encode("utf-8", "surrogatepass"), read)


@FUZZ
@given(values=rows, raw=st.binary(max_size=100))
def test_data_check_reports_on_any_imagefolder(values: list[Any], raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lines = [json.dumps(v).encode("utf-8", "surrogatepass") for v in values]
        (root / "metadata.jsonl").write_bytes(b"\n".join([*lines, raw]))
        check_report(root)


# -- key=value overrides --------------------------------------------------------------------
@FUZZ
@given(text=st.text(max_size=40))
@example(text="1" * 5000)  # longer than Python's int-from-string limit
@example(text="2001-13-45")  # a YAML timestamp that is no date
@example(text="!!python/object:os.system x")
def test_parse_scalar_returns_or_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_scalar(text)


override_keys = st.lists(
    st.sampled_from(["train", "data", "model", "lr", "name", "x", ""]), min_size=1, max_size=3
).map(".".join)


@FUZZ
@given(key=override_keys, value=st.text(max_size=20))
def test_apply_overrides_returns_or_raises_value_error(key: str, value: str) -> None:
    with contextlib.suppress(ValueError):
        apply_overrides(load_recipe("lm"), [f"{key}={value}"])


@pytest.mark.parametrize("value", ["{a: [", "1" * 5000, "2001-13-45", "[" * 2000])
def test_override_value_errors_name_the_key(value: str) -> None:
    with pytest.raises(ValueError, match=r"train\.lr"):
        apply_overrides(load_recipe("lm"), [f"train.lr={value}"])


# -- downloaded formats: parquet, datasets directories, tar shards ---------------------------
# The same property: arbitrary bytes, arbitrary rows and arbitrary shard members give samples,
# or problems naming file and row (member), or a DataError naming the file.
TABLE_KEYS = ["image", "images", "conversations", "texts", "text", "caption", "id"]
TABLE_KEYS += ["from", "value", "user", "assistant", "bytes", "path"]
table_values = st.recursive(
    leaves | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(TABLE_KEYS), children, max_size=4)
    ),
    max_leaves=12,
)
table_rows = st.lists(
    st.dictionaries(st.sampled_from(TABLE_KEYS), table_values, max_size=5), max_size=4
)


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def read_parquet_file(path: Path) -> Any:
    pytest.importorskip("pyarrow", reason='parquet needs pip install "mmgpt[data]"')
    from mmgpt.data.columns import Layout
    from mmgpt.data.parquet import read_table_rows

    found = read_table_rows([path], Layout())
    for record in found.records:  # every image through the safe loader
        for source in record.image_paths:
            with contextlib.suppress(DataError):
                from mmgpt.data.images import load_image_bytes

                load_image_bytes(found.image_bytes(source), name=str(source))
    return found.records, found.problems


def read_arrow_file(path: Path) -> Any:
    """An arrow file of a datasets directory (its state.json written beside it)."""
    pytest.importorskip("pyarrow", reason='datasets directories need pip install "mmgpt[data]"')
    from mmgpt.data.columns import Layout
    from mmgpt.data.parquet import hf_dataset_files, read_table_rows

    (path.parent / "state.json").write_text(json.dumps({"_data_files": [{"filename": path.name}]}))
    found = read_table_rows(hf_dataset_files(path.parent)[1], Layout())
    return found.records, found.problems


def read_shard_file(path: Path) -> Any:
    from mmgpt.data.images import ImageLoadError
    from mmgpt.data.shards import ShardDataset

    dataset = ShardDataset(path, task="mixed")
    samples, problems = [], []
    for item in dataset.read_shard(0):
        if item.problem is not None:
            problems.append(item.problem)
            continue
        try:
            dataset.decode(item)
            samples.append(item)
        except ImageLoadError as exc:
            problems.append(item.fail(exc.reason or "corrupt_image", str(exc)))
    return samples, problems


DOWNLOADED_READERS = {
    "parquet": ("data.parquet", read_parquet_file),
    "arrow": ("data-00000-of-00001.arrow", read_arrow_file),
    "shards": ("shard-000000.tar", read_shard_file),
}


@pytest.mark.parametrize("reader", DOWNLOADED_READERS)
@FUZZ
@given(content=st.binary(max_size=600))
@example(content=b"PAR1" + b"\x00" * 40 + b"PAR1")
@example(content=b"\xff\xff\xff\xff" + b"\x00" * 60)  # an arrow stream's continuation marker
@example(content=b"0001.png" + b"\x00" * 92 + b"0000644\x00" + b"\x00" * 400)
def test_downloaded_readers_survive_arbitrary_bytes(reader: str, content: bytes) -> None:
    name, read = DOWNLOADED_READERS[reader]
    fuzz_file(name, content, read)


def _as_text(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: json.dumps(v, default=repr) for k, v in row.items()} for row in values]


def _write_rows(path: Path, values: list[dict[str, Any]]) -> None:
    """The rows as a parquet or arrow file; values pyarrow cannot type or store consistently
    become JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(rows: list[dict[str, Any]]) -> None:
        table = (
            pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())})
        )
        if path.suffix == ".parquet":
            pq.write_table(table, path)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)

    try:
        write(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        write(_as_text(values))


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
@FUZZ
@given(values=table_rows, good_image=st.booleans())
@example(values=[{"image": "x" * 5000, "text": "a path too long to look up"}], good_image=False)
def test_table_readers_survive_arbitrary_rows(
    kind: str, values: list[dict[str, Any]], good_image: bool
) -> None:
    pytest.importorskip("pyarrow", reason='parquet needs pip install "mmgpt[data]"')
    if good_image and values:
        values[0]["image"] = {"bytes": _png(), "path": None}
    with tempfile.TemporaryDirectory() as tmp:
        name, read = DOWNLOADED_READERS[kind]
        path = Path(tmp) / name
        _write_rows(path, values)
        check_outcome(read, path)
        check_report(path)


shard_names = st.tuples(
    st.sampled_from(["0001", "0002", "a/0001", "._0001", "x.y", ""]),
    st.sampled_from(["png", "jpg", "txt", "json", "0.png", "cls", ""]),
).map(lambda parts: ".".join(p for p in parts if p))
shard_contents = (
    st.binary(max_size=40)
    | json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
    | st.just(b"")
    | st.builds(_png)
)


@FUZZ
@given(members=st.lists(st.tuples(shard_names, shard_contents), max_size=8))
def test_shard_reader_survives_arbitrary_members(members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-000000.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name or "noname")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        check_outcome(read_shard_file, path)
        check_report(path)


def test_a_table_whose_field_name_is_not_utf8_is_a_data_error(tmp_path: Path) -> None:
    """Found by mutating files: validation passes, reading a row fails in pyarrow."""
    pa = pytest.importorskip("pyarrow", reason='parquet needs pip install "mmgpt[data]"')
    import pyarrow.parquet as pq

    turns = [{"from": "human", "value": "x"}, {"zzzz": "gpt", "value": "y"}]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([{"conversations": turns}]), buffer, store_schema=False)
    path = tmp_path / "names.parquet"
    path.write_bytes(buffer.getvalue().to_pybytes().replace(b"zzzz", b"\xff\xfe\xfd\xfc"))
    with pytest.raises(DataError, match=r"names\.parquet: not a parquet file"):
        read_parquet_file(path)
    check_report(path)
