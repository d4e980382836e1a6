"""Text to image: a prompt → a gallery of images, one per seed (each caption names its seed,
so any image can be drawn again). Images appear one by one as they are drawn.

API (``gradio_client``): ``/draw(prompt, num_images, guidance, steps, seed, adapter)`` →
the gallery, a list of ``{"image": file, "caption": "seed N"}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from demos import ui
from demos.common import MAX_SEED, DemoModel, Settings, UserInputError
from demos.examples import DRAW_EXAMPLES

TITLE = "mmgpt text to image"
MAX_IMAGES = 8


class TextToImageApp:
    def __init__(self, model: DemoModel) -> None:
        self.model = model

    def draw(
        self,
        prompt: str | None,
        num_images: int,
        guidance: float,
        steps: int,
        seed: int,
        adapter: str,
    ) -> Iterator[list[tuple[Any, str]]]:
        """Stream the gallery: images for seeds ``seed, seed + 1, …`` (a random first seed
        for ``-1``), each captioned with its seed."""
        if not self.model.can_draw:
            raise UserInputError(f"The model '{self.model.name}' cannot draw images.")
        try:
            n = int(num_images)
        except (TypeError, ValueError):
            raise UserInputError(
                f"Number of images must be a whole number, got {num_images!r}."
            ) from None
        if not 1 <= n <= MAX_IMAGES:
            raise UserInputError(f"Number of images must be between 1 and {MAX_IMAGES}.")
        settings = Settings.from_values(guidance=guidance, steps=steps, seed=seed)
        if not (prompt or "").strip():
            raise UserInputError("The prompt is empty: describe what to draw.")
        first = settings.resolve_seed()
        gallery: list[tuple[Any, str]] = []
        for i in range(n):
            image_seed = (first + i) % (MAX_SEED + 1)
            image = self.model.draw(prompt or "", settings, image_seed, adapter)
            gallery = [*gallery, (image, f"seed {image_seed}")]
            yield gallery


def cannot_draw(where: str, why: str) -> ValueError:
    """The error for a model this app cannot serve: ``where`` it is, ``why`` it cannot draw."""
    return ValueError(
        f"{where}: the text_to_image app needs a model that draws; this one {why}. Serve it "
        "with the chat or preferences app instead."
    )


def check_model(model: DemoModel) -> None:
    """Refuse a model that cannot draw, naming its directory (there is nothing to serve)."""
    if not model.can_draw:
        raise cannot_draw(
            model.describe(),
            "is a text model (no image decoder)"
            if model.is_text_model
            else "has no image decoder (and signal tokens) to draw with",
        )


def build_app(model: DemoModel) -> gr.Blocks:
    """The text-to-image app for ``model`` (not launched); a model that cannot draw is an
    error (:func:`check_model`)."""
    check_model(model)
    app = TextToImageApp(model)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=ui.DELETE_CACHE) as demo:
        gr.Markdown(f"## {TITLE}\n{ui.model_note(model)}")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="draw a large red circle in the center",
                    lines=2,
                    elem_id="prompt",
                )
                draw_btn = gr.Button("Draw", variant="primary", elem_id="draw")
                gallery = gr.Gallery(
                    label="Images (caption: seed)",
                    columns=4,
                    height=360,
                    format="png",
                    object_fit="contain",
                    elem_id="gallery",
                )
                gr.Examples(examples=[[p] for p in DRAW_EXAMPLES], inputs=[prompt])
            with gr.Column(scale=1, min_width=240):
                num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
                guidance, steps = ui.image_controls(model)
                seed = ui.seed_control()
                adapter = ui.adapter_control(model)
        inputs = [prompt, num_images, guidance, steps, seed, adapter]
        draw = ui.friendly(app.draw)
        draw_btn.click(draw, inputs, [gallery], api_name="draw")
        prompt.submit(draw, inputs, [gallery], api_visibility="private")
    return demo


__all__ = ["TextToImageApp", "build_app", "cannot_draw", "check_model"]


if __name__ == "__main__":  # pragma: no cover
    from mmgpt.demo import main

    main(["--app", "text_to_image"])
