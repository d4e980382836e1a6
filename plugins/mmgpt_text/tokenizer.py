"""Byte-level BPE text tokenizer over Hugging Face ``tokenizers``, plus any Hugging Face tokenizer.

A tokenizer trained here is byte-level BPE with no normalizer and a ByteLevel pre-tokenizer
without an added prefix space, so every UTF-8 string round-trips losslessly:
``decode(encode(s)) == s``. Its first ids are the special tokens ``<pad> <bos> <eos> <image>``
and the reserved signal tokens ``[IMG0]..[IMG{k-1}]`` that a model emits to produce images.
Each other output modality of a model gets its own signal tokens (``[AUD0]..`` for a decoder
whose ``signal_prefix`` is ``"AUD"``), appended as special tokens by
:meth:`TextTokenizer.add_output_signal_tokens` and recorded in ``mmgpt_tokenizer.json``.

A pretrained model's tokenizer directory (``tokenizer.json`` with ``tokenizer_config.json``,
``special_tokens_map.json``, ``chat_template.jinja``, ``generation_config.json``, as
:mod:`mmgpt_text.hf` reads them, without ``transformers``) loads through the same class, and
so does a bare ``tokenizer.json`` (GPT-2's, for instance). The special tokens the files name
play their roles (without names, bos/eos/pad map onto well-known tokens it has); its
``add_bos_token``, its chat template (:attr:`TextTokenizer.chat_template`, rendered by
:meth:`TextTokenizer.render_chat`) and the ids that end a reply (:attr:`TextTokenizer.stop_ids`)
are kept; and the mmgpt tokens it lacks (``<image>``, the signal tokens, and ``<eos>`` if it has
no end token) are appended at the end of its vocabulary as special tokens. A model used with
such a tokenizer needs an embedding of :attr:`TextTokenizer.vocab_size` rows, which is then
larger than the original vocabulary. :meth:`TextTokenizer.encode` gives the ids
``transformers``' ``AutoTokenizer`` gives for the same directory (with
``add_bos=tokenizer.add_bos_token`` for its ``add_special_tokens=True``).

On disk a tokenizer is ``tokenizer.json`` and ``tokenizer_config.json`` (standard Hugging Face
files: ``tokenizers`` reads the first alone, and ``AutoTokenizer`` loads the directory with the
same ids and chat template) and ``mmgpt_tokenizer.json``, naming which tokens play the roles
bos/eos/pad/image/signal (and the stop tokens, when a ``generation_config.json`` named them).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from mmgpt.files import atomic_write_bytes
from mmgpt.registry import register
from mmgpt_text.chat_template import ChatTemplateError, compile_chat_template, render_chat_template
from mmgpt_text.hf import (
    DEFAULT_TEMPLATE_NAME,
    SPECIAL_ROLES,
    TOKENIZER_CONFIG_FILE,
    HFTokenizerFiles,
    added_token_entry,
    config_templates_value,
    read_hf_files,
)

TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "mmgpt_tokenizer.json"
HF_CONFIG_FILE = TOKENIZER_CONFIG_FILE
METADATA_VERSION = 1
# tokenizer_config.json keys not copied when saving: the saved tokenizer.json is complete, so
# the directory loads as a plain PreTrainedTokenizerFast (no custom class or remote code).
_DROPPED_CONFIG_KEYS = ("auto_map", "tokenizer_file", "name_or_path", "special_tokens_map_file")
# What a chat template renders as the assistant's reply when looking for its end-of-turn token.
_REPLY_SENTINEL = "mmgptreplysentinel"

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


def output_signal_token_names(prefix: str, count: int) -> list[str]:
    """The signal tokens ``[{prefix}0]..[{prefix}{count-1}]`` of an output modality."""
    return [f"[{prefix}{i}]" for i in range(count)]


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
        unk_token: str | None = None,
        add_bos_token: bool | None = True,
        add_eos_token: bool | None = False,
        chat_templates: Mapping[str, str] | None = None,
        stop_tokens: Sequence[str] | None = None,
        hf_special_tokens: Mapping[str, str | None] | None = None,
        hf_config: Mapping[str, Any] | None = None,
        output_signal_tokens: Mapping[str, Sequence[str]] | None = None,
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
        named = [*self._tokens.items(), *(("signal", t) for t in self._signal_tokens)]
        named += [("unk", unk_token)] if unk_token is not None else []
        named += [("stop", t) for t in stop_tokens or ()]
        self._output_signals = {m: list(ts) for m, ts in (output_signal_tokens or {}).items()}
        named += [(f"{m} signal", t) for m, ts in self._output_signals.items() for t in ts]
        for role, token in named:
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
        self._unk_token = unk_token
        framing = self._post_processor_adds()
        self._add_bos_token = framing[0] if add_bos_token is None else bool(add_bos_token)
        self._add_eos_token = framing[1] if add_eos_token is None else bool(add_eos_token)
        if (self._add_bos_token, self._add_eos_token) != framing:
            # transformers (v5) frames texts as tokenizer.json's post-processor says, whatever
            # tokenizer_config.json's add_bos_token: make the post-processor say it too.
            self._tok.post_processor = self._framing_post_processor()
        self._chat_templates = dict(chat_templates or {})
        if self._chat_templates and DEFAULT_TEMPLATE_NAME not in self._chat_templates:
            raise ValueError(
                f"chat templates {sorted(self._chat_templates)} but none named "
                f"{DEFAULT_TEMPLATE_NAME!r}"
            )
        self._explicit_stop_tokens = list(dict.fromkeys(stop_tokens)) if stop_tokens else None
        self._derived_stop_tokens: list[str] | None = None  # from the template, on first use
        # The special tokens as the Hugging Face files declare them (None: declared absent,
        # like Qwen2's bos); the roles they leave undeclared are mmgpt's.
        self._hf_special = {
            r: v for r, v in (hf_special_tokens or {}).items() if r in SPECIAL_ROLES
        }
        self._hf_config = dict(hf_config or {})

    def _framing_post_processor(self) -> processors.TemplateProcessing:
        """A post-processor adding bos / eos as :attr:`add_bos_token` / :attr:`add_eos_token`
        say (the one transformers builds from them)."""
        bos, eos = self.bos_token, self.eos_token
        first = f"{bos}:0 " if self._add_bos_token else ""
        last = f" {eos}:0" if self._add_eos_token else ""
        single = f"{first}$A:0{last}"
        pair = (
            f"{single}{f' {bos}:1' if self._add_bos_token else ''} $B:1"
            f"{f' {eos}:1' if self._add_eos_token else ''}"
        )
        specials = {}
        if self._add_bos_token:
            specials[bos] = self.bos_id
        if self._add_eos_token:
            specials[eos] = self.eos_id
        return processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(specials.items())
        )

    def _post_processor_adds(self) -> tuple[bool, bool]:
        """Whether the tokenizer.json's post-processor frames a text with bos / eos."""
        if self._tok.post_processor is None:
            return False, False
        try:
            framed = self._tok.encode("", add_special_tokens=True).ids
        except Exception:  # a post-processor naming a token the vocabulary lacks
            return False, False
        adds_bos = bool(framed) and framed[0] == self.bos_id
        adds_eos = len(framed) > int(adds_bos) and framed[-1] == self.eos_id
        return adds_bos, adds_eos

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
        Hugging Face tokenizer gets bos/eos/pad/unk from its ``tokenizer_config.json`` (or
        ``special_tokens_map.json``), else from well-known token names (pad and bos fall back to
        eos, as GPT-2 does), and the missing mmgpt tokens appended; ``num_signal_tokens``
        (default 8) sets how many signal tokens. Either way the companion files give the chat
        template, ``add_bos_token`` and the stop ids (see :mod:`mmgpt_text.hf`).
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

        try:
            text = tok_path.read_text(encoding="utf-8")
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(
                f"{tok_path}: not a valid Hugging Face tokenizer JSON file ({exc})"
            ) from exc

        files = read_hf_files(tok_path.parent) if companions else HFTokenizerFiles()
        _add_declared_tokens(tok, files)
        if companions and meta_path.is_file():
            return cls._from_metadata(tok, meta_path, num_signal_tokens, files)
        k = DEFAULT_NUM_SIGNAL_TOKENS if num_signal_tokens is None else num_signal_tokens
        return cls._adopt(tok, _check_num_signal_tokens(k), files)

    @classmethod
    def _from_metadata(
        cls,
        tok: Tokenizer,
        meta_path: Path,
        num_signal_tokens: int | None,
        files: HFTokenizerFiles,
    ) -> TextTokenizer:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            roles = {key: meta[f"{key}_token"] for key in ("bos", "eos", "pad", "image")}
            signals = meta["signal_tokens"]
            stops = meta.get("stop_tokens")
            outputs = meta.get("output_signal_tokens") or {}
            if not isinstance(outputs, dict) or not all(
                isinstance(ts, list) and all(isinstance(t, str) for t in ts)
                for ts in outputs.values()
            ):
                raise TypeError("output_signal_tokens must map modalities to lists of strings")
            if not all(isinstance(v, str) for v in roles.values()) or not (
                isinstance(signals, list) and all(isinstance(s, str) for s in signals)
            ):
                raise TypeError("token fields must be strings, signal_tokens a list of strings")
            if stops is not None and not (
                isinstance(stops, list) and stops and all(isinstance(s, str) for s in stops)
            ):
                raise TypeError("stop_tokens must be a non-empty list of strings")
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
        if stops is None:
            stops = _generation_stop_tokens(tok, files)
        try:
            return cls(
                tok,
                **{f"{k}_token": v for k, v in roles.items()},
                signal_tokens=signals,
                unk_token=files.special_tokens.get("unk"),
                # mmgpt's own convention (a sequence starts with <bos>) unless the config says
                add_bos_token=True if files.add_bos_token is None else files.add_bos_token,
                add_eos_token=bool(files.add_eos_token),
                chat_templates=files.chat_templates,
                stop_tokens=stops,
                hf_special_tokens=files.special_tokens,
                hf_config=files.config,
                output_signal_tokens=outputs,
            )
        except ValueError as exc:
            raise ValueError(f"{meta_path}: {exc}") from exc

    @classmethod
    def _adopt(
        cls, tok: Tokenizer, num_signal_tokens: int, files: HFTokenizerFiles
    ) -> TextTokenizer:
        """Wrap a foreign tokenizer, appending the mmgpt special tokens it lacks."""
        declared = files.special_tokens

        def find(role: str, candidates: Sequence[str]) -> str | None:
            configured = declared.get(role)
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
        where = files.config_path or files.generation_config_path
        try:
            return cls(
                tok,
                bos_token=bos,
                eos_token=eos,
                pad_token=pad,
                image_token=image,
                signal_tokens=signals,
                unk_token=declared.get("unk"),
                add_bos_token=files.add_bos_token,  # None: as its post-processor does
                add_eos_token=files.add_eos_token,
                chat_templates=files.chat_templates,
                stop_tokens=_generation_stop_tokens(tok, files),
                hf_special_tokens=declared,
                hf_config=files.config,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from exc

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
    def output_signal_tokens(self) -> dict[str, list[str]]:
        """The signal tokens of the non-image output modalities, ``{modality: tokens}``."""
        return {m: list(ts) for m, ts in self._output_signals.items()}

    def output_signal_token_ids(self, modality: str) -> list[int]:
        """The signal token ids of an output modality (``"image"``: :attr:`signal_token_ids`);
        empty when it has none."""
        if modality == "image":
            return self.signal_token_ids
        return [self._ids[t] for t in self._output_signals.get(modality, [])]

    def add_output_signal_tokens(self, modality: str, prefix: str, count: int) -> list[int]:
        """Give output ``modality`` the signal tokens ``[{prefix}0]..[{prefix}{count-1}]``
        (new special tokens at the end of the vocabulary, which grows); return their ids.

        Idempotent for the same tokens. ``"image"`` keeps ``[IMG0]..``: ``count`` must be
        their number."""
        count = _check_num_signal_tokens(count)
        if modality == "image":
            if count != len(self._signal_tokens):
                raise ValueError(
                    f"the image decoder needs {count} signal tokens but the tokenizer has "
                    f"{len(self._signal_tokens)} ([IMG0]..); build it with num_signal_tokens="
                    f"{count}"
                )
            return self.signal_token_ids
        if count == 0:
            raise ValueError(f"output modality {modality!r} needs at least one signal token")
        if not isinstance(prefix, str) or not prefix.isalnum():
            raise ValueError(
                f"the {modality!r} signal prefix must be letters/digits (e.g. 'AUD'), got "
                f"{prefix!r}"
            )
        names = output_signal_token_names(prefix, count)
        existing = self._output_signals.get(modality)
        if existing is not None:
            if existing != names:
                raise ValueError(
                    f"the tokenizer already has signal tokens {existing[0]}.. for {modality!r}; "
                    f"they differ from {names[0]}..{names[-1]}"
                )
            return self.output_signal_token_ids(modality)
        taken = set(self._signal_tokens) | {t for ts in self._output_signals.values() for t in ts}
        clash = [t for t in names if t in taken or self._tok.token_to_id(t) is not None]
        if clash:
            raise ValueError(
                f"signal tokens of {modality!r} ({names[0]}..) clash with tokens the tokenizer "
                f"already has ({clash[0]}); give its decoder another signal_prefix"
            )
        self._tok.add_special_tokens([_special(t) for t in names])
        for t in names:
            self._ids[t] = self._tok.token_to_id(t)
        self._output_signals[modality] = names
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        return self.output_signal_token_ids(modality)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def unk_token(self) -> str | None:
        """The unknown token its files name, if any (byte-level BPE never needs one)."""
        return self._unk_token

    @property
    def unk_id(self) -> int | None:
        return None if self._unk_token is None else self._ids[self._unk_token]

    @property
    def add_bos_token(self) -> bool:
        """Whether a text encoded for the model starts with bos (Llama's do, Qwen2's don't;
        mmgpt's own tokenizers do): ``encode(text, add_bos=tok.add_bos_token)`` gives the ids
        of ``transformers``' ``tokenizer(text)``. Prompts rendered by a chat template carry
        their own bos."""
        return self._add_bos_token

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @property
    def special_tokens_map(self) -> dict[str, str | None]:
        """``{"bos_token": ..., "eos_token": ..., "unk_token": ..., "pad_token": ...}`` as the
        Hugging Face files declare them (``None`` where they declare none, like Qwen2's bos),
        else mmgpt's roles: the variables a chat template sees, and what is saved."""
        roles = {**self._tokens, "unk": self._unk_token}
        return {
            f"{role}_token": self._hf_special.get(role) if role in self._hf_special else roles[role]
            for role in SPECIAL_ROLES
        }

    # -- chat template ---------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template (the ``"default"`` one of named templates), or ``None``."""
        return self._chat_templates.get(DEFAULT_TEMPLATE_NAME)

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        if source is None:
            self._chat_templates = {}
        else:
            compile_chat_template(source)  # a syntax error is reported now, not at first use
            self._chat_templates = {**self._chat_templates, DEFAULT_TEMPLATE_NAME: source}
        self._derived_stop_tokens = None

    @property
    def chat_templates(self) -> dict[str, str]:
        """All named templates (``"default"`` among them when there are any)."""
        return dict(self._chat_templates)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """``messages`` (``[{"role": "user", "content": "..."}, ...]``) rendered by the chat
        template, special tokens written out (``transformers``' ``apply_chat_template`` with
        ``tokenize=False``); ``kwargs`` are further template variables."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (its tokenizer_config.json has no "
                "chat_template and there is no chat_template.jinja)"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens_map,
            **kwargs,
        )

    # -- stopping --------------------------------------------------------------------
    @property
    def stop_tokens(self) -> list[str]:
        """The tokens that end a reply; see :attr:`stop_ids`."""
        if self._explicit_stop_tokens is not None:
            return list(self._explicit_stop_tokens)
        if self._derived_stop_tokens is None:
            end = self._template_end_of_turn()
            self._derived_stop_tokens = list(dict.fromkeys([*filter(None, [end]), self.eos_token]))
        return list(self._derived_stop_tokens)

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a reply: ``generation_config.json``'s ``eos_token_id`` when the
        directory had one; else the chat template's end-of-turn token when it is a special
        token (``<|eot_id|>``, ``<|im_end|>``), then eos; else ``[eos_id]``."""
        return [self._tok.token_to_id(t) for t in self.stop_tokens]

    def _template_end_of_turn(self) -> str | None:
        """The special token a rendered assistant turn ends with, if there is one."""
        if self.chat_template is None:
            return None
        messages = [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": _REPLY_SENTINEL},
        ]
        try:
            text = self.render_chat(messages)
        except ChatTemplateError:  # e.g. a template that demands a system message
            return None
        at = text.find(_REPLY_SENTINEL)
        tail = text[at + len(_REPLY_SENTINEL) :].lstrip() if at >= 0 else ""
        if not tail:
            return None
        first = self._tok.encode(tail, add_special_tokens=False).ids[0]
        added = self._tok.get_added_tokens_decoder().get(first)
        return added.content if added is not None and added.special else None

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
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``mmgpt_tokenizer.json`` into
        ``directory`` (each atomically)."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory}: save() needs a directory, this is a file")
        meta: dict[str, Any] = {
            "format_version": METADATA_VERSION,
            "name": "bpe",
            **{f"{role}_token": token for role, token in self._tokens.items()},
            "signal_tokens": self._signal_tokens,
        }
        if self._output_signals:
            meta["output_signal_tokens"] = self._output_signals
        if self._explicit_stop_tokens is not None:  # a generation_config.json named them
            meta["stop_tokens"] = self._explicit_stop_tokens
        atomic_write_bytes(
            directory / TOKENIZER_FILE, self._tok.to_str(pretty=True).encode("utf-8")
        )
        atomic_write_bytes(
            directory / HF_CONFIG_FILE,
            (json.dumps(self.hf_config_dict(), indent=2, ensure_ascii=False) + "\n").encode(
                "utf-8"
            ),
        )
        atomic_write_bytes(
            directory / METADATA_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        )

    def hf_config_dict(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` :meth:`save` writes: the one it was loaded with (if
        any), with its special and added tokens, ``add_bos_token`` and chat template updated."""
        config = {k: v for k, v in self._hf_config.items() if k not in _DROPPED_CONFIG_KEYS}
        config.pop("chat_template", None)
        config.update(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "add_bos_token": self._add_bos_token,
                "add_eos_token": self._add_eos_token,
                **self.special_tokens_map,
                "added_tokens_decoder": {
                    str(i): added_token_entry(t)
                    for i, t in sorted(self._tok.get_added_tokens_decoder().items())
                },
            }
        )
        templates = config_templates_value(self._chat_templates)
        if templates is not None:
            config["chat_template"] = templates
        return config

    def config_dict(self) -> dict[str, Any]:
        """What a model's config.json records to rebuild this tokenizer with ``create``."""
        return {"name": "bpe", "num_signal_tokens": len(self._signal_tokens)}

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self._vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r}, "
            f"num_signal_tokens={len(self._signal_tokens)}, "
            f"chat_template={self.chat_template is not None})"
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


def _add_declared_tokens(tok: Tokenizer, files: HFTokenizerFiles) -> None:
    """Give ``tok`` the tokens the companion files declare, as ``transformers`` does.

    Each ``added_tokens_decoder`` entry must have its id (one that tokenizer.json lacks is
    added, and must land on that id); a named special token missing from the vocabulary is
    appended, in transformers' order (bos, eos, unk, pad).
    """
    where = f"{files.config_path}: added_tokens_decoder"
    missing = []
    for token_id, entry in sorted(files.added_tokens.items()):
        have = tok.token_to_id(entry["content"])
        if have is None:
            missing.append((token_id, entry))
        elif have != token_id:
            raise ValueError(
                f"{where}[{token_id}] is {entry['content']!r}, which tokenizer.json has as id "
                f"{have}"
            )
    for token_id, entry in missing:
        token = AddedToken(**entry)
        if entry.get("special", False):
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(entry["content"])
        if got != token_id:
            raise ValueError(
                f"{where}[{token_id}]: {entry['content']!r} is not in tokenizer.json and would "
                f"get id {got} when appended, not {token_id}"
            )
    absent = [
        token
        for role in SPECIAL_ROLES
        if (token := files.special_tokens.get(role)) and tok.token_to_id(token) is None
    ]
    if absent:
        tok.add_special_tokens([_special(t) for t in dict.fromkeys(absent)])


def _generation_stop_tokens(tok: Tokenizer, files: HFTokenizerFiles) -> list[str] | None:
    """``generation_config.json``'s ``eos_token_id`` as tokens, or None when it names none."""
    if files.eos_token_ids is None:
        return None
    tokens = [tok.id_to_token(i) for i in files.eos_token_ids]
    bad = [i for i, t in zip(files.eos_token_ids, tokens) if t is None]
    if bad:
        raise ValueError(
            f"{files.generation_config_path}: eos_token_id {bad} not in the tokenizer's vocabulary"
        )
    return tokens


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
