"""The preferences app's store: judged pairs land in a JSONL that mmgpt's preference reader
loads; the count and the pending pair survive a restart; nothing is lost or doubled."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from demos.preference_store import PendingPair, PreferenceStore, StaleChoiceError
from mmgpt.data.preference import PreferenceDataset


def pair(prompt: str = "what colour?", answers=("red", "blue"), image=None) -> PendingPair:
    return PendingPair(prompt=prompt, answers=list(answers), seeds=[1, 2], image=image)


def test_judged_pairs_are_preference_data_with_images(tmp_path: Path) -> None:
    store = PreferenceStore(tmp_path, model_name="tiny")
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    relative = store.save_image(image)
    assert store.save_image(image.copy()) == relative  # saved once per content
    first = pair("<image>\nwhat colour?", image=relative)
    store.set_pending(first)
    assert store.judge(first.id, "B") == 1
    second = pair("what is this?", ("a circle", "a square"))
    store.set_pending(second)
    assert store.judge(second.id, "A") == 2
    store.set_pending(third := pair("skip me", ("x", "y")))
    assert store.judge(third.id, "skip") == 2 and store.skipped == 1

    data = PreferenceDataset(tmp_path / "preferences.jsonl", strict=True)
    assert len(data) == 2
    a, b = data[0], data[1]
    assert (a.prompt, a.chosen, a.rejected) == ("<image>\nwhat colour?", "blue", "red")
    assert len(a.images) == 1 and a.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert (b.prompt, b.chosen, b.rejected, b.images) == (
        "what is this?",
        "a circle",
        "a square",
        [],
    )
    rows = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    assert rows[0]["seeds"] == {"chosen": 2, "rejected": 1} and rows[0]["model"] == "tiny"


def test_progress_and_pending_pair_survive_a_restart(tmp_path: Path) -> None:
    store = PreferenceStore(tmp_path)
    done = pair()
    store.set_pending(done)
    store.judge(done.id, "A")
    waiting = pair("still waiting", ("one", "two"))
    store.set_pending(waiting)

    reopened = PreferenceStore(tmp_path)
    assert reopened.count == 1
    assert reopened.pending == waiting
    with pytest.raises(StaleChoiceError, match="no longer waiting"):
        reopened.judge(done.id, "A")  # an old pair id (a stale tab) records nothing
    assert reopened.judge(waiting.id, "A") == 2 and reopened.pending is None
    assert PreferenceStore(tmp_path).count == 2


def test_a_crash_between_append_and_state_update_loses_and_doubles_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PreferenceStore(tmp_path)
    p = pair()
    store.set_pending(p)

    def crash() -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store, "_write_state", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.judge(p.id, "A")  # the line is written, the state still names the pair
    assert json.loads((tmp_path / "state.json").read_text())["pending"]["id"] == p.id
    reopened = PreferenceStore(tmp_path)
    assert reopened.count == 1 and reopened.pending is None  # not offered a second time


def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next(tmp_path: Path) -> None:
    store = PreferenceStore(tmp_path)
    (tmp_path / "preferences.jsonl").write_bytes(b'{"prompt": "half a li')
    p = pair()
    store.set_pending(p)
    store.judge(p.id, "A")
    with pytest.warns(RuntimeWarning, match="skipped 1 unusable"):
        data = PreferenceDataset(tmp_path / "preferences.jsonl")
    assert len(data) == 1 and data[0].chosen == "red"
    assert len(data.problems) == 1 and data.problems[0].line == 1


def test_concurrent_judgements_of_one_pair_record_it_once(tmp_path: Path) -> None:
    stores = [PreferenceStore(tmp_path) for _ in range(2)]  # e.g. two server processes
    p = pair()
    stores[0].set_pending(p)
    outcomes: list[str] = []

    def judge(store: PreferenceStore) -> None:
        try:
            store.judge(p.id, "A")
            outcomes.append("recorded")
        except StaleChoiceError:
            outcomes.append("stale")

    threads = [threading.Thread(target=judge, args=(s,)) for s in stores * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["recorded"] + ["stale"] * 7
    assert PreferenceStore(tmp_path).count == 1


def test_identical_answers_can_only_be_skipped(tmp_path: Path) -> None:
    store = PreferenceStore(tmp_path)
    same = pair(answers=("red", "red"))
    store.set_pending(same)
    with pytest.raises(ValueError, match="identical"):
        store.judge(same.id, "A")
    assert store.judge(same.id, "skip") == 0


def test_each_session_has_its_own_pending_pair(tmp_path: Path, monkeypatch) -> None:
    from dataclasses import asdict

    import demos.preference_store as preference_store

    store = PreferenceStore(tmp_path)
    mine, theirs = pair("mine"), pair("theirs")
    store.set_pending(mine, "browser:1")
    store.set_pending(theirs, "browser:2")  # leaves browser 1's pair waiting
    assert store.snapshot("browser:1")[2] == mine and store.snapshot("browser:2")[2] == theirs
    assert store.pending is None  # the default session has none
    newer = pair("mine, again")
    store.set_pending(newer, "browser:1")  # replaces only browser 1's own pair
    with pytest.raises(StaleChoiceError):
        store.judge(mine.id, "A")
    assert store.judge(theirs.id, "A") == 1  # judged by id, whoever asks
    assert PreferenceStore(tmp_path).waiting() == [newer]  # survives a restart

    monkeypatch.setattr(preference_store, "MAX_PENDING", 3)
    for i in range(5):
        store.set_pending(pair(f"p{i}"), f"api:{i}")
    assert [p.prompt for p in store.waiting()] == ["p2", "p3", "p4"]  # the oldest dropped

    # a version-1 state file (one pending pair) is the default session's
    old = tmp_path / "old"
    old.mkdir()
    waiting = pair("from version 1")
    state = {"version": 1, "pending": asdict(waiting), "skipped": 2}
    (old / "state.json").write_text(json.dumps(state))
    reopened = PreferenceStore(old)
    assert (reopened.pending, reopened.skipped) == (waiting, 2)
