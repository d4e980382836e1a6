"""MultimodalProcessor with a tokenizer's own Jinja chat template (Llama-3 and ChatML style):
rendering, labels on exactly the assistant replies, image slots, generation prompts, stop ids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgpt.config import gpt_config
from mmgpt.data.sample import Sample, Turn
from mmgpt.generation import GenerationConfig, generate_text, tokenizer_stop_ids
from mmgpt.model import GPT
from mmgpt.processor import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    MultimodalProcessor,
    TokenizerChatTemplate,
)

mmgpt_text = pytest.importorskip("mmgpt_text")
pytest.importorskip("jinja2")
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from tokenizers import trainers as tk_trainers  # noqa: E402

K = 3  # slots per image
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STYLES = {
    "llama3": {
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "config": {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "chat_template": LLAMA3_TEMPLATE,
        },
        "end": "<|eot_id|>",
    },
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "config": {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE},
        "end": "<|im_end|>",
    },
}
LINES = [
    "What colour is the circle? The circle is red.",
    "And the square? Blue. Describe the image.",
    "A small green triangle on the left.",
] * 4


def build_tokenizer(directory: Path, style: str, generation_config: dict | None = None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tk_trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(LINES, trainer)
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in STYLES[style]["specials"]]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(STYLES[style]["config"]))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return mmgpt_text.TextTokenizer.from_file(directory, num_signal_tokens=2)


@pytest.fixture(scope="module", params=sorted(STYLES))
def style_tok(request, tmp_path_factory):
    return request.param, build_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def colour(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.full((3, 2, 2), float(im.getpixel((0, 0))[0])) for im in images])


def img(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, value, value))


def processor(tok, **kwargs) -> MultimodalProcessor:
    return MultimodalProcessor(tok, num_image_tokens=K, image_transform=colour, **kwargs)


def expanded(tok, text: str) -> list[int]:
    """The ids of ``text`` encoded in one go, each image token widened to K slots."""
    out: list[int] = []
    for i in tok.encode(text):
        out += [i] * K if i == tok.image_token_id else [i]
    return out


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for pos, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = pos
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, pos))
            start = None
    return runs


CONVERSATION = [
    Turn("user", "<image>\nWhat colour is the circle?"),
    Turn("assistant", "The circle is red."),
    Turn("user", "And the square?"),
    Turn("assistant", "Blue. "),  # Llama-3's template trims it
]


def test_labels_cover_exactly_the_replies_and_their_end_token(style_tok) -> None:
    style, tok = style_tok
    proc = processor(tok)
    assert isinstance(proc.template, TokenizerChatTemplate)
    batch = proc(Sample(list(CONVERSATION), images=[img(7)]))
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()

    messages = [{"role": t.role, "content": t.text} for t in CONVERSATION]
    text = tok.render_chat(messages)
    assert ids == expanded(tok, text)  # the same ids as tokenizing the rendering whole
    if style == "llama3":
        assert ids[0] == tok.bos_id  # the template writes bos; the processor adds none
    else:
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")

    end = STYLES[style]["end"]
    runs = labelled_runs(labels)
    assert [tok.decode(labels[a:b]) for a, b in runs] == [
        f"The circle is red.{end}",
        f"Blue.{end}" if style == "llama3" else f"Blue. {end}",
    ]
    for a, b in runs:
        assert labels[a:b] == ids[a:b]
        assert ids[b - 1] == tok.token_to_id(end)  # the end-of-turn token itself is learned
    # everything before a reply is the template's own text and the user's
    header = tok.decode(ids[: runs[0][0]])
    assert header.endswith("assistant<|end_header_id|>\n\n" if style == "llama3" else "assistant\n")
    # the image's K slots sit inside the first user turn, unlabelled, filled in order
    ((row, first),) = batch.image_positions.tolist()
    assert row == 0 and ids[first : first + K] == [tok.image_token_id] * K
    assert first < runs[0][0] and labels[first : first + K] == [IGNORE_INDEX] * K
    assert tok.image_token_id not in ids[first + K :]
    assert batch.images[:, 0, 0, 0].tolist() == [7.0]


def test_generation_prompt_is_the_training_prefix(style_tok) -> None:
    _, tok = style_tok
    proc = processor(tok)
    enc = proc.encode_prompt(CONVERSATION[:3], [img(1)])
    messages = [{"role": t.role, "content": t.text} for t in CONVERSATION[:3]]
    prompt_text = tok.render_chat(messages, add_generation_prompt=True)
    assert proc.build_prompt(CONVERSATION[:3]) == prompt_text
    assert enc.input_ids == expanded(tok, prompt_text)
    assert enc.labels == [IGNORE_INDEX] * len(enc.input_ids)
    assert enc.image_spans == [(enc.input_ids.index(tok.image_token_id), K)]
    # training sees exactly these ids before the second reply, which it learns from there on
    trained = proc.encode_sample(Sample(list(CONVERSATION), images=[img(1)]))
    second = labelled_runs(trained.labels)[1][0]
    assert trained.input_ids[:second] == enc.input_ids
    batch = proc.prompt_batch([CONVERSATION[:1], CONVERSATION[:3]], [[img(1)], [img(2)]])
    assert batch.labels is None and batch.attention_mask[1].all()
    with pytest.raises(ValueError, match="must end with a user turn"):
        proc.encode_prompt(CONVERSATION[:2], [img(1)])


def test_system_turns_and_message_dicts(style_tok) -> None:
    _, tok = style_tok
    proc = processor(tok)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Describe the image. <image>"},
        {"role": "assistant", "content": "A small green triangle."},
    ]
    sample = Sample([Turn("user", "x")], images=[img(3)])
    sample.conversation = conversation  # dict messages, as Hugging Face writes them
    enc = proc.encode_sample(sample)
    ((a, b),) = labelled_runs(enc.labels)
    assert "Answer briefly." in tok.decode(enc.input_ids[:a])
    assert tok.decode(enc.labels[a:b]).startswith("A small green triangle.")
    with pytest.raises(ValueError, match="role 'user' or 'assistant'"):
        processor(tok, template=DEFAULT_TEMPLATE).encode_sample(sample)


def test_without_a_chat_template_nothing_changes(style_tok, tmp_path: Path) -> None:
    style, tok = style_tok
    explicit = processor(tok, template=DEFAULT_TEMPLATE)
    sample = Sample(list(CONVERSATION[:2]), images=[img(5)])
    ids = explicit(sample).input_ids[0].tolist()
    assert ids[:1] == [tok.bos_id] and tok.decode(ids[1:]).startswith("User: ")
    plain = build_tokenizer(tmp_path / "plain", style)
    plain.chat_template = None
    assert processor(plain).template is DEFAULT_TEMPLATE
    assert processor(plain)(sample).input_ids[0].tolist() == ids


def test_signal_tokens_in_replies_are_learned(style_tok) -> None:
    _, tok = style_tok
    enc = processor(tok).encode_sample(
        Sample([Turn("user", "Draw a circle."), Turn("assistant", "Here: <image_out>")])
    )
    ((a, b),) = labelled_runs(enc.labels)
    assert enc.labels[a:b][-3:-1] == tok.signal_token_ids
    assert enc.signal_spans == [(b - 3, 2)]


def test_a_template_that_rewrites_earlier_turns_is_an_error(style_tok) -> None:
    tok = copy.deepcopy(style_tok[1])  # the shared tokenizer keeps its template
    tok.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    sample = Sample(list(CONVERSATION[:2]), images=[img(1)], meta={"source": "d.json", "line": 4})
    with pytest.raises(ValueError, match=r"sample d\.json:4: the chat template does not render"):
        processor(tok)(sample)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ValueError, match=r"d\.json:4: the chat template failed: Conversation"):
        processor(tok)(sample)


def test_generation_stops_at_the_end_of_turn_ids(tmp_path: Path) -> None:
    # eos is <|eot_id|>; generation_config.json adds <|end_of_text|>, which is no eos
    probe = build_tokenizer(tmp_path / "probe", "llama3")
    eot, eot_text = probe.token_to_id("<|eot_id|>"), probe.token_to_id("<|end_of_text|>")
    tok = build_tokenizer(
        tmp_path / "tok", "llama3", generation_config={"eos_token_id": [eot_text, eot]}
    )
    assert tok.stop_ids == [eot_text, eot] and tok.eos_id == eot
    assert tokenizer_stop_ids(tok) == (eot_text, eot)
    torch.manual_seed(0)
    gpt = GPT(gpt_config("gpt-nano", vocab_size=tok.vocab_size, block_size=32)).eval()
    word = tok.encode("red")
    forced = [*word, eot_text, *tok.encode(" blue")]

    def hook(state):
        return {0: forced[state.step]} if state.step < len(forced) else None

    config = GenerationConfig(max_new_tokens=len(forced), temperature=0)
    prompt = tok.encode("<|begin_of_text|>Hi")
    assert generate_text(gpt, tok, prompt, config, token_hook=hook) == "red"
    kept = generate_text(gpt, tok, prompt, config, token_hook=hook, stop_at_eos=False)
    assert kept.startswith("red") and kept.endswith(" blue")
