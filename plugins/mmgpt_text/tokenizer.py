"""Byte-level BPE text tokenizer over Hugging Face ``tokenizers``, plus any local tokenizer.json.

A tokenizer trained here is byte-level BPE with no normalizer and a ByteLevel pre-tokenizer
without an added prefix space, so every UTF-8 string round-trips losslessly:
``decode(encode(s)) == s``. Its first ids are the special tokens ``<pad> <bos> <eos> <image>``
and the reserved signal tokens ``[IMG0]..[IMG{k-1}]`` that a model emits to produce images.

Any other Hugging Face ``tokenizer.json`` (GPT-2's, for instance) loads through the same class:
``bos``/``eos``/``pad`` map onto tokens it already has, and the mmgpt tokens it lacks
(``<image>``, the signal tokens, and ``<eos>`` if it has no end token) are appended at the end of
its vocabulary. A model used with such a tokenizer needs an embedding of at least
:attr:`TextTokenizer.vocab_size` rows, which is then larger than the original vocabulary.

On disk a tokenizer is ``tokenizer.json`` (the standard Hugging Face file, readable by
``tokenizers`` and ``transformers`` alone) and ``mmgpt_tokenizer.json`` naming which tokens play
the roles bos/eos/pad/image/signal.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from mmgpt.files import atomic_write_bytes
from mmgpt.registry import register

TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "mmgpt_tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
METADATA_VERSION = 1

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
IMAGE_TOKEN = "<image>"
DEFAULT_NUM_SIGNAL_TOKENS = 8
NUM_BYTES = 256

# Tokens other tokenizers use for the same roles, tried in order when loading a foreign
# tokenizer.json without mmgpt metadata (after its own tokenizer_config.json, if any).
_BOS_CANDIDATES = (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<|endoftext|>")
_PAD_CANDIDATES = (PAD_TOKEN, "[PAD]", "<|pad|>", "<|padding|>")


def signal_token_names(num_signal_tokens: int) -> list[str]:
    """The reserved signal tokens ``[IMG0]..[IMG{k-1}]``."""
    return [f"[IMG{i}]" for i in range(num_signal_tokens)]


def _special(content: str) -> AddedToken:
    # normalized=False and no stripping: the token matches its literal text exactly and
    # never swallows surrounding whitespace, which would break the lossless round trip.
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True
    )


def _check_num_signal_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"num_signal_tokens must be an integer >= 0, got {value!r}")
    return value


class TextTokenizer:
    """Text ↔ ids with mmgpt's special tokens; see the module docstring.

    Build one with :meth:`train` or :meth:`from_file`, not with the constructor.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str,
        image_token: str,
        signal_tokens: Sequence[str],
    ) -> None:
        # Encoding must return exactly the ids of the text: no truncation, no padding, and the
        # post-processor (e.g. BERT's [CLS] … [SEP]) is bypassed with add_special_tokens=False.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self._tokens = {
            "bos": bos_token,
            "eos": eos_token,
            "pad": pad_token,
            "image": image_token,
        }
        self._signal_tokens = list(signal_tokens)
        ids: dict[str, int] = {}
        for role, token in [*self._tokens.items(), *(("signal", t) for t in self._signal_tokens)]:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{role} token {token!r} is not in the tokenizer's vocabulary")
            ids[token] = token_id
        self._ids = ids
        self._signal_ids = [ids[t] for t in self._signal_tokens]
        if len(set(self._signal_ids) | {ids[image_token]}) != len(self._signal_ids) + 1:
            raise ValueError("the image token and the signal tokens must all have distinct ids")
        # Not get_vocab_size(): a hand-written tokenizer.json may leave holes in its ids,
        # and the embedding must cover the largest id.
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    # -- construction ---------------------------------------------------------------
    @classmethod
    def train(
        cls,
        files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        vocab_size: int,
        min_frequency: int = 2,
        num_signal_tokens: int = DEFAULT_NUM_SIGNAL_TOKENS,
    ) -> TextTokenizer:
        """Train byte-level BPE on UTF-8 text files.

        ``files`` is a path or a list of paths; each may be a file, a directory (its ``*.txt``
        files, recursively) or a glob pattern. ``vocab_size`` counts the 256 byte tokens, the
        special tokens and the merges; a small corpus may stop short of it when no pair occurs
        ``min_frequency`` times any more.
        """
        num_signal_tokens = _check_num_signal_tokens(num_signal_tokens)
        specials = [
            PAD_TOKEN,
            BOS_TOKEN,
            EOS_TOKEN,
            IMAGE_TOKEN,
            *signal_token_names(num_signal_tokens),
        ]
        minimum = NUM_BYTES + len(specials)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small: it must hold the {NUM_BYTES} byte tokens "
                f"and {len(specials)} special tokens, so at least {minimum}"
            )
        if (
            isinstance(min_frequency, bool)
            or not isinstance(min_frequency, int)
            or min_frequency < 1
        ):
            raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
        paths = _resolve_training_files(files)

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[_special(s) for s in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        try:
            tok.train([str(p) for p in paths], trainer)
        except Exception as exc:
            # The Rust error does not say which file; find it so the message can.
            for p in paths:
                try:
                    p.read_text(encoding="utf-8")
                except UnicodeDecodeError as dec:
                    raise ValueError(f"{p}: training file is not valid UTF-8 ({dec})") from exc
            raise RuntimeError(f"BPE training failed on {[str(p) for p in paths]}: {exc}") from exc
        return cls(
            tok,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            image_token=IMAGE_TOKEN,
            signal_tokens=signal_token_names(num_signal_tokens),
        )

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, num_signal_tokens: int | None = None
    ) -> TextTokenizer:
        """Load a directory holding ``tokenizer.json``, or a tokenizer JSON file.

        A tokenizer saved by mmgpt restores its roles from ``mmgpt_tokenizer.json``. Any other
        Hugging Face tokenizer gets bos/eos/pad from its ``tokenizer_config.json`` or from
        well-known token names (pad and bos fall back to eos, as GPT-2 does), and the missing
        mmgpt tokens appended; ``num_signal_tokens`` (default 8) sets how many signal tokens.
        """
        path = Path(path)
        if path.is_dir():
            tok_path = path / TOKENIZER_FILE
            if not tok_path.is_file():
                raise FileNotFoundError(f"{tok_path}: no {TOKENIZER_FILE} in directory {path}")
        elif path.is_file():
            tok_path = path
        else:
            raise FileNotFoundError(f"{path}: tokenizer file or directory not found")
        # Companion files count only next to a file with the standard name, so an unrelated
        # foo.json is never paired with another tokenizer's metadata.
        companions = tok_path.name == TOKENIZER_FILE
        meta_path = tok_path.with_name(METADATA_FILE)
        hf_config_path = tok_path.with_name(HF_CONFIG_FILE)

        try:
            text = tok_path.read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(
                f"{tok_path}: not a valid Hugging Face tokenizer JSON file ({exc})"
            ) from exc

        if companions and meta_path.is_file():
            return cls._from_metadata(tok, meta_path, num_signal_tokens)
        k = DEFAULT_NUM_SIGNAL_TOKENS if num_signal_tokens is None else num_signal_tokens
        hf_config = (
            _read_hf_config(hf_config_path) if companions and hf_config_path.is_file() else {}
        )
        return cls._adopt(tok, _check_num_signal_tokens(k), hf_config)

    @classmethod
    def _from_metadata(
        cls, tok: Tokenizer, meta_path: Path, num_signal_tokens: int | None
    ) -> TextTokenizer:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            roles = {key: meta[f"{key}_token"] for key in ("bos", "eos", "pad", "image")}
            signals = meta["signal_tokens"]
            if not all(isinstance(v, str) for v in roles.values()) or not (
                isinstance(signals, list) and all(isinstance(s, str) for s in signals)
            ):
                raise TypeError("token fields must be strings, signal_tokens a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{meta_path}: invalid mmgpt tokenizer metadata ({type(exc).__name__}: {exc}); "
                "expected bos_token, eos_token, pad_token, image_token and signal_tokens"
            ) from exc
        if num_signal_tokens is not None and num_signal_tokens != len(signals):
            raise ValueError(
                f"{meta_path}: the tokenizer has {len(signals)} signal tokens but "
                f"num_signal_tokens={num_signal_tokens} was requested"
            )
        try:
            return cls(tok, **{f"{k}_token": v for k, v in roles.items()}, signal_tokens=signals)
        except ValueError as exc:
            raise ValueError(f"{meta_path}: {exc}") from exc

    @classmethod
    def _adopt(
        cls, tok: Tokenizer, num_signal_tokens: int, hf_config: dict[str, Any]
    ) -> TextTokenizer:
        """Wrap a foreign tokenizer, appending the mmgpt special tokens it lacks."""

        def find(role: str, candidates: Sequence[str]) -> str | None:
            configured = hf_config.get(f"{role}_token")
            for token in ([configured] if configured else []) + list(candidates):
                if tok.token_to_id(token) is not None:
                    return token
            return None

        eos = find("eos", _EOS_CANDIDATES) or EOS_TOKEN
        bos = find("bos", _BOS_CANDIDATES) or eos
        pad = find("pad", _PAD_CANDIDATES) or eos
        image = IMAGE_TOKEN
        signals = signal_token_names(num_signal_tokens)
        # Adding a token that already exists keeps its id (and makes it special, so its
        # literal text always encodes to that one id); a new one gets the next id at the end.
        wanted = list(dict.fromkeys([bos, eos, pad, image, *signals]))
        tok.add_special_tokens([_special(t) for t in wanted])
        return cls(
            tok,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            image_token=image,
            signal_tokens=signals,
        )

    # -- properties -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Largest id + 1: the number of embedding rows a model needs."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._ids[self._tokens["bos"]]

    @property
    def eos_id(self) -> int:
        return self._ids[self._tokens["eos"]]

    @property
    def pad_id(self) -> int:
        """May equal ``eos_id`` (GPT-2); padding must be read from attention masks, not ids."""
        return self._ids[self._tokens["pad"]]

    @property
    def image_token_id(self) -> int:
        return self._ids[self._tokens["image"]]

    @property
    def signal_token_ids(self) -> list[int]:
        return list(self._signal_ids)

    @property
    def bos_token(self) -> str:
        return self._tokens["bos"]

    @property
    def eos_token(self) -> str:
        return self._tokens["eos"]

    @property
    def pad_token(self) -> str:
        return self._tokens["pad"]

    @property
    def image_token(self) -> str:
        return self._tokens["image"]

    @property
    def signal_tokens(self) -> list[str]:
        return list(self._signal_tokens)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # -- encode / decode ------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of ``text``; special-token strings in it (e.g. ``"<image>"``) become one id."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel in the Rust backend)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch() expects strs, item {i} is {type(text).__name__}")
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, or a 1-D tensor/array)."""
        if hasattr(ids, "tolist"):  # torch.Tensor / numpy array
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(
                f"decode(): ids {bad[:5]} are outside the vocabulary [0, {self._vocab_size})"
            )
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # -- persistence ----------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` and ``mmgpt_tokenizer.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory}: save() needs a directory, this is a file")
        meta = {
            "format_version": METADATA_VERSION,
            "name": "bpe",
            **{f"{role}_token": token for role, token in self._tokens.items()},
            "signal_tokens": self._signal_tokens,
        }
        atomic_write_bytes(
            directory / TOKENIZER_FILE, self._tok.to_str(pretty=True).encode("utf-8")
        )
        atomic_write_bytes(
            directory / METADATA_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        )

    def config_dict(self) -> dict[str, Any]:
        """What a model's config.json records to rebuild this tokenizer with ``create``."""
        return {"name": "bpe", "num_signal_tokens": len(self._signal_tokens)}

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self._vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r}, "
            f"num_signal_tokens={len(self._signal_tokens)})"
        )


def _resolve_training_files(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    entries = list(files)
    if not entries:
        raise ValueError("no training files given: pass files=[...] with at least one path")
    paths: list[Path] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise ValueError(f"{p}: directory contains no *.txt training files")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(str(entry)):
            found = sorted(
                Path(q) for q in glob.glob(str(entry), recursive=True) if Path(q).is_file()
            )
            if not found:
                raise ValueError(f"no training files matched the pattern {str(entry)!r}")
            paths.extend(found)
        else:
            raise FileNotFoundError(f"{p}: training file not found")
    paths = list(dict.fromkeys(paths))
    if all(p.stat().st_size == 0 for p in paths):
        raise ValueError(f"all training files are empty: {[str(p) for p in paths]}")
    return paths


def _read_hf_config(path: Path) -> dict[str, Any]:
    """bos/eos/pad token names from a Hugging Face tokenizer_config.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return out
    for role in ("bos", "eos", "pad"):
        value = data.get(f"{role}_token")
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str) and value:
            out[f"{role}_token"] = value
    return out


@register("tokenizer", "bpe")
def create_bpe_tokenizer(
    *,
    path: str | os.PathLike[str] | None = None,
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    vocab_size: int | None = None,
    min_frequency: int = 2,
    num_signal_tokens: int | None = None,
) -> TextTokenizer:
    """Registry factory: ``path=`` loads (:meth:`TextTokenizer.from_file`), ``files=`` trains."""
    if (path is None) == (files is None):
        raise ValueError(
            "tokenizer 'bpe' needs exactly one of path= (load a tokenizer.json or its directory) "
            "or files= (train on text files)"
            + ("; both were given" if path is not None else "; neither was given")
        )
    if path is not None:
        if vocab_size is not None:
            raise ValueError("vocab_size= applies only to training (files=...), not to path=")
        return TextTokenizer.from_file(path, num_signal_tokens=num_signal_tokens)
    if vocab_size is None:
        raise ValueError("training tokenizer 'bpe' from files= needs vocab_size=")
    return TextTokenizer.train(
        files,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        num_signal_tokens=DEFAULT_NUM_SIGNAL_TOKENS
        if num_signal_tokens is None
        else num_signal_tokens,
    )
