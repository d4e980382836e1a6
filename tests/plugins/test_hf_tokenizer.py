"""Hugging Face tokenizer directories (Llama-3 and Qwen2 style, built here from a few lines of
text): special tokens, add_bos_token, chat templates, stop ids, saving, and parity with
transformers' AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmgpt.hf_fixtures import (
    CHATML_TEMPLATE,
    CONVERSATION,
    LINES,
    LLAMA3_TEMPLATE,
    STRINGS,
    TOOL_TEMPLATE,
    build_hf_dir,
)
from mmgpt.registry import create
from mmgpt_text import TextTokenizer
from mmgpt_text.chat_template import ChatTemplateError, render_chat_template
from mmgpt_text.tokenizer import METADATA_FILE


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ids 300.. are the specials: 301 <|end_of_text|>, 304 <|eot_id|>
    return build_hf_dir(
        tmp_path_factory.mktemp("llama3"),
        "llama3",
        generation_config={"bos_token_id": 300, "eos_token_id": [301, 304]},
    )


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_dir(tmp_path_factory.mktemp("qwen2"), "qwen2")


def _ref(directory: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


# -- loading ------------------------------------------------------------------------------
def test_llama3_directory(llama3_dir: Path) -> None:
    tok = create("tokenizer", "bpe", path=llama3_dir)
    assert isinstance(tok, TextTokenizer)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
    )
    assert tok.pad_token == "<|eot_id|>"  # no pad declared: falls back to eos
    assert tok.add_bos_token  # its post-processor adds <|begin_of_text|>
    assert tok.chat_template == LLAMA3_TEMPLATE
    # generation_config.json's eos_token_id, in order
    assert tok.stop_tokens == ["<|end_of_text|>", "<|eot_id|>"]
    assert tok.stop_ids == [301, 304]
    # mmgpt's tokens are appended after the 305 tokens of the original vocabulary
    assert tok.image_token_id == 305
    assert tok.signal_token_ids == list(range(306, 314))
    assert tok.vocab_size == 314
    assert tok.encode("a<image>[IMG7]") == [*tok.encode("a"), 305, 313]


def test_qwen2_directory(qwen2_dir: Path) -> None:
    tok = TextTokenizer.from_file(qwen2_dir, num_signal_tokens=2)
    assert not tok.add_bos_token
    assert tok.special_tokens_map == {
        "bos_token": None,  # declared null: the template sees no bos
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "pad_token": "<|endoftext|>",
    }
    assert tok.bos_token == "<|endoftext|>"  # mmgpt's role still needs a token
    assert tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.chat_template == CHATML_TEMPLATE  # the "default" of the named templates
    assert tok.chat_templates == {"default": CHATML_TEMPLATE, "tool_use": TOOL_TEMPLATE}
    # no generation_config.json: the template's end-of-turn token (which is eos here)
    assert tok.stop_tokens == ["<|im_end|>"]
    assert tok.vocab_size == 303 + 3


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_encoding_matches_transformers(style: str, llama3_dir: Path, qwen2_dir: Path) -> None:
    directory = llama3_dir if style == "llama3" else qwen2_dir
    ref = _ref(directory)
    tok = TextTokenizer.from_file(directory)
    assert tok.add_bos_token == (style == "llama3")
    for s in STRINGS:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False), s
        assert tok.encode(s, add_bos=tok.add_bos_token) == ref.encode(s), s
        assert tok.decode(tok.encode(s)) == s
    for conversation, prompt in ((CONVERSATION, True), (CONVERSATION[:2], False)):
        expected = ref.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=prompt
        )
        assert tok.render_chat(conversation, add_generation_prompt=prompt) == expected


def test_render_chat_without_transformers(llama3_dir: Path, qwen2_dir: Path) -> None:
    llama = TextTokenizer.from_file(llama3_dir)
    assert llama.render_chat(CONVERSATION[:1], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "What colour is the circle?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    qwen = TextTokenizer.from_file(qwen2_dir)
    assert qwen.render_chat(CONVERSATION[:2]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
    )


# -- stop ids -----------------------------------------------------------------------------
def test_stop_ids_without_generation_config(tmp_path: Path) -> None:
    # a base model's eos, an instruct template: the template's <|eot_id|> ends a reply, then eos
    d = build_hf_dir(tmp_path / "a", "llama3", config={"eos_token": "<|end_of_text|>"})
    tok = TextTokenizer.from_file(d)
    assert tok.eos_token == "<|end_of_text|>"
    assert tok.stop_tokens == ["<|eot_id|>", "<|end_of_text|>"]
    # a template whose replies end in plain text: eos alone
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert tok.stop_ids == [tok.eos_id]
    tok.chat_template = None
    assert tok.stop_ids == [tok.eos_id] and tok.chat_template is None


# -- saving -------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_save_reload_and_transformers(
    style: str, llama3_dir: Path, qwen2_dir: Path, tmp_path: Path
) -> None:
    tok = TextTokenizer.from_file(llama3_dir if style == "llama3" else qwen2_dir)
    out = tmp_path / "saved"
    tok.save(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [METADATA_FILE, "tokenizer.json", "tokenizer_config.json"]
    again = TextTokenizer.from_file(out)
    texts = [*STRINGS, "<image> and [IMG0][IMG7] <|eot_id|>"]
    assert again.encode_batch(texts, add_bos=True) == tok.encode_batch(texts, add_bos=True)
    for attr in (
        "vocab_size",
        "bos_id",
        "eos_id",
        "pad_id",
        "image_token_id",
        "signal_token_ids",
        "add_bos_token",
        "chat_templates",
        "stop_ids",
        "special_tokens_map",
    ):
        assert getattr(again, attr) == getattr(tok, attr), attr

    ref = _ref(out)  # transformers reads the saved directory with the same ids and template
    assert len(ref) == tok.vocab_size
    for s in texts:
        assert ref.encode(s, add_special_tokens=False) == tok.encode(s), s
        assert ref.encode(s) == tok.encode(s, add_bos=tok.add_bos_token), s
    assert ref.chat_template in (tok.chat_template, tok.chat_templates)
    assert ref.apply_chat_template(CONVERSATION, tokenize=False) == tok.render_chat(CONVERSATION)
    assert ref.convert_tokens_to_ids("<image>") == tok.image_token_id


def test_saved_config_keeps_the_named_templates(qwen2_dir: Path, tmp_path: Path) -> None:
    TextTokenizer.from_file(qwen2_dir).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == [
        {"name": "default", "template": CHATML_TEMPLATE},
        {"name": "tool_use", "template": TOOL_TEMPLATE},
    ]
    assert config["bos_token"] is None and config["add_bos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["303"]["content"] == "<image>"


def test_trained_tokenizer_saves_a_transformers_config(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(LINES), encoding="utf-8")
    tok = TextTokenizer.train([tmp_path / "a.txt"], vocab_size=300, num_signal_tokens=2)
    assert tok.add_bos_token and tok.chat_template is None and tok.stop_ids == [tok.eos_id]
    tok.chat_template = CHATML_TEMPLATE.replace("<|im_start|>", "<bos>").replace(
        "<|im_end|>", "<eos>"
    )
    assert tok.stop_ids == [tok.eos_id]  # the template's end of turn is eos itself
    tok.save(tmp_path / "out")
    again = TextTokenizer.from_file(tmp_path / "out")
    assert again.chat_template == tok.chat_template and again.add_bos_token
    ref = _ref(tmp_path / "out")
    assert ref.encode("Hello <image>") == tok.encode("Hello <image>", add_bos=True)
    assert (ref.bos_token, ref.eos_token, ref.pad_token) == ("<bos>", "<eos>", "<pad>")


# -- the other companion files --------------------------------------------------------------
def test_chat_template_files_take_precedence(tmp_path: Path) -> None:
    d = build_hf_dir(tmp_path / "d", "qwen2")
    (d / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "rag.jinja").write_text("{{ 'rag' }}", encoding="utf-8")
    tok = TextTokenizer.from_file(d)
    assert tok.chat_template == LLAMA3_TEMPLATE
    assert set(tok.chat_templates) == {"default", "tool_use", "rag"}
    assert _ref(d).chat_template["default"] == LLAMA3_TEMPLATE  # transformers agrees


def test_special_tokens_map_and_declared_tokens(tmp_path: Path) -> None:
    d = build_hf_dir(tmp_path / "d", "llama3", config={"pad_token": "<pad>"})
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|begin_of_text|>"}, "unk_token": "<unk>"})
    )
    tok = TextTokenizer.from_file(d)
    assert tok.bos_token == "<|begin_of_text|>"
    # named tokens the vocabulary lacks are appended (bos, eos, unk, pad order), then mmgpt's
    assert (tok.unk_id, tok.pad_id, tok.image_token_id) == (305, 306, 307)
    assert tok.unk_token == "<unk>" and tok.pad_token == "<pad>"


def test_added_tokens_decoder(tmp_path: Path) -> None:
    d = build_hf_dir(tmp_path / "d", "qwen2")
    config = json.loads((d / "tokenizer_config.json").read_text())
    extra = {"content": "<tool>", "special": False, "normalized": False}
    config["added_tokens_decoder"]["303"] = extra  # not in tokenizer.json: added with its id
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TextTokenizer.from_file(d)
    assert tok.token_to_id("<tool>") == 303 and tok.image_token_id == 304
    assert tok.encode("a<tool>b") == [*tok.encode("a"), 303, *tok.encode("b")]
    ref = _ref(d)
    assert ref.encode("a<tool>b", add_special_tokens=False) == tok.encode("a<tool>b")

    config["added_tokens_decoder"]["310"] = config["added_tokens_decoder"].pop("303")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: added_tokens_decoder\[310\]"):
        TextTokenizer.from_file(d)
    config["added_tokens_decoder"].pop("310")
    config["added_tokens_decoder"]["5"] = {"content": "<|im_end|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"added_tokens_decoder\[5\] is '<\|im_end\|>'.*id 302"):
        TextTokenizer.from_file(d)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("tokenizer_config.json", {"eos_token": 3}, r"tokenizer_config\.json: eos_token must be"),
        ("tokenizer_config.json", {"eos_token": {"id": 3}}, r"eos_token is an object without"),
        ("tokenizer_config.json", {"add_bos_token": "yes"}, r"add_bos_token must be true or"),
        ("tokenizer_config.json", {"chat_template": 5}, r"chat_template must be a string or"),
        (
            "tokenizer_config.json",
            {"chat_template": [{"name": "rag", "template": "x"}]},
            r"tokenizer_config\.json: chat templates \['rag'\] but none named 'default'",
        ),
        ("tokenizer_config.json", {"added_tokens_decoder": {"x": {}}}, r"\['x'\]: the key"),
        ("tokenizer_config.json", [1, 2], r"tokenizer_config\.json: expected a JSON object"),
        ("generation_config.json", {"eos_token_id": "2"}, r"generation_config\.json: eos_token_"),
        ("generation_config.json", {"eos_token_id": [9999]}, r"eos_token_id \[9999\] not in"),
    ],
)
def test_bad_files_name_the_file_and_field(
    tmp_path: Path, file: str, content: Any, message: str
) -> None:
    d = build_hf_dir(tmp_path / "d", "qwen2")
    if file == "tokenizer_config.json" and isinstance(content, dict):
        content = {**json.loads((d / file).read_text()), **content}
    (d / file).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        TextTokenizer.from_file(d)


# -- the template environment ---------------------------------------------------------------
def test_templates_run_sandboxed_with_transformers_helpers() -> None:
    msgs = [{"role": "user", "content": "café"}]
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError, match="the chat template failed"):
        render_chat_template(escape, msgs)
    with pytest.raises(ChatTemplateError, match="failed"):  # arguments are immutable
        render_chat_template("{{ messages.append(1) }}", msgs)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", msgs)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", msgs)
    text = render_chat_template(
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}|"
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
        msgs,
        special_tokens={"bos_token": None, "eos_token": "</s>"},
    )
    assert text == '[{"role": "user", "content": "café"}]|4||café'


def test_setting_a_broken_template_fails_at_once(qwen2_dir: Path) -> None:
    tok = TextTokenizer.from_file(qwen2_dir)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.chat_template = "{% if %}"
    assert tok.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize(
    "template",
    [
        "{{ ('a' * 50000000)|length }}",  # a huge string
        "{% set x = 99999999 %}{{ 9 ** x }}",  # a huge number
        "{% for i in range(100000) %}{{ 'x' * 50 }}{% endfor %}",  # a huge rendering
        "{% set a = 'y' * 900000 %}{{ (a + a)|length }}",  # concatenation past the cap
    ],
)
def test_a_hostile_chat_template_is_refused_before_it_allocates(template: str) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ChatTemplateError, match="over|above|more than"):
        render_chat_template(template, CONVERSATION)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 40
