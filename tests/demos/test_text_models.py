"""Text-only language models in the demos: an mmgpt GPT directory (mmgpt's chat template, a
LoRA adapter) and a Hugging Face Llama directory whose tokenizer has a ChatML template. Both
models are overfitted here (a few seconds) to answer one question in the format of their own
template, so that a right answer shows the prompt was rendered as the model learned it. In
Chromium: no upload button and no drawing options, the streamed answer equals
``stream_text``'s greedy continuation of the prompt; the ``/chat`` API (history, adapters,
images refused); the preferences app on a text model; text_to_image refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gradio")

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from demos.common import DemoModel, Settings, UserInputError, user_message
from mmgpt import cli
from mmgpt.data.preference import PreferenceDataset
from mmgpt.generation import GenerationConfig, stream_text
from mmgpt.pretrained import load_model, load_tokenizer

QUESTION = "what colour is the circle?"
ANSWER = "a red circle"
OTHER_QUESTION = "and the square?"
OTHER_ANSWER = "the square is blue"
ADAPTER = "noisy"
MAX_NEW = 16


# --------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------


def _overfit(forward: Any, parameters: Any, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Train on one batch until it is learnt by heart; ``forward(ids)`` gives logits."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for _ in range(150):
        logits = forward(ids)  # (B, T, V)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mmgpt GPT with a trained byte-level BPE tokenizer (no chat template: mmgpt's own),
    taught two exchanges the way mmgpt's SFT does, and a random LoRA adapter beside it."""
    pytest.importorskip("peft")
    from mmgpt.adapters import AdapterConfig, add_adapter, save_adapter
    from mmgpt.data.sample import Sample, Turn
    from mmgpt.model import GPT
    from mmgpt.processor import MultimodalProcessor
    from mmgpt_text import TextTokenizer, example_corpus_files

    torch.manual_seed(0)
    tok = TextTokenizer.train(example_corpus_files(), vocab_size=320)
    assert tok.chat_template is None
    gpt = GPT.from_preset("gpt-nano", vocab_size=tok.vocab_size, block_size=96)
    batch = MultimodalProcessor(tok)(
        [
            Sample([Turn("user", QUESTION), Turn("assistant", ANSWER)]),
            Sample([Turn("user", OTHER_QUESTION), Turn("assistant", OTHER_ANSWER)]),
        ]
    )
    gpt.train()
    loss = _overfit(lambda ids: gpt(ids).logits, gpt.parameters(), batch.input_ids, batch.labels)
    assert loss < 0.05, loss
    directory = tmp_path_factory.mktemp("text-gpt") / "tiny-gpt"
    gpt.eval().save_pretrained(directory, tokenizer=tok)
    add_adapter(gpt, AdapterConfig(r=4, targets=["decoder"]), ADAPTER)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # LoRA starts as a no-op; make this one change answers
    save_adapter(gpt, directory / "adapters" / ADAPTER, ADAPTER)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face Llama saved by transformers, with a Qwen2-style tokenizer directory whose
    tokenizer_config.json holds a ChatML template (``<|im_end|>`` ends a turn), taught to
    answer QUESTION as rendered by that template."""
    transformers = pytest.importorskip("transformers")
    from mmgpt.hf_fixtures import build_hf_dir

    directory = build_hf_dir(tmp_path_factory.mktemp("text-llama") / "tiny-llama", "qwen2")
    tok = load_tokenizer(directory, {})  # no config.json yet: the tokenizer files alone
    assert tok.chat_template is not None and tok.stop_tokens == ["<|im_end|>"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=None,
            eos_token_id=tok.eos_id,  # <|im_end|>, as a chat model's generation_config says
            pad_token_id=tok.pad_id,
            tie_word_embeddings=False,
        )
    )
    prompt = tok.encode(_render(tok, [{"role": "user", "content": QUESTION}]))
    reply = [*tok.encode(ANSWER), tok.eos_id]
    ids = torch.tensor([prompt + reply])
    labels = torch.tensor([[-100] * len(prompt) + reply])
    model.train()
    loss = _overfit(lambda x: model(input_ids=x).logits, model.parameters(), ids, labels)
    assert loss < 0.05, loss
    model.eval().save_pretrained(directory)
    return directory


def _render(tok: Any, messages: list[dict[str, str]]) -> str:
    return tok.render_chat(messages, add_generation_prompt=True)


def _prompt_ids(kind: str, tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """The generation prompt each kind of model was trained with, built here by hand."""
    if kind == "llama":  # the tokenizer's ChatML template
        return tok.encode(_render(tok, messages))
    ids = [tok.bos_id]  # mmgpt's template: <bos>User: …\nAssistant: … <eos>\n … Assistant:
    for m in messages:
        if m["role"] == "user":
            ids += tok.encode(f"User: {m['content']}\n")
        else:
            ids += [*tok.encode("Assistant:"), *tok.encode(f" {m['content']}"), tok.eos_id]
            ids += tok.encode("\n")
    return ids + tok.encode("Assistant:")


def _greedy(directory: Path, prompt: list[int], adapter: str | None = None) -> str:
    """What ``stream_text`` generates greedily for ``prompt`` (leading space dropped)."""
    model = load_model(directory, adapter=adapter)
    config = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0, seed=0)
    return "".join(stream_text(model, load_tokenizer(directory), prompt, config)).strip()


@pytest.fixture(scope="module", params=["gpt", "llama"])
def text_model(request: pytest.FixtureRequest) -> SimpleNamespace:
    directory = request.getfixturevalue(f"{request.param}_dir")
    return SimpleNamespace(
        kind=request.param, dir=directory, tok=load_tokenizer(directory), name=directory.name
    )


@pytest.fixture(scope="module")
def served(text_model: SimpleNamespace, demo_helpers: SimpleNamespace) -> Any:
    with demo_helpers.launched(text_model.dir, "chat") as app:
        yield app


# --------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------


def test_a_text_model_is_served_with_its_template_and_adapters(text_model) -> None:
    model = DemoModel.load(text_model.dir)
    assert model.is_text_model and not model.can_see and not model.can_draw
    assert model.uses_own_chat_template == (text_model.kind == "llama")
    assert model.adapter_choices() == (["none", ADAPTER] if text_model.kind == "gpt" else ["none"])
    messages = [{"role": "user", "content": QUESTION}]
    turns, images = model.fit([user_message(QUESTION)], MAX_NEW)
    assert images == [] and model.prompt_ids(turns) == _prompt_ids(
        text_model.kind, text_model.tok, messages
    )
    # the answer the model was taught, in the format it was taught: the template is right
    expected = _greedy(text_model.dir, _prompt_ids(text_model.kind, text_model.tok, messages))
    assert expected == ANSWER
    greedy = Settings(temperature=0.0, max_new_tokens=MAX_NEW)
    assert model.reply(turns, [], greedy, 0) == (ANSWER, [])
    with pytest.raises(UserInputError, match="cannot see images \\(it is a text model\\)"):
        model.fit([user_message(QUESTION, ["circle.png"])], MAX_NEW)
    with pytest.raises(UserInputError, match="cannot draw \\(it is a text model\\)"):
        model.draw("draw a red circle", greedy, 0)


# --------------------------------------------------------------------------------------
# The chat app
# --------------------------------------------------------------------------------------


def _set(page: Any, label: str, value: str) -> None:
    field = page.get_by_label(label)
    field.fill(value)
    field.press("Tab")


def test_chat_in_the_browser(served, text_model, browser, demo_helpers) -> None:
    from playwright.sync_api import expect

    expected = _greedy(
        text_model.dir,
        _prompt_ids(text_model.kind, text_model.tok, [{"role": "user", "content": QUESTION}]),
    )
    with demo_helpers.page_of(browser, served.local_url) as page:
        expect(page).to_have_title("mmgpt chat (text model)")
        expect(page.locator("body")).to_contain_text("a text model: text in, text out")
        expect(page.locator("body")).to_contain_text(text_model.name)
        # nothing to attach, nothing to draw
        expect(page.locator("#message textarea")).to_be_visible()
        expect(page.locator("#message input[type=file]")).to_have_count(0)
        expect(page.locator("#message button.upload-button")).to_have_count(0)
        expect(page.get_by_label("Guidance")).to_have_count(0)
        expect(page.get_by_label("number input for Diffusion steps")).to_have_count(0)
        adapter = page.get_by_label("Adapter")
        expect(adapter).to_have_count(1 if text_model.kind == "gpt" else 0)

        _set(page, "number input for Temperature", "0")
        _set(page, "number input for Max new tokens", str(MAX_NEW))
        box = page.locator("#message textarea")
        box.fill(QUESTION)
        box.press("Enter")
        bot = page.locator("#chatbot [data-testid=bot]")
        expect(bot.last).to_have_text(expected)
        expect(box).to_be_editable()
        page.click("#undo")  # the exchange goes; its message returns to the box
        expect(bot).to_have_count(0)
        expect(box).to_have_value(QUESTION)
        box.press("Enter")  # asked again ...
        expect(bot.last).to_have_text(expected)
        expect(box).to_be_editable()
        page.click("#retry")  # ... and retried: greedy, the same answer once more
        expect(bot).to_have_count(1)
        expect(bot.last).to_have_text(expected)
        demo_helpers.save_screenshot(page, f"chat-text-{text_model.kind}")
        assert page.external == []


def test_api_streams_the_greedy_reply_and_uses_history(served, text_model) -> None:
    client = Client(served.local_url, verbose=False)
    question = {"text": QUESTION, "files": []}
    job = client.submit(question, [], 0.0, 0.9, MAX_NEW, 3.0, 4, 0, "none", api_name="/chat")
    reply, images = job.result()
    partials = [r for r, _ in job.outputs()]
    messages = [{"role": "user", "content": QUESTION}]
    assert reply == _greedy(text_model.dir, _prompt_ids(text_model.kind, text_model.tok, messages))
    assert images == []
    assert len(set(partials)) >= 3 and all(reply.startswith(p) for p in partials)  # streamed

    # earlier turns are rendered with the model's template too
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    hot = {"temperature": 2.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 3}
    with_history, _ = client.predict(
        {"text": OTHER_QUESTION, "files": []}, history, api_name="/chat", **hot
    )
    model = load_model(text_model.dir, adapter=None)
    prompt = _prompt_ids(
        text_model.kind, text_model.tok, [*history, {"role": "user", "content": OTHER_QUESTION}]
    )
    config = GenerationConfig(max_new_tokens=8, temperature=2.0, top_p=1.0, seed=3)
    assert with_history == "".join(stream_text(model, text_model.tok, prompt, config)).strip()


def test_api_refuses_images_and_picks_adapters(served, text_model, tmp_path) -> None:
    client = Client(served.local_url, verbose=False)
    image = tmp_path / "circle.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(image)
    with pytest.raises(AppError, match=r"cannot see images \(it is a text model\); send text"):
        client.predict({"text": QUESTION, "files": [handle_file(str(image))]}, api_name="/chat")
    if text_model.kind != "gpt":
        return
    reply, _ = client.predict(
        {"text": QUESTION, "files": []},
        temperature=0.0,
        max_new_tokens=MAX_NEW,
        adapter=ADAPTER,
        api_name="/chat",
    )
    messages = [{"role": "user", "content": QUESTION}]
    prompt = _prompt_ids(text_model.kind, text_model.tok, messages)
    assert reply == _greedy(text_model.dir, prompt, adapter=ADAPTER) != ANSWER


# --------------------------------------------------------------------------------------
# The other apps
# --------------------------------------------------------------------------------------


def test_preferences_app_takes_text_prompts(gpt_dir, demo_helpers, tmp_path) -> None:
    data = tmp_path / "prefs"
    with demo_helpers.launched(gpt_dir, "preferences", data_dir=data) as app:
        client = Client(app.local_url, verbose=False)
        hot = {"temperature": 2.0, "top_p": 1.0, "max_new_tokens": 8}
        a, b, pair_id, _ = client.predict(
            {"text": QUESTION, "files": []}, seed=1, api_name="/sample_pair", **hot
        )
        assert a != b
        client.predict(pair_id, "A", api_name="/judge")
        image = tmp_path / "circle.png"
        demo_helpers.circle_image(16).save(image)
        with pytest.raises(AppError, match=r"cannot see images \(it is a text model\)"):
            message = {"text": QUESTION, "files": [handle_file(str(image))]}
            client.predict(message, api_name="/sample_pair", **hot)
    [pair] = PreferenceDataset(data / "preferences.jsonl", strict=True)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.images) == (QUESTION, a, b, [])
    line = json.loads((data / "preferences.jsonl").read_text())
    assert line["model"] == gpt_dir.name and line.get("image") is None


def test_text_to_image_refuses_a_text_model(gpt_dir, llama_dir, capsys) -> None:
    from demos import text_to_image
    from mmgpt.demo import build_demo

    for directory in (gpt_dir, llama_dir):
        with pytest.raises(ValueError) as raised:
            build_demo(directory, "text_to_image")
        assert str(raised.value).startswith(
            f"{directory}: the text_to_image app needs a model that draws; this one is a text model"
        )
    # the app itself refuses a loaded model that cannot draw, naming its directory
    with pytest.raises(ValueError) as raised:
        text_to_image.build_app(DemoModel.load(gpt_dir))
    assert str(raised.value).startswith(f"{gpt_dir}: the text_to_image app needs a model that")
    assert cli.main(["demo", "--app", "text_to_image", "--model", str(gpt_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmgpt: error: ") and f"{gpt_dir}: the text_to_image app" in err
    assert err.count("\n") == 1  # one line, no traceback
