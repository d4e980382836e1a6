"""The preferences app: judging in Chromium writes preference data; progress and the pending
pair survive a page reload and a server restart; the API samples, judges and reports."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("gradio")

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from demos.examples import examples_dir
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
        # the browser's pair survived the restart, and another client cannot read it
        assert state["count"] == 1 and state["waiting"] == 1 and state["pending"] is None
        (waiting,) = json.loads((data / "state.json").read_text())["sessions"].values()
        assert waiting["answers"][1] == pending_b
        progress = client.predict(waiting["id"], "B", api_name="/judge")
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


def test_the_data_folder_is_neither_served_nor_named(browser, tiny, tmp_path) -> None:
    import httpx
    from playwright.sync_api import expect

    data = (tmp_path / "prefs").resolve()
    image = tmp_path / "circle.png"
    tiny.circle_image(64).save(image)
    with (
        tiny.launched(tiny.dir, "preferences", data_dir=data) as app,
        tiny.page_of(browser, app.local_url) as page,
    ):
        client = Client(app.local_url, verbose=False)
        message = {"text": "what shape is it?", "files": [handle_file(str(image))]}
        sampled = client.predict(message, seed=1, api_name="/sample_pair", **HOT)
        client.predict(sampled[2], "A", api_name="/judge")  # one recorded pair, with its image
        sampled = client.predict(message, seed=3, api_name="/sample_pair", **HOT)
        state = client.predict(api_name="/progress")
        assert state["count"] == 1 and state["jsonl"] == "preferences.jsonl"
        # the page shows a pending pair with its image: as pixels from Gradio's cache
        page.set_input_files("#prompt input[type=file]", str(image))
        page.locator("#prompt textarea").fill("and now?")
        page.click("#sample")
        shown = page.locator("#pending-image img")
        expect(shown).to_have_count(1)
        src = shown.get_attribute("src")
        html = page.content()

        secrets = [
            data / "state.json",
            data / "preferences.jsonl",
            data / state["pending"]["image"],
        ]
        assert all(path.is_file() for path in secrets)
        for path in secrets:
            response = httpx.get(f"{app.local_url}gradio_api/file={path}")
            assert response.status_code != 200, (path, response.status_code)
        # the same URL serves what is meant to be served: the examples
        example = next(p for p in examples_dir().iterdir() if p.suffix == ".png")
        assert httpx.get(f"{app.local_url}gradio_api/file={example}").status_code == 200
        response = httpx.get(f"{app.local_url}config")
        assert response.status_code == 200 and "mmgpt preferences" in response.text
        for text in (html, src, response.text, str(sampled), str(state)):
            assert str(data) not in text and str(tmp_path) not in text


def test_each_session_has_its_own_pending_pair(tiny, tmp_path) -> None:
    with tiny.launched(tiny.dir, "preferences", data_dir=tmp_path / "prefs") as app:
        one, two = (Client(app.local_url, verbose=False) for _ in range(2))
        first = one.predict(
            {"text": "tell me a story", "files": []}, seed=1, api_name="/sample_pair", **HOT
        )
        second = two.predict(
            {"text": "what is this?", "files": []}, seed=3, api_name="/sample_pair", **HOT
        )
        # a second user's sample leaves the first one's pair waiting
        assert one.predict(api_name="/progress")["pending"]["id"] == first[2]
        assert two.predict(api_name="/progress")["pending"]["id"] == second[2]
        one.predict(first[2], "A", api_name="/judge")
        third = one.predict({"text": "a poem", "files": []}, seed=5, api_name="/sample_pair", **HOT)
        assert two.predict(api_name="/progress")["waiting"] == 2
        two.predict(second[2], "B", api_name="/judge")  # one's new sample replaced only its own
        one.predict(third[2], "skip", api_name="/judge")
        state = one.predict(api_name="/progress")
        assert (state["count"], state["skipped"], state["pending"], state["waiting"]) == (
            2,
            1,
            None,
            0,
        )
    pairs = PreferenceDataset(tmp_path / "prefs" / "preferences.jsonl", strict=True)
    assert [(p.prompt, p.chosen) for p in pairs] == [
        ("tell me a story", first[0]),
        ("what is this?", second[1]),
    ]
