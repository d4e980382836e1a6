"""Collect preferences: a prompt (and optional image) gets two sampled answers (two seeds); the
person picks the better one or skips. A text-only model takes prompts without images. Each judged pair is appended to ``preferences.jsonl``
in the data directory — the preference format the reward-model and DPO recipes read — with
the prompt's image saved next to it. The count and the pairs waiting for a judgement live on
disk (:class:`~demos.preference_store.PreferenceStore`), so a page reload or a server restart
picks up where the work stopped.

Each browser has its own pending pair (its id is kept in the browser's localStorage, so it
survives a reload and a restart), and so has each API client (its Gradio session): people
labelling at once do not replace each other's pairs. Nothing in the data folder is served:
the page gets the prompt image as pixels, and neither the page nor the API shows the folder's
path (the server log does).

API (``gradio_client``): ``/sample_pair(message, temperature, top_p, max_new_tokens, seed)``
with ``message = {"text": prompt, "files": [handle_file(image)]}`` (the image is optional)
→ ``(answer A, answer B, pair id, progress)``; ``/judge(pair_id, choice)`` with
choice ``"A"``, ``"B"`` or ``"skip"`` → progress; ``/progress()`` → ``{"count", "skipped",
"pending": {"id", "prompt", "answers", "seeds", "image", "created"} | None, "waiting",
"jsonl"}``: the caller's own pending pair (never another person's prompt) and how many pairs
wait in all. A pair left waiting in a browser is judged from that browser (its id survives a
reload and a restart), or through ``/judge`` by whoever holds its id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from dataclasses import asdict
from typing import Any

import gradio as gr

from demos import ui
from demos.common import DemoModel, Settings, UserInputError, user_message
from demos.examples import PREFERENCE_EXAMPLES, examples_dir
from demos.preference_store import (
    CHOICES,
    DEFAULT_OWNER,
    JSONL_NAME,
    PendingPair,
    PreferenceStore,
    StaleChoiceError,
)
from mmgpt.data.images import ImageLoadError, load_image

TITLE = "mmgpt preferences"
# Attempts at two different answers before the pair is offered as identical (skip only).
SAMPLE_ATTEMPTS = 4
# The browser's session id lives in its localStorage under this key. BrowserState's secret is
# sent to the page (the browser encrypts with it), so it hides nothing from the page's user;
# a fixed one keeps the id readable after a server restart, and with it the pending pair.
BROWSER_KEY = "mmgpt-preferences-session"
BROWSER_SECRET = "mmgpt-preferences"
_BROWSER_ID = re.compile(r"[0-9a-f]{32}")
logger = logging.getLogger("mmgpt.demo")


def browser_owner(browser_id: Any) -> tuple[str, str]:
    """``(browser id, store owner)`` for the id the page sent; a missing or malformed one
    (the first visit, or a value someone typed into localStorage) gets a new id."""
    if not isinstance(browser_id, str) or not _BROWSER_ID.fullmatch(browser_id):
        browser_id = uuid.uuid4().hex
    return browser_id, f"browser:{browser_id}"


def api_owner(request: gr.Request | None) -> str:
    """The store owner of an API client: its Gradio session (hashed: the client chose it)."""
    session = getattr(request, "session_hash", None) if request is not None else None
    if not session:
        return DEFAULT_OWNER
    return "api:" + hashlib.sha256(str(session).encode()).hexdigest()[:24]


class PreferenceApp:
    """The event handlers around a model and a :class:`PreferenceStore`."""

    def __init__(self, model: DemoModel, store: PreferenceStore) -> None:
        self.model = model
        self.store = store

    def progress(self, owner: str = DEFAULT_OWNER) -> str:
        count, skipped, pending = self.store.snapshot(owner)
        text = f"**{count}** pair{'s' if count != 1 else ''} recorded · {skipped} skipped"
        if pending is not None:
            text += " · 1 pair waiting for your choice"
        # the file's name only: the data folder's path is for the server log
        return f"{text} · `{JSONL_NAME}`"

    def state(self, request: gr.Request | None = None) -> dict[str, Any]:
        """The store as data: ``{"count", "skipped", "pending": {...} | None, "waiting",
        "jsonl"}`` (see the module docstring)."""
        count, skipped, pending = self.store.snapshot(api_owner(request))
        waiting = self.store.waiting()
        return {
            "count": count,
            "skipped": skipped,
            "pending": asdict(pending) if pending is not None else None,
            "waiting": len(waiting),
            "jsonl": JSONL_NAME,
        }

    # -- events -----------------------------------------------------------------------------
    def sample_pair(
        self,
        message: dict[str, Any] | None,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        request: gr.Request | None = None,
    ) -> tuple[str, str, str, str]:
        """API: two answers with different seeds; the pair becomes the caller's pending one."""
        owner = api_owner(request)
        pair = self._sample(owner, message, temperature, top_p, max_new_tokens, seed)
        return pair.answers[0], pair.answers[1], pair.id, self.progress(owner)

    def _sample(
        self,
        owner: str,
        message: dict[str, Any] | None,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> PendingPair:
        settings = Settings.from_values(temperature, top_p, max_new_tokens, seed=seed)
        if settings.temperature == 0:
            raise UserInputError(
                "With temperature 0 both answers would be the same; raise the temperature."
            )
        message = message or {}
        text = (message.get("text") or "").strip()
        paths = [str(f) for f in message.get("files") or []]
        if not text:
            raise UserInputError("The prompt is empty: type a prompt (an image is optional).")
        if len(paths) > 1:
            raise UserInputError("Attach at most one image to a prompt.")
        user = user_message(text, paths)
        turns, images = self.model.fit([user], settings.max_new_tokens, ui.warn)
        seed_a = settings.resolve_seed()
        for attempt in range(SAMPLE_ATTEMPTS):
            seeds = [(seed_a + 2 * attempt) % (2**31), (seed_a + 2 * attempt + 1) % (2**31)]
            answers = [self.model.reply(turns, images, settings, s)[0] for s in seeds]
            if answers[0] != answers[1]:
                break
        else:
            ui.warn(
                f"{SAMPLE_ATTEMPTS} pairs of seeds gave identical answers: skip this prompt or "
                "raise the temperature."
            )
        pair = PendingPair(
            prompt=user.text,
            answers=answers,
            seeds=seeds,
            image=self.store.save_image(images[0]) if images else None,
        )
        self.store.set_pending(pair, owner)
        return pair

    def judge(self, pair_id: str | None, choice: str, request: gr.Request | None = None) -> str:
        """Record the pending pair ``pair_id`` with ``choice`` (``"A"``, ``"B"`` or
        ``"skip"``); any session's pair can be judged by its id."""
        self._judge(pair_id, choice)
        return self.progress(api_owner(request))

    def _judge(self, pair_id: str | None, choice: str) -> None:
        if choice not in CHOICES:
            raise UserInputError(f"The choice must be one of {', '.join(CHOICES)}.")
        if not pair_id:
            raise UserInputError("There is no pair to judge: sample two answers first.")
        try:
            self.store.judge(pair_id, choice)
        except StaleChoiceError as exc:
            raise UserInputError(str(exc)) from None
        except ValueError as exc:
            raise UserInputError(str(exc)) from None

    # -- the page ---------------------------------------------------------------------------
    def view(self, owner: str) -> tuple[Any, ...]:
        """Everything the page shows of the store: progress and ``owner``'s pending pair."""
        _, _, pair = self.store.snapshot(owner)
        return (self.progress(owner), *self._pair_view(pair))

    def _pair_view(self, pair: PendingPair | None) -> tuple[Any, ...]:
        if pair is None:
            return (
                "*No pair waiting: type a prompt and sample two answers.*",
                gr.Image(value=None, visible=False),
                "",
                "",
                "",
                gr.Button(interactive=False),
                gr.Button(interactive=False),
                gr.Button(interactive=False),
            )
        can_choose = not pair.identical
        image = self._image(pair)
        return (
            f"**Prompt:** {pair.prompt.replace('<image>', '[image]').strip()}  \n"
            f"seeds {pair.seeds[0]} (A) and {pair.seeds[1]} (B)"
            + (" — *identical answers: skip*" if pair.identical else ""),
            gr.Image(value=image, visible=image is not None),
            pair.answers[0],
            pair.answers[1],
            pair.id,
            gr.Button(interactive=can_choose),
            gr.Button(interactive=can_choose),
            gr.Button(interactive=True),
        )

    def _image(self, pair: PendingPair) -> Any:
        """The prompt's image as pixels: Gradio copies them into its own (bounded) cache, so
        no path inside the data folder is ever handed to the page."""
        path = self.store.image_path(pair)
        if path is None:
            return None
        try:
            return load_image(
                path,
                max_pixels=self.model.limits.max_pixels,
                max_decoded_bytes=self.model.limits.max_decoded_bytes,
            )
        except ImageLoadError as exc:  # deleted or damaged by hand: show the pair without it
            logger.warning("prompt image of pair %s not shown: %s", pair.id, exc)
            return None

    def start(self, browser_id: Any) -> tuple[Any, ...]:
        """Page load: the browser's id (a new one on its first visit) and its view."""
        browser_id, owner = browser_owner(browser_id)
        return (browser_id, *self.view(owner))

    def sample_and_show(self, browser_id: Any, *args: Any) -> tuple[Any, ...]:
        browser_id, owner = browser_owner(browser_id)
        self._sample(owner, *args)
        return (browser_id, *self.view(owner))

    def judge_and_show(self, browser_id: Any, pair_id: str, choice: str) -> tuple[Any, ...]:
        browser_id, owner = browser_owner(browser_id)
        try:
            self._judge(pair_id, choice)
        except UserInputError as exc:
            ui.warn(str(exc))  # e.g. judged in another tab: the page shows the current state
        return (browser_id, *self.view(owner))


def build_app(model: DemoModel, *, data_dir: str | os.PathLike = "preferences") -> gr.Blocks:
    """The preferences app writing to ``data_dir`` (not launched)."""
    app = PreferenceApp(model, PreferenceStore(data_dir, model_name=model.name))
    title = ui.title(TITLE, model)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=ui.DELETE_CACHE) as demo:
        browser_id = gr.BrowserState("", storage_key=BROWSER_KEY, secret=BROWSER_SECRET)
        gr.Markdown(
            f"## {title}\n{ui.model_note(model)} · pick the better answer; each choice is "
            "one line of preference data for reward-model / DPO training."
        )
        progress = gr.Markdown(elem_id="progress")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.MultimodalTextbox(
                    label="Prompt" + (" (attaching an image is optional)" if model.can_see else ""),
                    placeholder="Type a prompt"
                    + ("; drop, paste or upload an image…" if model.can_see else "…"),
                    file_count="single",
                    sources=["upload"] if model.can_see else [],
                    submit_btn=False,
                    lines=2,
                    elem_id="prompt",
                )
                sample_btn = gr.Button("Sample two answers", variant="primary", elem_id="sample")
            with gr.Column(scale=1, min_width=220):
                temperature, top_p, max_new = ui.text_controls(model, Settings(temperature=1.0))
                seed = ui.seed_control()
        with gr.Group():
            pending_md = gr.Markdown(elem_id="pending")
            pending_image = gr.Image(
                label="Prompt image",
                interactive=False,
                height=140,
                visible=False,
                elem_id="pending-image",
            )
            with gr.Row():
                answer_a = gr.Textbox(label="Answer A", lines=4, interactive=False, elem_id="a")
                answer_b = gr.Textbox(label="Answer B", lines=4, interactive=False, elem_id="b")
            with gr.Row():
                a_btn = gr.Button("A is better", elem_id="choose-a")
                b_btn = gr.Button("B is better", elem_id="choose-b")
                skip_btn = gr.Button("Skip", elem_id="skip")
        examples = [
            [{"text": text, "files": [str(examples_dir() / name)] if name else []}]
            for text, name in PREFERENCE_EXAMPLES
            if model.can_see or name is None
        ]
        if examples and not model.is_text_model:  # shapes-world prompts
            gr.Examples(examples=examples, inputs=[prompt], label="Examples")
        pair_id = gr.Textbox(visible=False, label="pair id")
        view = [
            progress,
            pending_md,
            pending_image,
            answer_a,
            answer_b,
            pair_id,
            a_btn,
            b_btn,
            skip_btn,
        ]
        private: dict[str, Any] = {"api_visibility": "private"}

        page = [browser_id, *view]
        demo.load(ui.friendly(app.start), [browser_id], page, **private)
        sample_inputs = [prompt, temperature, top_p, max_new, seed]
        sample_page = ui.friendly(app.sample_and_show)
        sample_btn.click(sample_page, [browser_id, *sample_inputs], page, **private)
        prompt.submit(sample_page, [browser_id, *sample_inputs], page, **private)
        for button, choice in ((a_btn, "A"), (b_btn, "B"), (skip_btn, "skip")):
            button.click(
                ui.friendly(lambda bid, pid, c=choice: app.judge_and_show(bid, pid, c)),
                [browser_id, pair_id],
                page,
                concurrency_limit=None,
                **private,
            )

        # named API endpoints
        api_a = gr.Textbox(visible=False, label="answer A")
        api_b = gr.Textbox(visible=False, label="answer B")
        api_choice = gr.Textbox(visible=False, label="choice")
        gr.Button(visible=False).click(
            ui.friendly(app.sample_pair),
            sample_inputs,
            [api_a, api_b, pair_id, progress],
            api_name="sample_pair",
        )
        gr.Button(visible=False).click(
            ui.friendly(app.judge),
            [pair_id, api_choice],
            [progress],
            api_name="judge",
            concurrency_limit=None,
        )
        api_state = gr.JSON(visible=False, label="state")
        gr.Button(visible=False).click(
            ui.friendly(app.state), None, [api_state], api_name="progress", queue=False
        )
    return demo


__all__ = ["PreferenceApp", "build_app"]


if __name__ == "__main__":  # pragma: no cover
    from mmgpt.demo import main

    main(["--app", "preferences"])
