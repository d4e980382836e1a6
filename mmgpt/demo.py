"""Launch the Gradio demos: ``mmgpt demo`` and :func:`launch_demo`.

With no arguments this serves the multimodal chat on the model shipped inside the package
(``mmgpt/assets/shapes-tiny``), on ``127.0.0.1``, offline: Gradio's analytics are off, the
page uses system fonts, and nothing is shared unless ``share=True``. The apps live in the
``demos`` package (installed with mmgpt); Gradio comes with ``pip install "mmgpt[demo]"``.
Any model directory mmgpt reads serves: a multimodal one, or a text-only language model (an
mmgpt GPT, or a Hugging Face gpt2 / llama / qwen2 / mistral directory), which gets the chat
and preferences apps without images.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "shapes-tiny"
APPS = {
    "chat": "demos.chat",
    "text_to_image": "demos.text_to_image",
    "preferences": "demos.preferences",
}
DEFAULT_HOST = "127.0.0.1"
# Requests served at once per event (the model lock interleaves them step by step) and how
# many may wait in the queue before new ones are refused.
CONCURRENCY_LIMIT = 4
MAX_QUEUE = 64
DEFAULT_PREFERENCE_DIR = "preferences"
logger = logging.getLogger("mmgpt.demo")


def default_model_dir() -> Path:
    """The shipped ``shapes-tiny`` model directory."""
    return Path(str(files("mmgpt") / "assets" / DEFAULT_MODEL))


def _gradio() -> Any:
    # Before the first import of gradio: its analytics (and version check) phone home.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as exc:
        raise ImportError(
            'the demos need gradio: pip install "mmgpt[demo]"', name="gradio"
        ) from exc
    return gradio


def _resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    if model_dir is None:
        path = default_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the shipped model is missing from this installation ({path}); pass a model "
                f"directory with --model, or recreate it with 'mmgpt train {DEFAULT_MODEL}'"
            )
        return path
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return path


def _check_app(model_dir: Path, app: str) -> None:
    """Refuse, before any weight is read, an app the directory's architecture cannot serve."""
    if app != "text_to_image":
        return
    from demos.text_to_image import cannot_draw
    from mmgpt.config import CONFIG_NAME, read_model_config
    from mmgpt.pretrained import architecture

    arch = architecture(read_model_config(model_dir), model_dir / CONFIG_NAME)
    if arch != "multimodal":
        raise cannot_draw(str(model_dir), f"is a text model ({arch!r}, no image decoder)")


def build_demo(
    model_dir: str | os.PathLike | None = None,
    app: str = "chat",
    *,
    data_dir: str | os.PathLike | None = None,
) -> Any:
    """The ``gr.Blocks`` of ``app`` on the model in ``model_dir`` (not launched)."""
    if app not in APPS:
        raise ValueError(f"unknown demo app {app!r}; apps: {', '.join(APPS)}")
    _gradio()
    from demos.common import DemoModel

    path = _resolve_model_dir(model_dir)
    _check_app(path, app)
    model = DemoModel.load(path)
    module = importlib.import_module(APPS[app])
    if app == "preferences":
        return module.build_app(model, data_dir=data_dir or DEFAULT_PREFERENCE_DIR)
    return module.build_app(model)


def launch_demo(
    model_dir: str | os.PathLike | None = None,
    port: int | None = None,
    share: bool = False,
    app: str = "chat",
    *,
    host: str = DEFAULT_HOST,
    data_dir: str | os.PathLike | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> Any:
    """Serve a demo app and return its ``gr.Blocks`` (``.local_url`` is its address).

    Args:
        model_dir: a model directory, multimodal or text-only (``text_to_image`` needs one
            that draws); default: the shipped ``shapes-tiny``.
        port: the port; default: Gradio's (7860, or the next free one).
        share: also open a public ``*.gradio.live`` link (needs a network).
        app: ``"chat"``, ``"text_to_image"`` or ``"preferences"``.
        host: the interface to listen on (``"0.0.0.0"`` for every one).
        data_dir: where the preferences app writes its JSONL (default ``./preferences``).
        prevent_thread_lock: return at once instead of serving until interrupted.
        quiet: no startup banner.
    """
    _gradio()
    from demos.common import MAX_UPLOAD_MB
    from demos.examples import examples_dir
    from demos.ui import CSS, closers, theme

    blocks = build_demo(model_dir, app, data_dir=data_dir)
    blocks.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=MAX_QUEUE)
    if app == "preferences":
        # Only here, for whoever runs the server: the page and the API never name the folder,
        # and nothing in it is served (it holds every collected pair).
        where = Path(data_dir or DEFAULT_PREFERENCE_DIR).resolve()
        logger.info("preference data: %s", where)
        if not quiet:
            print(f"Preference data is written to {where}", file=sys.stderr)
    on_close = closers(blocks)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        # the server's shutdown (blocks.close(), Ctrl-C): remove the apps' temporary files
        try:
            yield
        finally:
            for close in on_close:
                close()

    blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        show_error=False,  # unexpected errors show a one-line message, never a traceback
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        # the examples only; the preferences app hands its images over as pixels
        allowed_paths=[str(examples_dir())],
        app_kwargs={"lifespan": lifespan},
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        theme=theme(),
        css=CSS,
        footer_links=[],
    )
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmgpt.demo [--app APP] [--model DIR] [--port N] [--share] ...``."""
    parser = argparse.ArgumentParser(prog="python -m mmgpt.demo", description=__doc__)
    parser.add_argument("--app", choices=sorted(APPS), default="chat")
    parser.add_argument("--model", metavar="DIR", help="model directory (default: shipped)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--share", action="store_true", help="public Gradio link")
    parser.add_argument("--data", metavar="DIR", help="preferences: output directory")
    args = parser.parse_args(argv)
    launch_demo(args.model, args.port, args.share, args.app, host=args.host, data_dir=args.data)
    return 0


__all__ = ["APPS", "build_demo", "default_model_dir", "launch_demo", "main"]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
