"""Gradio pieces shared by the apps: friendly errors, settings controls, theme."""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from demos.common import DemoModel, Settings, UserInputError

logger = logging.getLogger("mmgpt.demo")
DEFAULTS = Settings()
# Gradio's cache (uploads, images sent to the page) of each app: every 10 minutes the files
# older than an hour are removed, and all of them when the server closes. Without it every
# upload stays on disk for the life of the machine.
DELETE_CACHE = (600, 3600)

CSS = """
footer {visibility: hidden}
.mmgpt-note {opacity: 0.75; font-size: 0.9em}
#pending {padding: 6px 12px}
/* the shapes models draw 16-32 px images: show their pixels, not a blur */
#gallery img, #chatbot .bot img {image-rendering: pixelated}
"""


def title(app_title: str, model: DemoModel) -> str:
    """An app's title for ``model``: it says when the model is a text model."""
    return f"{app_title} (text model)" if model.is_text_model else app_title


def theme() -> gr.themes.Base:
    """The default theme with system fonts only: the page loads nothing from the network."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


def error(exc: BaseException) -> gr.Error:
    """The ``gr.Error`` shown for ``exc``: its own text for input problems, a one-line
    summary (the traceback goes to the server log only) for anything else."""
    if isinstance(exc, UserInputError):
        message = str(exc)
    else:
        logger.error("request failed", exc_info=exc)
        message = f"Generation failed ({type(exc).__name__}: {exc}). Try other settings."
    # Gradio renders the message as HTML; a file name must not become a tag
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an event handler so that no exception reaches the page as a stack trace."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise error(exc) from None

        return generator

    @functools.wraps(fn)
    def function(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise error(exc) from None

    return function


def warn(message: str) -> None:
    """A yellow toast in the page (and a log line)."""
    logger.info("warning shown: %s", message)
    gr.Warning(html.escape(message, quote=False))


def text_controls(model: DemoModel, defaults: Settings = DEFAULTS) -> list[gr.components.Component]:
    """Temperature, top-p and max new tokens sliders (max new tokens: at most half the
    context, by default a quarter, so that a question with an image still fits)."""
    longest = max(1, model.block_size // 2)
    default = max(1, min(defaults.max_new_tokens, model.block_size // 4))
    return [
        gr.Slider(
            0.0,
            2.0,
            value=defaults.temperature,
            step=0.05,
            label="Temperature",
            info="0 = always the most likely token",
        ),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
        gr.Slider(1, longest, value=default, step=1, label="Max new tokens"),
    ]


def image_controls(
    model: DemoModel, defaults: Settings = DEFAULTS
) -> list[gr.components.Component]:
    """Guidance and diffusion steps sliders (hidden when the model cannot draw)."""
    return [
        gr.Slider(
            0.0,
            10.0,
            value=defaults.guidance,
            step=0.5,
            label="Guidance",
            info="classifier-free guidance of the image decoder",
            visible=model.can_draw,
        ),
        gr.Slider(
            1, 100, value=defaults.steps, step=1, label="Diffusion steps", visible=model.can_draw
        ),
    ]


def seed_control(defaults: Settings = DEFAULTS) -> gr.Number:
    return gr.Number(
        value=defaults.seed,
        precision=0,
        label="Seed",
        info="-1 = a new random seed each time",
        minimum=-1,
    )


def adapter_control(model: DemoModel) -> gr.Dropdown:
    """The adapter picker; hidden when the model directory has no adapters."""
    return gr.Dropdown(
        model.adapter_choices(),
        value=model.adapter_choices()[0],
        label="Adapter",
        visible=bool(model.adapters),
        info="LoRA adapters of the model",
    )


def close_with(blocks: gr.Blocks, fn: Callable[[], None]) -> None:
    """Have ``fn`` run when the server of ``blocks`` shuts down (see :func:`closers`)."""
    blocks._mmgpt_closers = [*closers(blocks), fn]


def closers(blocks: gr.Blocks) -> list[Callable[[], None]]:
    """What :func:`close_with` registered; :func:`mmgpt.demo.launch_demo` runs these from
    the server's lifespan, i.e. on ``blocks.close()`` and on Ctrl-C."""
    return list(getattr(blocks, "_mmgpt_closers", []))


def model_note(model: DemoModel) -> str:
    """One line describing the model, for the page header."""
    parts = [f"model **{model.name}**"]
    if model.is_text_model:
        template = "its own chat template" if model.uses_own_chat_template else "mmgpt's template"
        parts += ["a text model: text in, text out", f"prompts use {template}"]
    parts.append(f"context {model.block_size} tokens")
    if model.can_see:
        parts.append(f"sees {model.input_size}×{model.input_size} images")
    if model.can_draw:
        parts.append("draws images")
    return " · ".join(parts)


__all__ = [
    "CSS",
    "DELETE_CACHE",
    "adapter_control",
    "close_with",
    "closers",
    "error",
    "friendly",
    "image_controls",
    "model_note",
    "seed_control",
    "text_controls",
    "theme",
    "title",
    "warn",
]
