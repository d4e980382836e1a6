"""Fixtures of the demo tests: a tiny trained model, launched apps, a headless Chromium.

The model is a randomly initialised ``gpt-nano`` + tiny ViT + tiny diffusion decoder whose
GPT is then overfitted (a few seconds) on four exchanges, so that the apps' outputs are known
and readable: the image question and "what is this?" are answered "a red circle", and
"draw …" prompts are answered with the signal tokens, i.e. an image. A LoRA adapter with
random weights is saved under ``adapters/noisy/`` to exercise the adapter picker.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

IMAGE_QUESTION = "what colour is the circle?"
TEXT_QUESTION = "what is this?"
ANSWER = "a red circle"
DRAW_PROMPT = "draw a red circle"
ADAPTER = "noisy"
CHROMIUM = "/usr/bin/chromium"


def circle_image(size: int = 32) -> Any:
    from mmgpt.data.shapes import render_scene

    scene = [{"shape": "circle", "color": "red", "size": "large", "position": "center"}]
    return render_scene(scene, size)


def _train_tiny_model(directory: Path) -> None:
    for module in ("timm", "diffusers", "peft"):
        pytest.importorskip(module)
    import torch.nn.functional as F

    from mmgpt.adapters import AdapterConfig, add_adapter, save_adapter
    from mmgpt.data.sample import Sample, Turn
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt_text import TextTokenizer, example_corpus_files

    torch.manual_seed(0)
    tok = TextTokenizer.train(example_corpus_files(), vocab_size=320, num_signal_tokens=4)
    model = MultimodalGPT.build(
        "gpt-nano",
        tok,
        block_size=96,
        image_decoder="diffusion",
        image_decoder_kwargs={"image_size": 16, "condition_dim": 16, "num_condition_tokens": 2},
        output_projector="signal_mlp",
    )
    samples = [
        Sample(
            [Turn("user", f"<image>\n{IMAGE_QUESTION}"), Turn("assistant", ANSWER)],
            images=[circle_image()],
        ),
        Sample([Turn("user", TEXT_QUESTION), Turn("assistant", ANSWER)]),
        Sample([Turn("user", DRAW_PROMPT), Turn("assistant", "<image_out>")]),
        Sample([Turn("user", "draw a blue square"), Turn("assistant", "<image_out>")]),
    ]
    batch = model.processor()(samples)
    optimizer = torch.optim.AdamW(model.gpt.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        logits = model(batch).logits  # (B, T, V)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            batch.labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()
    model.eval()
    model.save_pretrained(directory)
    add_adapter(model, AdapterConfig(r=4, targets=["decoder"]), ADAPTER)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # LoRA starts as a no-op; make this one change answers
    save_adapter(model, directory / "adapters" / ADAPTER, ADAPTER)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo-model") / "tiny"
    _train_tiny_model(directory)
    return directory


@pytest.fixture(scope="session")
def demo_model(tiny_model_dir: Path) -> Any:
    from demos.common import DemoModel

    return DemoModel.load(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(model_dir: Path, app: str, **kwargs: Any) -> Iterator[Any]:
    """A demo app served on a free localhost port for the duration of the block."""
    from mmgpt.demo import launch_demo

    blocks = launch_demo(
        model_dir, port=free_port(), app=app, prevent_thread_lock=True, quiet=True, **kwargs
    )
    try:
        yield blocks
    finally:
        blocks.close()


@contextlib.contextmanager
def page_of(browser: Any, url: str) -> Iterator[Any]:
    """A page of ``url`` that records every request leaving localhost in ``page.external``."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.external = []
    local = ("http://127.0.0.1", "http://localhost", "ws://127.0.0.1", "data:", "blob:")
    page.on("request", lambda r: None if r.url.startswith(local) else page.external.append(r.url))
    page.set_default_timeout(30_000)
    # assertions have their own timeout (5 s by default): a loaded CI machine needs more
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    page.goto(url)
    try:
        yield page
    finally:
        context.close()


def save_screenshot(page: Any, name: str) -> None:
    """Keep a screenshot when ``MMGPT_SCREENSHOT_DIR`` is set (for debugging failures)."""
    target = os.environ.get("MMGPT_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="session")
def demo_helpers() -> SimpleNamespace:
    """The helpers alone, for tests that bring their own model (test modules cannot import
    this conftest under ``--import-mode=importlib``)."""
    return SimpleNamespace(
        circle_image=circle_image,
        launched=launched,
        page_of=page_of,
        save_screenshot=save_screenshot,
    )


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path, demo_helpers: SimpleNamespace) -> SimpleNamespace:
    """What the tests need to know about the tiny model, and the helpers."""
    return SimpleNamespace(
        dir=tiny_model_dir,
        image_question=IMAGE_QUESTION,
        text_question=TEXT_QUESTION,
        answer=ANSWER,
        draw_prompt=DRAW_PROMPT,
        adapter=ADAPTER,
        **vars(demo_helpers),
    )
