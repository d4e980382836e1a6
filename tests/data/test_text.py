"""Text corpora: file resolution, UTF-8 errors, packing, the held-out split, the token cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmgpt.data.text import TextDataset, is_heldout, resolve_text_files
from mmgpt.registry import create


class CountingCharTokenizer:
    """One id per character (after 3 specials); counts encode calls."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.calls = 0

    @property
    def vocab_size(self) -> int:
        return 3 + 128

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        self.calls += 1
        return [3 + (ord(c) % 128) for c in text]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("abcdefghij" * 3, encoding="utf-8")  # 30 chars
    (d / "b.txt").write_text("KLMNOPQRST" * 2, encoding="utf-8")  # 20 chars
    (d / "notes.md").write_text("not text data", encoding="utf-8")
    return d


def test_registered_and_packed_windows(corpus: Path) -> None:
    tok = CountingCharTokenizer()
    ds = create("dataset", "text", paths=str(corpus / "*.txt"), tokenizer=tok, block_size=8,
                eval_fraction=0.0)  # fmt: skip
    # documents in sorted file order, each followed by eos
    stream = [3 + ord(c) for c in "abcdefghij" * 3] + [2] + [3 + ord(c) for c in "KLMNOPQRST" * 2]
    stream.append(2)
    assert ds.tokens.dtype == np.int32 and ds.tokens.tolist() == stream
    assert len(ds) == (len(stream) - 1) // 8 == 6
    for i in range(len(ds)):
        window = ds[i]["input_ids"]
        assert window.dtype == torch.long and window.shape == (9,)
        # stride block_size, length block_size + 1: window i ends where window i + 1 starts
        assert window.tolist() == stream[8 * i : 8 * i + 9]


def test_split_is_deterministic_disjoint_and_spread(corpus: Path) -> None:
    tok = CountingCharTokenizer()
    args = dict(paths=corpus, tokenizer=tok, block_size=2, eval_fraction=0.25)
    train, held = TextDataset(split="train", **args), TextDataset(split="eval", **args)
    total = (len(train.tokens) - 1) // 2
    assert len(train) + len(held) == total
    assert set(train.starts.tolist()).isdisjoint(held.starts.tolist())
    assert len(held) == int(total * 0.25)
    # spread through the corpus, not a block at the end
    assert held.starts.min() // 2 < total // 2  # first held-out window in the first half
    again = TextDataset(split="eval", **args)
    assert again.starts.tolist() == held.starts.tolist()
    assert [is_heldout(i, 0.25) for i in range(8)] == [False, False, False, True] * 2


def test_tokenization_is_cached_across_splits(corpus: Path) -> None:
    tok = CountingCharTokenizer()
    TextDataset(corpus, tok, block_size=4, split="train")
    calls = tok.calls
    assert calls == 2  # one per file
    TextDataset(corpus, tok, block_size=4, split="eval")
    TextDataset([corpus / "a.txt", corpus / "b.txt"], tok, block_size=4)
    assert tok.calls == calls
    # an edited file is tokenized again
    (corpus / "a.txt").write_text("changed text here!", encoding="utf-8")
    TextDataset(corpus, tok, block_size=4)
    assert tok.calls == calls + 2


def test_doc_separator(tmp_path: Path) -> None:
    f = tmp_path / "docs.txt"
    f.write_text("ab\n\ncd\n\n\n\nef", encoding="utf-8")
    ds = TextDataset(
        f, CountingCharTokenizer(), block_size=2, doc_separator="\n\n", eval_fraction=0
    )
    assert ds.tokens.tolist().count(2) == 3  # empty documents are skipped


def test_resolve_directory_glob_and_list(corpus: Path) -> None:
    assert [p.name for p in resolve_text_files(corpus)] == ["a.txt", "b.txt"]
    assert [p.name for p in resolve_text_files(str(corpus / "b*"))] == ["b.txt"]
    files = resolve_text_files([corpus / "b.txt", str(corpus / "*.txt")])
    assert [p.name for p in files] == ["b.txt", "a.txt"]  # listed order, no duplicates


def test_glob_matching_nothing_is_named(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(FileNotFoundError, match="no files match .*nothing"):
        TextDataset(pattern, CountingCharTokenizer(), block_size=4)


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine text " * 5, encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 .*0xe9 at offset 3"):
        TextDataset(tmp_path, CountingCharTokenizer(), block_size=4)


def test_too_little_text_is_a_clear_error(corpus: Path) -> None:
    with pytest.raises(ValueError, match="no 'train' window .*block_size \\+ 1 = 1001"):
        TextDataset(corpus, CountingCharTokenizer(), block_size=1000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "test"}, "split"),
        ({"block_size": 0}, "block_size"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
    ],
)
def test_bad_arguments(corpus: Path, kwargs: dict, match: str) -> None:
    args = {"paths": corpus, "tokenizer": CountingCharTokenizer(), "block_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        TextDataset(**args)
