"""The text-to-image app: a gallery of images captioned with their seeds, in Chromium and
through ``/draw``; an image is reproducible from its seed."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

pytest.importorskip("gradio")

from gradio_client import Client
from gradio_client.exceptions import AppError

from demos.common import Settings


@pytest.fixture(scope="module")
def outbound():
    """Every connection the process opens to a non-loopback address while the app runs."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and not (
            host.startswith("127.") or host in ("::1", "localhost")
        ):
            attempts.append(address)
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # a name lookup is the first step out
        if host not in (None, "localhost") and not str(host).startswith(("127.", "::1")):
            attempts.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo


@pytest.fixture(scope="module")
def t2i(tiny, outbound):
    with tiny.launched(tiny.dir, "text_to_image") as app:
        yield app


def test_gallery_in_the_browser(t2i, browser, tiny) -> None:
    from playwright.sync_api import expect

    with tiny.page_of(browser, t2i.local_url) as page:
        page.fill("#prompt textarea", tiny.draw_prompt)
        page.get_by_label("number input for Number of images").fill("3")
        page.get_by_label("number input for Diffusion steps").fill("3")
        page.get_by_label("Seed").fill("7")
        page.get_by_label("Seed").press("Tab")
        page.click("#draw")
        expect(page.locator("#gallery img")).to_have_count(3)
        for seed in (7, 8, 9):
            expect(page.locator("#gallery")).to_contain_text(f"seed {seed}")
        tiny.save_screenshot(page, "text_to_image")
        assert page.external == []


def test_draw_api_captions_seeds_and_reproduces(t2i, demo_model, tiny) -> None:
    client = Client(t2i.local_url, verbose=False)
    gallery = client.predict(tiny.draw_prompt, 2, 3.0, 3, 11, "none", api_name="/draw")
    assert [g["caption"] for g in gallery] == ["seed 11", "seed 12"]
    expected = demo_model.draw(tiny.draw_prompt, Settings(guidance=3.0, steps=3), 12)
    with Image.open(gallery[1]["image"]) as served:  # PNG: lossless
        assert served.convert("RGB").tobytes() == expected.tobytes()
    with pytest.raises(AppError, match=r"^The prompt is empty: describe what to draw\.$"):
        client.predict("   ", 2, 3.0, 3, 11, "none", api_name="/draw")


def test_nothing_reaches_for_the_network(t2i, outbound, tiny) -> None:
    # launch (analytics, version check, share tunnel) and a request: loopback only
    Client(t2i.local_url, verbose=False).predict(
        tiny.draw_prompt, 1, 3.0, 2, 0, "none", api_name="/draw"
    )
    assert outbound == []
