"""The chat app: in Chromium (upload, ask, streamed answer, an inline drawn image, undo,
retry, no request leaving localhost) and through its ``/chat`` API (streaming, drawn
images, friendly errors for bad input, 20 concurrent requests)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio")

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from demos.chat import ChatApp, to_messages, user_entry
from demos.common import Settings


@pytest.fixture(scope="module")
def chat(tiny):
    with tiny.launched(tiny.dir, "chat") as app:
        yield app


@pytest.fixture(scope="module")
def client(chat):
    return Client(chat.local_url, verbose=False)


@pytest.fixture(scope="module")
def circle_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("uploads") / "circle.png"
    tiny.circle_image(96).save(path)
    return path


def test_chat_in_the_browser(chat, browser, tiny, circle_file) -> None:
    from playwright.sync_api import expect

    with tiny.page_of(browser, chat.local_url) as page:
        box = page.locator("#message textarea")
        page.set_input_files("#message input[type=file]", str(circle_file))
        expect(page.locator("#message img")).to_have_count(1)  # the upload's thumbnail
        box.fill(tiny.image_question)
        box.press("Enter")
        bot = page.locator("#chatbot [data-testid=bot]")
        expect(bot.last).to_have_text(tiny.answer)
        expect(page.locator("#chatbot [data-testid=user] img")).to_have_count(1)

        expect(box).to_be_editable()  # unlocked once the answer is done
        box.fill(tiny.draw_prompt)
        box.press("Enter")
        expect(bot).to_have_count(2)
        expect(bot.last.locator("img")).to_have_count(1)  # drawn inline
        tiny.save_screenshot(page, "chat")

        page.click("#undo")  # the last exchange goes; its message returns to the box
        expect(bot).to_have_count(1)
        expect(box).to_have_value(tiny.draw_prompt)
        page.click("#retry")  # answer the image question again
        expect(bot).to_have_count(1)
        expect(bot.last).to_have_text(tiny.answer)
        page.click("#clear")  # also cancels a stream still running: nothing comes back
        expect(page.locator("#chatbot [data-testid=user]")).to_have_count(0)
        page.wait_for_timeout(1000)
        expect(page.locator("#chatbot [data-testid=user]")).to_have_count(0)
        expect(box).to_be_editable()
        assert page.external == []  # fonts, scripts, analytics: nothing from the network


def test_api_streams_the_reply_token_by_token(client, demo_model, circle_file, tiny) -> None:
    message = {"text": tiny.image_question, "files": [handle_file(str(circle_file))]}
    job = client.submit(message, [], 0.7, 0.9, 24, 3.0, 4, 5, "none", api_name="/chat")
    final = job.result()
    partials = [reply for reply, _ in job.outputs()]
    assert final[0] == tiny.answer and final[1] == []
    assert len(set(partials)) >= 4  # "", "a", "a red", … — streamed, not one block
    assert all(final[0].startswith(p) for p in partials)
    # the same as the model gives in-process for that seed and settings
    turns = [{"role": "user", "text": f"<image>\n{tiny.image_question}"}]
    image = Image.open(circle_file).convert("RGB")
    expected = demo_model.reply(turns, [image], Settings(0.7, 0.9, 24, 3.0, 4, 5), 5)
    assert final[0] == expected[0]


def test_api_returns_drawn_images(client, tiny) -> None:
    reply, images = client.predict(
        {"text": tiny.draw_prompt, "files": []}, api_name="/chat", steps=3, seed=1
    )
    assert reply == "" and len(images) == 1
    with Image.open(images[0]["image"]) as drawn:
        assert drawn.size == (16, 16)


def test_api_history_reaches_the_model(client, demo_model, tiny) -> None:
    history = [
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": tiny.answer},
    ]
    hot = {"temperature": 2.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 3}  # prompt-sensitive
    reply, _ = client.predict(
        {"text": tiny.text_question, "files": []}, history, api_name="/chat", **hot
    )
    settings = Settings(2.0, 1.0, 8)
    turns = [{"role": m["role"], "text": m["content"]} for m in history]
    question = [{"role": "user", "text": tiny.text_question}]
    with_history = demo_model.reply([*turns, *question], [], settings, 3)[0]
    without = demo_model.reply(question, [], settings, 3)[0]
    assert with_history != without
    assert reply == with_history
    assert [m.role for m in to_messages(history)] == ["user", "assistant"]
    with pytest.raises(AppError, match=r"history\[0\] has a file: through the API"):
        client.predict(
            {"text": "hi", "files": []},
            [{"role": "user", "content": [{"path": "/etc/hostname"}]}],
            api_name="/chat",
        )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "The message is empty: type a question or attach an image."),
        ("text file", "'notes.txt' is not an image. Upload a PNG, JPEG, WebP, GIF, BMP or TIFF"),
        ("huge", "'huge.png' is 8000×6000 pixels, above this demo's limit of 16 megapixels."),
        ("too long", "The message is too long for this model: it needs"),
        ("bad setting", "Value 9.0 is greater than maximum value 2.0."),
        ("adapter", "Value: nope is not in the list of choices: ['none', 'noisy']"),
    ],
)
def test_bad_input_gets_a_friendly_message(client, tmp_path, case, message) -> None:
    files, text, extra = [], "what is this?", {}
    if case == "empty":
        text = "  "
    elif case == "text file":
        (tmp_path / "notes.txt").write_text("not a picture")
        files = [handle_file(str(tmp_path / "notes.txt"))]
    elif case == "huge":
        Image.new("1", (8000, 6000)).save(tmp_path / "huge.png")  # 48 MP in a few KB
        files = [handle_file(str(tmp_path / "huge.png"))]
    elif case == "too long":
        text = "word " * 200
    elif case == "bad setting":
        extra = {"temperature": 9.0}
    else:
        extra = {"adapter": "nope"}
    with pytest.raises(AppError) as raised:
        client.predict({"text": text, "files": files}, api_name="/chat", **extra)
    assert str(raised.value).startswith(message)
    assert "Traceback" not in str(raised.value)


def test_twenty_concurrent_requests_all_complete(client, tiny) -> None:
    results: dict[int, tuple[str, list]] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            results[i] = client.predict(
                {"text": tiny.text_question, "files": []},
                api_name="/chat",
                temperature=0.0,
                max_new_tokens=16,
                seed=i,
            )
        except BaseException as exc:  # collected, so one failure does not hang the test
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and sorted(results) == list(range(20))
    assert all(reply == tiny.answer for reply, _ in results.values()), results


class _ScriptedModel:
    """Stands in for DemoModel: streams a fixed reply with an image in the middle."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream_reply(self, turns, images, settings, seed, adapter="none"):
        yield "here "
        yield "it is: "
        yield Image.new("RGB", (4, 4), (0, 255, 0))
        yield "done"


def test_respond_puts_text_and_images_in_order(demo_model, tiny, tmp_path) -> None:
    app = ChatApp(_ScriptedModel(demo_model), image_dir=tmp_path)
    history = [user_entry(tiny.draw_prompt, [])]
    steps = list(app.respond(history, 0.7, 0.9, 16, 3.0, 4, 0, "none"))
    content = steps[-1][-1]["content"]
    assert content[0] == "here it is: " and content[2] == "done"
    assert Path(content[1]["path"]).parent == tmp_path
    assert len(steps) == 4  # one update per event: the answer streams
    # the drawn image is an <image_out> turn when the conversation goes on
    assert to_messages(steps[-1])[-1].text == "here it is: <image_out>done"
