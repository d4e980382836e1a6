"""Multimodal chat: attach images (drag and drop, paste, upload) or files of any other modality
the model reads (a plugin's ``.wav`` audio…), ask; the answer streams in, and images the model
draws appear inline. A text-only model (an mmgpt GPT, or a Hugging Face
gpt2 / llama / qwen2 / mistral directory) gets the same chat without image upload or drawing
options; its prompts use the tokenizer's chat template when it has one.

The conversation lives in the ``Chatbot`` (messages format) and is re-read at each turn, so
retry, undo and clear are edits of that list; stop cancels the answer being streamed. API (``gradio_client``)::

    client.submit({"text": "what colour is the square?", "files": [handle_file("a.png")]},
                  api_name="/chat")            # streams (reply text, drawn images)

with optional ``history`` (text messages ``[{"role": "user", "content": "…"}, …]``),
``temperature``, ``top_p``,
``max_new_tokens``, ``guidance``, ``steps``, ``seed`` (-1 = random) and ``adapter``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from demos import attention_view, ui
from demos.common import (
    DemoModel,
    ImageFolder,
    Message,
    Settings,
    UserInputError,
    user_message,
)
from demos.examples import chat_examples
from mmgpt.data.sample import output_placeholder

TITLE = "mmgpt chat"


# --------------------------------------------------------------------------------------
# Chatbot value <-> model messages
# --------------------------------------------------------------------------------------


def _parts(content: Any) -> list[tuple[str, str]]:
    """A Chatbot message's content as ``("text", str)`` / ``("file", path)`` parts, in order.

    Accepts what the apps write (str, ``{"path": ...}``) and what Gradio sends back
    (``{"type": "text", "text"}``, ``{"type": "file", "file": {"path"}}``).
    """
    items = content if isinstance(content, list) else [content]
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(("text", item))
        elif isinstance(item, dict):
            if item.get("type") == "text" or ("text" in item and "path" not in item):
                parts.append(("text", str(item.get("text", ""))))
            elif isinstance(item.get("file"), dict) and item["file"].get("path"):
                parts.append(("file", str(item["file"]["path"])))
            elif item.get("path"):
                parts.append(("file", str(item["path"])))
            elif item.get("type") == "component" and isinstance(item.get("value"), dict):
                path = item["value"].get("path")
                if path:
                    parts.append(("file", str(path)))
    return parts


def to_messages(history: Sequence[dict[str, Any]] | None) -> list[Message]:
    """The Chatbot value as model turns: a user's files are input images, an assistant's
    files are images it drew (``<image_out>``). Consecutive messages of one role merge."""
    messages: list[Message] = []
    for entry in history or []:
        role = entry.get("role") if isinstance(entry, dict) else None
        if role not in ("user", "assistant"):
            continue
        parts = _parts(entry.get("content"))
        if role == "user":
            text = " ".join(t for kind, t in parts if kind == "text").strip()
            paths = [p for kind, p in parts if kind == "file"]
            message = user_message(text, paths) if (text or paths) else None
        else:
            chunks = [t if kind == "text" else _output_mark(t) for kind, t in parts]
            message = Message("assistant", "".join(chunks).strip(), [])
        if message is None:
            continue
        if messages and messages[-1].role == role:
            last = messages[-1]
            last.text = f"{last.text}\n{message.text}"
            last.images += message.images
        else:
            messages.append(message)
    return messages


def _output_mark(path: str) -> str:
    """The placeholder of a file the assistant produced: ``<image_out>`` for an image, else
    the output placeholder of the modality whose loader reads its suffix (``<audio_out>``)."""
    from mmgpt.data.loaders import accepted_extensions

    modality = accepted_extensions().get(Path(path).suffix.lower(), "image")
    return output_placeholder(modality)


def user_entry(text: str, files: Sequence[str]) -> dict[str, Any]:
    content: list[Any] = [{"path": f} for f in files]
    if text:
        content.append(text)
    return {"role": "user", "content": content}


def _strip_reply(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History without the trailing assistant messages."""
    history = list(history or [])
    while history and history[-1].get("role") != "user":
        history.pop()
    return history


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------


class ChatApp:
    """The chat's event handlers around one :class:`DemoModel`.

    Drawn images go to Gradio as files of a bounded :class:`~demos.common.ImageFolder`
    (``image_dir``, default a new temporary folder), removed by :meth:`close`.
    """

    def __init__(
        self, model: DemoModel, image_dir: str | Path | None = None, **folder_limits: int
    ) -> None:
        self.model = model
        self.images = ImageFolder(image_dir, prefix="mmgpt-chat-", **folder_limits)
        self.image_dir = self.images.directory

    def _save(self, image: Any) -> str:
        return self.images.save(image)

    def close(self) -> None:
        """Remove the drawn images (run when the server closes, and at exit)."""
        self.images.close()

    def _prepare(
        self,
        history: Sequence[dict[str, Any]],
        settings: Settings,
        *,
        quiet: bool,
        remember: bool,
    ) -> tuple[list[dict[str, str]], list[Any]]:
        messages = to_messages(history)
        if not remember:  # the last (user) message alone, with its images
            messages = messages[-1:]
        warn = (lambda _message: None) if quiet else ui.warn
        return self.model.fit(messages, settings.max_new_tokens, warn)

    # -- UI events ------------------------------------------------------------------------
    def add_message(
        self,
        message: dict[str, Any] | None,
        history: list[dict[str, Any]],
        max_new_tokens: Any,
        remember: bool = False,
    ) -> tuple[list[dict[str, Any]], Any]:
        """Check the new message (images, length) and show it; the box is locked until the
        answer is done. On a problem nothing changes and the message stays in the box."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [str(f) for f in message.get("files") or []]
        settings = Settings.from_values(max_new_tokens=max_new_tokens)
        new_history = [*_strip_trailing_empty(history), user_entry(text, files)]
        user_message(text, files)  # empty message → error
        self._prepare(new_history, settings, quiet=False, remember=bool(remember))
        return new_history, gr.MultimodalTextbox(value=None, interactive=False)

    def respond(
        self,
        history: list[dict[str, Any]],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        guidance: float,
        steps: int,
        seed: int,
        adapter: str,
        remember: bool = False,
    ) -> Iterator[list[dict[str, Any]]]:
        """Stream the answer to the last user message into the conversation (with the earlier
        turns as context when ``remember``)."""
        settings = Settings.from_values(temperature, top_p, max_new_tokens, guidance, steps, seed)
        history = list(history or [])
        turns, images = self._prepare(history, settings, quiet=True, remember=bool(remember))
        content: list[Any] = []
        history.append({"role": "assistant", "content": content})
        for event in self.model.stream_reply(
            turns, images, settings, settings.resolve_seed(), adapter
        ):
            if isinstance(event, str):
                if content and isinstance(content[-1], str):
                    content[-1] += event
                else:
                    content.append(event)
            else:
                content.append({"path": self._save(event)})
            history[-1] = {"role": "assistant", "content": list(content)}
            yield history
        if not any(isinstance(c, dict) or c.strip() for c in content):
            history[-1] = {"role": "assistant", "content": "…"}
            ui.warn("The model ended its answer at once; try Retry or a higher temperature.")
            yield history

    def retry(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        history = _strip_reply(history)
        if not history:
            raise UserInputError("Nothing to retry yet: send a message first.")
        return history

    def undo(self, history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
        """Remove the last exchange and put its message back in the box."""
        history = _strip_reply(history)
        if not history:
            raise UserInputError("Nothing to undo.")
        last = history.pop()
        parts = _parts(last.get("content"))
        text = " ".join(t for kind, t in parts if kind == "text")
        files = [p for kind, p in parts if kind == "file"]
        return history, {"text": text, "files": files}

    # -- API ------------------------------------------------------------------------------
    def api_chat(
        self,
        message: dict[str, Any] | None,
        history: list[dict[str, Any]] | None,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        guidance: float,
        steps: int,
        seed: int,
        adapter: str,
    ) -> Iterator[tuple[str, list[str]]]:
        """One turn: the message (text + image files) after ``history`` (the caller's context,
        always used); streams ``(reply text so far, drawn images)``."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [str(f) for f in message.get("files") or []]
        user_message(text, files)
        conversation = [*_api_history(history), user_entry(text, files)]
        settings = Settings.from_values(temperature, top_p, max_new_tokens, guidance, steps, seed)
        turns, images = self._prepare(conversation, settings, quiet=False, remember=True)
        reply, drawn = "", []
        yield reply, drawn
        for event in self.model.stream_reply(
            turns, images, settings, settings.resolve_seed(), adapter
        ):
            if isinstance(event, str):
                reply += event
            elif isinstance(getattr(event, "modality", None), str):
                # the API's gallery holds images only: another output is marked in the text
                reply += output_placeholder(event.modality)
            else:
                drawn = [*drawn, self._save(event)]
            yield reply, drawn


def _api_history(history: Any) -> list[dict[str, Any]]:
    """Check an API caller's history: ``[{"role": "user"|"assistant", "content": str}]``.

    Text only: images travel in the message, where they are uploaded; a path in the history
    would name a file on the server.
    """
    if history in (None, ""):
        return []
    if not isinstance(history, list):
        raise UserInputError("history must be a list of {role, content} messages.")
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or entry.get("role") not in ("user", "assistant"):
            raise UserInputError(
                f"history[{i}] must be a message {{role: 'user' or 'assistant', content}}."
            )
        if any(kind == "file" for kind, _ in _parts(entry.get("content"))):
            raise UserInputError(
                f"history[{i}] has a file: through the API, history is text only; send "
                "images with the message."
            )
    return history


def _strip_trailing_empty(history: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [h for h in history or [] if _parts(h.get("content"))]


def build_app(model: DemoModel, *, image_dir: str | Path | None = None) -> gr.Blocks:
    """The chat app for ``model`` (not launched; see :func:`mmgpt.demo.launch_demo`)."""
    app = ChatApp(model, image_dir)
    sees, draws = model.can_see, model.can_draw
    # files of every modality the model reads (images, a plugin's audio…) can be attached
    reads = model.input_modalities
    others = [m for m in reads if m != "image"]
    title = ui.title(TITLE, model)
    hint = " · ".join(
        p
        for p in (
            "Drop, paste or upload an image and ask about it" if sees else "",
            f"Upload {' or '.join(others)} ({', '.join(model.file_types)}) and ask about it"
            if others
            else "",
            "ask for a drawing (“draw a red circle…”)" if draws else "",
        )
        if p
    )
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=ui.DELETE_CACHE) as demo:
        gr.Markdown(f"## {title}\n{ui.model_note(model)}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=420,
                    placeholder=hint or "Ask something",
                    elem_id="chatbot",
                    feedback_options=None,
                )
                box = gr.MultimodalTextbox(
                    placeholder="Type a message… (Enter sends)",
                    # no file_types: the server's own check names neither file nor type;
                    # load_user_image says which file is wrong and what to upload
                    file_types=None,
                    file_count="multiple",
                    sources=["upload"] if reads else [],
                    show_label=False,
                    elem_id="message",
                )
                with gr.Row():
                    stop_btn = gr.Button("Stop", size="sm", elem_id="stop")
                    retry_btn = gr.Button("Retry", size="sm", elem_id="retry")
                    undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                # shapes-world prompts: for the models mmgpt trains on images, not a text model
                examples = [e for e in chat_examples() if sees or not e["files"]]
                if examples and not model.is_text_model:
                    gr.Examples(
                        examples=[[e] for e in examples],
                        inputs=[box],
                        label="Examples (shapes world)",
                    )
            with gr.Column(scale=1, min_width=240):
                with gr.Accordion("Settings", open=True):
                    temperature, top_p, max_new = ui.text_controls(model)
                    guidance, steps = ui.image_controls(model)
                    seed = ui.seed_control()
                    adapter = ui.adapter_control(model)
                    remember = gr.Checkbox(
                        False,
                        label="Earlier turns as context",
                        info="off: each message is answered on its own, best for models "
                        "trained on single exchanges such as shapes-tiny",
                    )
                if sees:
                    gr.Markdown(f"Images: {model.limits.describe()}.", elem_classes=["mmgpt-note"])
        settings = [temperature, top_p, max_new, guidance, steps, seed, adapter, remember]
        # below the chat: what the last reply attended to (demos/attention_view.py)
        attention_view.add_attention_view(
            model, chatbot, to_messages, remember=remember, max_new_tokens=max_new, adapter=adapter
        )
        unlock = {"fn": lambda: gr.MultimodalTextbox(interactive=True), "outputs": [box]}
        private: dict[str, Any] = {"api_visibility": "private"}

        submitted = box.submit(
            ui.friendly(app.add_message),
            [box, chatbot, max_new, remember],
            [chatbot, box],
            concurrency_limit=None,
            **private,
        )
        answered = submitted.success(
            ui.friendly(app.respond), [chatbot, *settings], [chatbot], **private
        )
        answered.then(**unlock, **private)
        retried = retry_btn.click(
            ui.friendly(app.retry), [chatbot], [chatbot], concurrency_limit=None, **private
        ).success(ui.friendly(app.respond), [chatbot, *settings], [chatbot], **private)
        # Stop ends the answer being streamed (the text so far stays) and frees the box
        stop_btn.click(**unlock, cancels=[answered, retried], queue=False, **private)
        undo_btn.click(
            ui.friendly(app.undo), [chatbot], [chatbot, box], concurrency_limit=None, **private
        )

        # Clear cancels a running answer and empties the chat at once, and once more after
        # that event: an update of the cancelled answer already on its way cannot then refill
        # the chat, and the chat empties even when the page drops one of the two events.
        def cleared() -> tuple[list[Any], Any]:
            return [], gr.MultimodalTextbox(value=None, interactive=True)

        clear_btn.click(
            cleared,
            None,
            [chatbot, box],
            cancels=[answered, retried],
            concurrency_limit=None,
            **private,
        ).then(cleared, None, [chatbot, box], concurrency_limit=None, **private)

        # The named API endpoint: a hidden button, so API calls leave the page alone.
        api_history = gr.JSON(value=[], visible=False, label="history")
        api_reply = gr.Textbox(visible=False, label="reply")
        api_images = gr.Gallery(visible=False, label="images", format="png")
        gr.Button(visible=False).click(
            ui.friendly(app.api_chat),
            [box, api_history, *settings[:-1]],  # an API caller's history is always used
            [api_reply, api_images],
            api_name="chat",
            api_description="Answer a message (text + image files) after an optional history; "
            "streams the reply text and the images drawn.",
        )
    ui.close_with(demo, app.close)
    return demo


__all__ = ["ChatApp", "build_app", "to_messages", "user_entry"]


if __name__ == "__main__":  # pragma: no cover
    from mmgpt.demo import main

    main(["--app", "chat"])
