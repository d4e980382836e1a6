"""Plain-text corpora for language modelling: files → tokens → packed windows.

Every file is a document (or several, with ``doc_separator``); documents are tokenized, joined
with ``eos`` and cut into windows of ``block_size + 1`` tokens with stride ``block_size`` (the
``+ 1`` is the target of the last position, so each token is predicted exactly once). A fixed
fraction of the windows, spread evenly through the corpus, is held out for evaluation.
Tokenization is cached in memory (numpy int32), so the train and eval splits of one corpus
tokenize it once.
"""

from __future__ import annotations

import glob
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmgpt.registry import register

__all__ = ["TextDataset", "resolve_text_files", "tokenize_files"]

SPLITS = ("train", "eval")
_CACHE_SIZE = 4
# (tokenizer id, files with mtimes and sizes, separator) → (tokenizer, tokens)
_TOKEN_CACHE: OrderedDict[tuple, tuple[Any, np.ndarray]] = OrderedDict()


def resolve_text_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand a glob, a directory (its ``*.txt`` files, recursively), a file, or a list of these.

    Raises ``FileNotFoundError`` naming the pattern that matches nothing.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no text files given (an empty list of paths)")
    files: list[Path] = []
    for item in items:
        item = os.fspath(item)
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"{path}: directory contains no .txt files")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(
                Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()
            )
            if not found:
                raise FileNotFoundError(f"no files match {item!r}")
        files.extend(found)
    # keep the first occurrence of a file listed twice
    return list(dict.fromkeys(files))


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def tokenize_files(
    files: Sequence[Path], tokenizer: Any, doc_separator: str | None = None
) -> np.ndarray:
    """Token ids of all documents, each followed by ``eos``, as one int32 array (cached)."""
    stats = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    key = (id(tokenizer), stats, doc_separator)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:  # `is`: an id can be reused after GC
        _TOKEN_CACHE.move_to_end(key)
        return hit[1]
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; text packing needs one between documents")
    parts: list[np.ndarray] = []
    for f in files:
        text = read_utf8(f)
        docs = text.split(doc_separator) if doc_separator else [text]
        for doc in docs:
            if not doc.strip():
                continue
            ids = tokenizer.encode(doc)
            parts.append(np.asarray([*ids, eos], dtype=np.int32))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    tokens.flags.writeable = False  # shared by every split through the cache
    _TOKEN_CACHE[key] = (tokenizer, tokens)
    while len(_TOKEN_CACHE) > _CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return tokens


def is_heldout(window: int, fraction: float) -> bool:
    """Window ``i`` is held out when ``floor((i + 1) f) > floor(i f)``: evenly spread, exact count."""
    return math.floor((window + 1) * fraction) > math.floor(window * fraction)


@register("dataset", "text")
class TextDataset(Dataset):
    """Packed ``block_size + 1`` token windows of UTF-8 text files.

    Args:
        paths: a glob (``"corpus/*.txt"``), a directory, a file, or a list of these.
        tokenizer: anything with ``encode(text) -> list[int]`` and ``eos_id``.
        block_size: the model's context; samples hold ``block_size + 1`` tokens.
        split: ``"train"`` or ``"eval"``.
        eval_fraction: share of windows held out for ``"eval"`` (0 ≤ f < 1).
        doc_separator: split each file into documents at this string (default: one per file).

    A sample is ``{"input_ids": LongTensor (block_size + 1,)}``; the ``lm`` objective feeds
    all but the last token and predicts all but the first.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Any,
        block_size: int,
        split: str = "train",
        eval_fraction: float = 0.1,
        doc_separator: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: expected a positive integer, got {block_size!r}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected 0 <= eval_fraction < 1, got {eval_fraction}")
        self.files = resolve_text_files(paths)
        self.block_size = block_size
        self.split = split
        self.eval_fraction = eval_fraction
        self.tokens = tokenize_files(self.files, tokenizer, doc_separator)
        n_windows = max(0, (len(self.tokens) - 1) // block_size)
        keep_heldout = split == "eval"
        self.starts = np.asarray(
            [
                i * block_size
                for i in range(n_windows)
                if is_heldout(i, eval_fraction) == keep_heldout
            ],
            dtype=np.int64,
        )
        if len(self.starts) == 0:
            raise ValueError(
                f"text data {[str(f) for f in self.files][:3]}: {len(self.tokens)} tokens give "
                f"no {split!r} window of block_size + 1 = {block_size + 1} tokens "
                f"({n_windows} window(s) in all, eval_fraction={eval_fraction}); "
                "add text or lower block_size"
            )

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole corpus (both splits)."""
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.starts[index])
        window = self.tokens[start : start + self.block_size + 1]
        return {"input_ids": torch.from_numpy(window.astype(np.int64))}
