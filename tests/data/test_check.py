"""`mmgpt data check` backend: format detection, problem lists, counts and length statistics."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmgpt.data.check import CheckReport, check_dataset, detect_format
from mmgpt.data.records import DataError


class WordTokenizer:
    """Counts whitespace-separated words; enough to check token statistics."""

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [len(word) for word in text.split()]


@pytest.fixture
def imagefolder(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    Image.new("L", (4, 4), 9).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "stray.png")  # named by no row
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:300])
    (tmp_path / "text.png").write_text("plain text")
    rows = [
        json.dumps({"file_name": "a.png", "text": "one two three"}),
        json.dumps({"file_name": "cut.png", "text": "x"}),
        "{bad json",
        json.dumps({"file_name": "text.png", "text": "y"}),
        json.dumps({"file_name": "gone.png", "text": "z"}),
        json.dumps(
            {
                "file_name": "b.png",
                "conversations": [
                    {"from": "human", "value": "<image> four"},
                    {"from": "gpt", "value": "five six"},
                ],
            }
        ),
        json.dumps(
            {
                "file_name": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image> and <image>"},
                    {"from": "gpt", "value": "no"},
                ],
            }
        ),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_check_imagefolder_reports_every_problem(imagefolder):
    report = check_dataset(imagefolder)
    assert report.format == "imagefolder"
    assert report.num_records == 4  # rows that parsed: a, cut, text, b
    assert report.num_samples == 2 and report.num_images == 2
    assert report.counts == {
        "bad_json": 1,
        "missing_image": 1,
        "not_an_image": 1,
        "placeholder_mismatch": 1,
        "truncated_image": 1,
    }
    assert [(p.line, p.reason) for p in report.problems] == [
        (2, "truncated_image"),
        (3, "bad_json"),
        (4, "not_an_image"),
        (5, "missing_image"),
        (7, "placeholder_mismatch"),
    ]
    assert [p.reason for p in report.warnings] == ["unreferenced_image"]
    assert report.warnings[0].file.endswith("stray.png")
    # char lengths of "<image>\nDescribe the image.\none two three" and "<image> four\nfive six"
    expected = sorted(
        [len("<image>\nDescribe the image.\none two three"), len("<image> four\nfive six")]
    )
    assert (report.lengths.unit, report.lengths.min, report.lengths.max) == ("chars", *expected)
    assert report.lengths.mean == sum(expected) / 2
    assert not report.ok and report.exit_code == 1  # problems fail the check without --strict
    assert check_dataset(imagefolder, strict=True).exit_code == 1

    text = report.to_text()
    assert "format:   imagefolder" in text
    assert "metadata.jsonl:3: bad_json" in text
    assert "problems: 5" in text and "result:   5 issue(s)" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["problem_counts"]["truncated_image"] == 1 and data["lengths"]["count"] == 2


def test_check_llava_placeholder_mismatch_with_line_and_id(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "x.png")
    records = [
        {
            "id": "ok",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nq"},
                {"from": "gpt", "value": "a"},
            ],
        },
        {
            "id": "two",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image> <image>"},
                {"from": "gpt", "value": "a"},
            ],
        },
        {
            "id": "none",
            "conversations": [
                {"from": "human", "value": "<image> but no image"},
                {"from": "gpt", "value": "a"},
            ],
        },
        {
            "id": "ok",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a b"}],
        },
    ]
    (tmp_path / "d.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]")
    report = check_dataset(tmp_path, tokenizer=WordTokenizer())
    assert report.format == "llava" and report.num_samples == 2
    mismatches = [(p.line, p.id) for p in report.problems if p.reason == "placeholder_mismatch"]
    assert mismatches == [(3, "two"), (4, "none")]
    assert "d.json:3 (id two): placeholder_mismatch" in report.to_text()
    assert [(w.reason, w.line) for w in report.warnings] == [("duplicate_id", 5)]
    stats = report.lengths  # token counts: "<image>\nq\na" → 3 words, "hi\na b" → 3 words
    assert (stats.unit, stats.count, stats.min, stats.max, stats.p95) == ("tokens", 2, 3, 3, 3)


def test_check_llava_syntax_error_is_one_problem(tmp_path):
    (tmp_path / "d.json").write_text('[\n{"conversations": [\n]\n')
    report = check_dataset(tmp_path / "d.json")
    assert [(p.reason, p.line) for p in report.problems] == [("bad_json", 4)]
    assert report.num_samples == 0 and report.lengths is None
    assert "lengths" not in report.to_text()


def test_check_preference_counts_pairs_and_token_stats(tmp_path):
    rows = [
        {"prompt": "a b", "chosen": "c", "rejected": "d e"},
        {"prompt": "q", "responses": ["w1", "w2 w2", "w3 w3 w3", "w4 w4 w4 w4"]},
        {"prompt": "q"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = check_dataset(tmp_path / "p.jsonl", tokenizer=WordTokenizer())
    assert report.format == "preference"
    assert report.num_records == 2 and report.num_samples == 1 + 6
    assert [(p.line, p.reason) for p in report.problems] == [(3, "missing_field")]
    # each pair contributes prompt+chosen and prompt+rejected
    lengths = [3, 4] + [1 + n for a in range(1, 5) for b in range(a + 1, 5) for n in (a, b)]
    stats = report.lengths
    assert stats.count == len(lengths) == 14
    assert (stats.min, stats.max) == (min(lengths), max(lengths))
    assert stats.mean == pytest.approx(sum(lengths) / len(lengths))
    assert stats.p95 == sorted(lengths)[13]  # nearest rank: ceil(0.95 * 14) = 14th


def test_check_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9")
    (tmp_path / "c.txt").write_text("  \n")
    report = check_dataset(tmp_path)
    assert report.format == "text"
    assert report.num_records == 2 and report.num_samples == 1
    assert [p.reason for p in report.problems] == ["bad_encoding"]
    assert [p.reason for p in report.warnings] == ["empty_file"]
    assert report.lengths.max == len("hello world")

    (tmp_path / "b.txt").unlink()
    clean = check_dataset(tmp_path)
    assert clean.ok and clean.exit_code == 0
    strict = check_dataset(tmp_path, strict=True)  # the empty file now counts
    assert not strict.ok and strict.exit_code == 1


def test_detect_format(tmp_path, imagefolder):
    assert detect_format(imagefolder) == ("imagefolder", imagefolder)
    assert detect_format(imagefolder / "metadata.jsonl") == ("imagefolder", imagefolder)
    (tmp_path / "llava.jsonl").write_text('{"conversations": []}\n')
    (tmp_path / "pref.jsonl").write_text('\n{"prompt": "p", "responses": []}\n')
    assert detect_format(tmp_path / "llava.jsonl")[0] == "llava"
    assert detect_format(tmp_path / "pref.jsonl")[0] == "preference"
    with pytest.raises(DataError, match="no such file"):
        detect_format(tmp_path / "absent")
    with pytest.raises(DataError, match="suffix '.xyz'"):
        (tmp_path / "x.xyz").write_text("")
        detect_format(tmp_path / "x.xyz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot tell"):
        check_dataset(empty)
    assert isinstance(check_dataset(imagefolder, format="imagefolder"), CheckReport)


def test_cli_exit_status_problems_fail_and_strict_adds_warnings(tmp_path, capsys):
    from mmgpt.cli import main

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "stray.png")  # a warning: no row names it
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "a square"}) + "\n")
    assert main(["data", "check", str(tmp_path)]) == 0  # warnings alone pass
    assert "result:   OK" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path), "--strict"]) == 1
    assert "1 issue(s)" in capsys.readouterr().out

    with meta.open("a") as handle:
        handle.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    assert main(["data", "check", str(tmp_path)]) == 1  # a problem fails without --strict
    out = capsys.readouterr().out
    assert "metadata.jsonl:2: missing_image" in out and "result:   1 issue(s)" in out
    assert main(["data", "check", str(tmp_path), "--strict", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
