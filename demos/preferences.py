"""Collect preferences: a prompt (and optional image) gets two sampled answers (two seeds); the
person picks the better one or skips. Each judged pair is appended to ``preferences.jsonl``
in the data directory — the preference format the reward-model and DPO recipes read — with
the prompt's image saved next to it. The count and the pair waiting for a judgement live on
disk (:class:`~demos.preference_store.PreferenceStore`), so a page reload or a server restart
picks up where the work stopped.

API (``gradio_client``): ``/sample_pair(message, temperature, top_p, max_new_tokens, seed)``
with ``message = {"text": prompt, "files": [handle_file(image)]}`` (the image is optional)
→ ``(answer A, answer B, pair id, progress)``; ``/judge(pair_id, choice)`` with
choice ``"A"``, ``"B"`` or ``"skip"`` → progress; ``/progress()`` → ``{"count", "skipped",
"pending": {"id", "prompt", "answers", "seeds", "image", "created"} | None, "jsonl"}``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import gradio as gr

from demos import ui
from demos.common import DemoModel, Settings, UserInputError, user_message
from demos.examples import PREFERENCE_EXAMPLES, examples_dir
from demos.preference_store import CHOICES, PendingPair, PreferenceStore, StaleChoiceError

TITLE = "mmgpt preferences"
# Attempts at two different answers before the pair is offered as identical (skip only).
SAMPLE_ATTEMPTS = 4


class PreferenceApp:
    """The event handlers around a model and a :class:`PreferenceStore`."""

    def __init__(self, model: DemoModel, store: PreferenceStore) -> None:
        self.model = model
        self.store = store

    def progress(self) -> str:
        count, skipped, pending = self.store.snapshot()
        text = f"**{count}** pair{'s' if count != 1 else ''} recorded · {skipped} skipped"
        if pending is not None:
            text += " · 1 pair waiting for your choice"
        return f"{text} · `{self.store.jsonl}`"

    def state(self) -> dict[str, Any]:
        """The store as data: ``{"count", "skipped", "pending": {...} | None, "jsonl"}``."""
        count, skipped, pending = self.store.snapshot()
        return {
            "count": count,
            "skipped": skipped,
            "pending": asdict(pending) if pending is not None else None,
            "jsonl": str(self.store.jsonl),
        }

    # -- events -----------------------------------------------------------------------------
    def sample_pair(
        self,
        message: dict[str, Any] | None,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> tuple[str, str, str, str]:
        """Two answers with different seeds; the pair becomes the pending one."""
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
        self.store.set_pending(pair)
        return answers[0], answers[1], pair.id, self.progress()

    def judge(self, pair_id: str | None, choice: str) -> str:
        """Record the pending pair with ``choice`` (``"A"``, ``"B"`` or ``"skip"``)."""
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
        return self.progress()

    # -- the page ---------------------------------------------------------------------------
    def view(self) -> tuple[Any, ...]:
        """Everything the page shows of the store: progress and the pending pair."""
        _, _, pair = self.store.snapshot()
        return (self.progress(), *self._pair_view(pair))

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
        image = None
        path = self.store.image_path(pair)
        if path is not None and path.is_file():
            from PIL import Image

            with Image.open(path) as opened:
                image = opened.convert("RGB")
        can_choose = not pair.identical
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

    def sample_and_show(self, *args: Any) -> tuple[Any, ...]:
        self.sample_pair(*args)
        return self.view()

    def judge_and_show(self, pair_id: str, choice: str) -> tuple[Any, ...]:
        try:
            self.judge(pair_id, choice)
        except UserInputError as exc:
            ui.warn(str(exc))  # e.g. judged in another tab: the page shows the current state
        return self.view()


def build_app(model: DemoModel, *, data_dir: str | os.PathLike = "preferences") -> gr.Blocks:
    """The preferences app writing to ``data_dir`` (not launched)."""
    app = PreferenceApp(model, PreferenceStore(data_dir, model_name=model.name))
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {TITLE}\n{ui.model_note(model)} · pick the better answer; each choice is "
            "one line of preference data for reward-model / DPO training."
        )
        progress = gr.Markdown(elem_id="progress")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.MultimodalTextbox(
                    label="Prompt" + (" (attaching an image is optional)" if model.can_see else ""),
                    placeholder="Type a prompt; drop, paste or upload an image…",
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

        demo.load(ui.friendly(app.view), None, view, **private)
        sample_inputs = [prompt, temperature, top_p, max_new, seed]
        sample_btn.click(ui.friendly(app.sample_and_show), sample_inputs, view, **private)
        prompt.submit(ui.friendly(app.sample_and_show), sample_inputs, view, **private)
        for button, choice in ((a_btn, "A"), (b_btn, "B"), (skip_btn, "skip")):
            button.click(
                ui.friendly(lambda pid, c=choice: app.judge_and_show(pid, c)),
                [pair_id],
                view,
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
