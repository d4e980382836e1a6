"""The preferences app: judging in Chromium writes preference data; progress and the pending
pair survive a page reload and a server restart; the API samples, judges and reports."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("gradio")

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from mmgpt.data.preference import PreferenceDataset

HOT = {"temperature": 2.0, "top_p": 1.0, "max_new_tokens": 8}  # two seeds, two answers


def _set(page, label: str, value: str) -> None:
    field = page.get_by_label(label)
    field.fill(value)
    field.press("Tab")


def test_judging_in_the_browser_survives_reload_and_restart(browser, tiny, tmp_path) -> None:
    from playwright.sync_api import expect

    data = tmp_path / "prefs"
    with (
        tiny.launched(tiny.dir, "preferences", data_dir=data) as app,
        tiny.page_of(browser, app.local_url) as page,
    ):
        progress = page.locator("#progress")
        expect(progress).to_contain_text("0 pairs recorded")
        page.locator("#prompt textarea").fill("tell me a story")
        _set(page, "number input for Temperature", "2")
        _set(page, "number input for Top-p", "1")
        _set(page, "number input for Max new tokens", "8")
        _set(page, "Seed", "5")
        page.click("#sample")
        expect(page.locator("#pending")).to_contain_text("seeds 5 (A) and 6 (B)")
        answer_a = page.locator("#a textarea").input_value()
        assert answer_a != page.locator("#b textarea").input_value()
        tiny.save_screenshot(page, "preferences")
        page.click("#choose-a")
        expect(progress).to_contain_text("1 pair recorded")

        page.click("#sample")  # a second pair, left pending
        expect(progress).to_contain_text("1 pair waiting")
        pending_b = page.locator("#b textarea").input_value()
        page.reload()
        expect(progress).to_contain_text("1 pair recorded")
        expect(page.locator("#b textarea")).to_have_value(pending_b)
        assert page.external == []
    with tiny.launched(tiny.dir, "preferences", data_dir=data) as app:  # a new server
        client = Client(app.local_url, verbose=False)
        state = client.predict(api_name="/progress")
        assert state["count"] == 1 and state["pending"]["answers"][1] == pending_b
        progress = client.predict(state["pending"]["id"], "B", api_name="/judge")
        assert re.match(r"\*\*2\*\* pairs recorded · 0 skipped", progress)
    pairs = PreferenceDataset(data / "preferences.jsonl", strict=True)
    assert (pairs[0].prompt, pairs[0].chosen) == ("tell me a story", answer_a)
    assert pairs[1].chosen == pending_b


def test_api_samples_pairs_with_images_and_refuses_bad_input(tiny, tmp_path) -> None:
    image = tmp_path / "circle.png"
    tiny.circle_image(64).save(image)
    with tiny.launched(tiny.dir, "preferences", data_dir=tmp_path / "prefs") as app:
        client = Client(app.local_url, verbose=False)
        message = {"text": "what shape is it?", "files": [handle_file(str(image))]}
        a, b, pair_id, _ = client.predict(message, seed=1, api_name="/sample_pair", **HOT)
        assert a != b
        client.predict(pair_id, "B", api_name="/judge")
        with pytest.raises(AppError, match="no longer waiting for a judgement"):
            client.predict(pair_id, "A", api_name="/judge")  # already judged
        with pytest.raises(AppError, match=r"^The prompt is empty: type a prompt"):
            client.predict({"text": "", "files": []}, api_name="/sample_pair")
        with pytest.raises(AppError, match="With temperature 0 both answers would be the same"):
            client.predict({"text": "hi", "files": []}, 0.0, api_name="/sample_pair")
        (tmp_path / "notes.txt").write_text("text")
        with pytest.raises(AppError, match=r"^'notes.txt' is not an image"):
            notes = {"text": "hi", "files": [handle_file(str(tmp_path / "notes.txt"))]}
            client.predict(notes, api_name="/sample_pair")
    [pair] = PreferenceDataset(tmp_path / "prefs" / "preferences.jsonl", strict=True)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("<image>\nwhat shape is it?", b, a)
    assert pair.images[0].size == (64, 64)  # the prompt image, saved next to the JSONL
