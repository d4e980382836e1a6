"""Screenshots of the three apps for the documentation (``docs/img/``), taken with Playwright.

    python -m demos.screenshots [--model DIR] [--out docs/img] [--chromium /usr/bin/chromium]

Each app is served on a free localhost port, driven through one typical interaction with the
shipped example images, and captured. Needs Playwright and a Chromium (Debian's ``chromium``
package works; no browser download is attempted).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(page: Any) -> None:
    from demos.examples import CHAT_EXAMPLES, examples_dir

    box = page.locator("#message textarea")
    bot = page.locator("#chatbot [data-testid=bot]")
    for i, example in enumerate((CHAT_EXAMPLES[1], CHAT_EXAMPLES[3])):
        if example.image:
            page.set_input_files("#message input[type=file]", str(examples_dir() / example.image))
            page.locator("#message img").first.wait_for()
        box.fill(example.text)
        box.press("Enter")
        bot.nth(i).wait_for()
        page.wait_for_function(  # the answer is complete when the progress text is gone
            "() => !document.querySelector('#chatbot').innerText.includes('processing')"
        )
    bot.last.locator("img").wait_for()
    page.wait_for_timeout(500)


def _text_to_image(page: Any) -> None:
    from demos.examples import DRAW_EXAMPLES

    page.fill("#prompt textarea", DRAW_EXAMPLES[0])
    page.get_by_label("Seed").fill("1")
    page.get_by_label("Seed").press("Tab")
    page.click("#draw")
    page.locator("#gallery img").nth(3).wait_for()


def _preferences(page: Any) -> None:
    from demos.examples import CHAT_EXAMPLES, examples_dir

    page.set_input_files("#prompt input[type=file]", str(examples_dir() / CHAT_EXAMPLES[2].image))
    page.locator("#prompt img").first.wait_for()
    page.locator("#prompt textarea").fill("Describe the image.")
    page.get_by_label("Seed").fill("3")
    page.get_by_label("Seed").press("Tab")
    page.click("#sample")
    page.locator("#pending").get_by_text("seeds").wait_for()
    page.locator("#pending-image img").wait_for()


SCENES = {"chat": _chat, "text_to_image": _text_to_image, "preferences": _preferences}


def take_screenshots(
    model_dir: str | Path | None = None,
    out: str | Path = "docs/img",
    chromium: str = "/usr/bin/chromium",
) -> list[Path]:
    """Serve each app, drive it, and save ``<out>/<app>.png``; returns the paths."""
    from playwright.sync_api import sync_playwright

    from mmgpt.demo import launch_demo

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as data, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for app, scene in SCENES.items():
                blocks = launch_demo(
                    model_dir,
                    port=_free_port(),
                    app=app,
                    data_dir=data,
                    prevent_thread_lock=True,
                    quiet=True,
                )
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 860})
                    page.set_default_timeout(TIMEOUT_MS)
                    page.goto(blocks.local_url)
                    page.locator("textarea").first.wait_for()
                    scene(page)
                    page.evaluate("window.scrollTo(0, 0)")
                    page.wait_for_timeout(300)
                    path = out / f"{app}.png"
                    page.screenshot(path=str(path))
                    written.append(path)
                    page.close()
                finally:
                    blocks.close()
        finally:
            browser.close()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demos.screenshots", description=__doc__)
    parser.add_argument("--model", metavar="DIR", help="model directory (default: shipped)")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    for path in take_screenshots(args.model, args.out, args.chromium):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
