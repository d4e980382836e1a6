"""The companion files of a Hugging Face ``tokenizer.json``, read without ``transformers``.

A pretrained model's directory describes its tokenizer in several files besides
``tokenizer.json``:

* ``tokenizer_config.json``: the special tokens (``bos_token``, ``eos_token``, ``pad_token``,
  ``unk_token``; each a string, ``null``, or an object with ``"content"``), ``add_bos_token`` /
  ``add_eos_token``, ``added_tokens_decoder`` (``{id: {"content": ..., "special": ...}}``) and
  ``chat_template`` (a string, or a list of ``{"name", "template"}`` of which ``"default"`` is
  the chat template);
* ``special_tokens_map.json`` (older directories): special tokens the config does not name;
* ``chat_template.jinja`` and ``additional_chat_templates/NAME.jinja`` (newer directories): the
  default template and named ones, taking precedence over the config's;
* ``generation_config.json`` (the model's): ``eos_token_id``, an id or a list of ids, the tokens
  that end a reply (chat models stop at their end-of-turn token, e.g. ``<|eot_id|>``).

Every malformed field is an error naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
DEFAULT_TEMPLATE_NAME = "default"
# The roles transformers knows by name, in the order it adds missing ones to the vocabulary.
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")
_ADDED_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word", "normalized", "special")


@dataclass
class HFTokenizerFiles:
    """What the companion files say; empty when there are none."""

    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json as read
    # role → token for the roles the files declare; None where declared as null
    special_tokens: dict[str, str | None] = field(default_factory=dict)
    added_tokens: dict[int, dict[str, Any]] = field(default_factory=dict)  # id → AddedToken kwargs
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # name → Jinja source
    eos_token_ids: list[int] | None = None  # from generation_config.json
    config_path: Path | None = None
    generation_config_path: Path | None = None


def read_hf_files(directory: Path) -> HFTokenizerFiles:
    """Read the companion files of ``directory/tokenizer.json`` (each is optional)."""
    out = HFTokenizerFiles()
    config_path = directory / TOKENIZER_CONFIG_FILE
    if config_path.is_file():
        out.config_path = config_path
        out.config = _read_object(config_path)
        cfg = out.config
        for role in SPECIAL_ROLES:
            key = f"{role}_token"
            if key in cfg:
                out.special_tokens[role] = _token_content(cfg[key], config_path, key)
        for key in ("add_bos_token", "add_eos_token"):
            value = cfg.get(key)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{config_path}: {key} must be true or false, got {value!r}")
            setattr(out, key, value)
        out.added_tokens = _added_tokens(cfg.get("added_tokens_decoder"), config_path)
        out.chat_templates = _config_templates(cfg.get("chat_template"), config_path)

    map_path = directory / SPECIAL_TOKENS_MAP_FILE
    if map_path.is_file():
        mapping = _read_object(map_path)
        for role in SPECIAL_ROLES:
            key = f"{role}_token"
            if key in mapping and role not in out.special_tokens:
                out.special_tokens[role] = _token_content(mapping[key], map_path, key)

    jinja_path = directory / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        out.chat_templates[DEFAULT_TEMPLATE_NAME] = _read_text(jinja_path)
    template_dir = directory / CHAT_TEMPLATE_DIR
    if template_dir.is_dir():
        for path in sorted(template_dir.glob("*.jinja")):
            out.chat_templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if out.chat_templates and DEFAULT_TEMPLATE_NAME not in out.chat_templates:
        where = config_path if config_path.is_file() else template_dir
        raise ValueError(
            f"{where}: chat templates {sorted(out.chat_templates)} but none named "
            f"{DEFAULT_TEMPLATE_NAME!r}, so there is no chat template to use"
        )

    gen_path = directory / GENERATION_CONFIG_FILE
    if gen_path.is_file():
        out.generation_config_path = gen_path
        value = _read_object(gen_path).get("eos_token_id")
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise ValueError(
                    f"{gen_path}: eos_token_id must be a token id or a non-empty list of ids, "
                    f"got {value!r}"
                )
            out.eos_token_ids = list(dict.fromkeys(ids))
    return out


def config_templates_value(templates: dict[str, str]) -> str | list[dict[str, str]] | None:
    """The ``chat_template`` field of a tokenizer_config.json holding ``templates``."""
    if not templates:
        return None
    if set(templates) == {DEFAULT_TEMPLATE_NAME}:
        return templates[DEFAULT_TEMPLATE_NAME]
    return [{"name": name, "template": source} for name, source in templates.items()]


def added_token_entry(token: Any) -> dict[str, Any]:
    """A ``tokenizers.AddedToken`` as an ``added_tokens_decoder`` entry."""
    return {
        "content": token.content,
        **{flag: bool(getattr(token, flag)) for flag in _ADDED_TOKEN_FLAGS},
    }


# -- internals ---------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc})") from exc


def _read_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, path: Path, key: str) -> str | None:
    """A special token field: a string, null, or a serialized AddedToken ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
        if not isinstance(value, str):
            raise ValueError(f"{path}: {key} is an object without a 'content' string")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(
            f"{path}: {key} must be a string, null or an object with 'content', got {value!r}"
        )
    return value or None


def _added_tokens(value: Any, path: Path) -> dict[int, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: added_tokens_decoder must be an object {{id: token}}")
    out: dict[int, dict[str, Any]] = {}
    for key, entry in value.items():
        where = f"{path}: added_tokens_decoder[{key!r}]"
        try:
            token_id = int(key)
        except ValueError:
            raise ValueError(f"{where}: the key must be a token id") from None
        if token_id < 0:
            raise ValueError(f"{where}: the key must be a token id >= 0")
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{where}: expected an object with a 'content' string")
        flags = {f: entry[f] for f in _ADDED_TOKEN_FLAGS if f in entry}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise ValueError(f"{where}: the flags {sorted(flags)} must be true or false")
        out[token_id] = {"content": entry["content"], **flags}
    return out


def _config_templates(value: Any, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE_NAME: value}
    if isinstance(value, list):
        out: dict[str, str] = {}
        for i, entry in enumerate(value):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ValueError(
                    f"{path}: chat_template[{i}] must be an object with 'name' and 'template' "
                    "strings"
                )
            if entry["name"] in out:
                raise ValueError(f"{path}: chat_template names {entry['name']!r} twice")
            out[entry["name"]] = entry["template"]
        return out
    raise ValueError(
        f"{path}: chat_template must be a string or a list of {{name, template}} objects, "
        f"got {type(value).__name__}"
    )


__all__ = [
    "CHAT_TEMPLATE_FILE",
    "GENERATION_CONFIG_FILE",
    "SPECIAL_TOKENS_MAP_FILE",
    "TOKENIZER_CONFIG_FILE",
    "HFTokenizerFiles",
    "added_token_entry",
    "config_templates_value",
    "read_hf_files",
]
