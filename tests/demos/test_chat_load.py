"""The chat under load: 20 gradio_client clients sending requests for a few seconds, with a
queue small enough to overflow. Every request is answered or refused with Gradio's
queue-full message, the server keeps serving, and the process's memory stays bounded."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

import mmgpt.demo

CLIENTS = 20
SECONDS = 4.0
QUEUE = 8  # 4 run at once, 8 wait: 20 clients overflow it
MAX_GROWTH_MB = 300
QUEUE_FULL = re.compile(r"^Queue is full")


def rss_mb() -> float:
    """The resident memory of this process (the server runs in it), in MB."""
    try:
        import psutil
    except ImportError:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024
    return psutil.Process().memory_info().rss / 2**20


def test_twenty_clients_are_answered_or_refused_and_memory_stays_bounded(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mmgpt.demo, "MAX_QUEUE", QUEUE)
    message = {"text": tiny.text_question, "files": []}
    image = tmp_path / "circle.png"
    tiny.circle_image(64).save(image)
    with_image = {"text": tiny.image_question, "files": [handle_file(str(image))]}
    settings = {"temperature": 0.0, "max_new_tokens": 12}
    with tiny.launched(tiny.dir, "chat") as app:
        clients = [Client(app.local_url, verbose=False) for _ in range(CLIENTS)]
        for client in clients[:2]:  # warm up: the first requests allocate what all reuse
            assert client.predict(message, api_name="/chat", **settings)[0] == tiny.answer
        before = rss_mb()
        answered, refused, wrong = [], [], []
        lock = threading.Lock()
        deadline = time.monotonic() + SECONDS

        def run(client: Client, i: int) -> None:
            while time.monotonic() < deadline:
                try:
                    ask = with_image if i % 2 else message  # half of them upload an image
                    reply, _ = client.predict(ask, api_name="/chat", seed=i, **settings)
                    outcome = answered if reply == tiny.answer else wrong
                    item: object = reply
                except (AppError, QueueError) as exc:
                    outcome = refused if QUEUE_FULL.match(str(exc)) else wrong
                    item = str(exc)
                    time.sleep(0.2)  # as a person (or a polite script) would before retrying
                except BaseException as exc:  # collected, so one failure does not hang the test
                    outcome, item = wrong, repr(exc)
                with lock:
                    outcome.append(item)

        threads = [threading.Thread(target=run, args=(c, i)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        growth = rss_mb() - before
        assert wrong == [], wrong[:5]
        # 2 CPU cores answer a few per second; the rest wait or are refused
        assert len(answered) >= 8, (len(answered), len(refused))
        # still serving after the burst
        assert clients[0].predict(message, api_name="/chat", **settings)[0] == tiny.answer
    print(f"answered {len(answered)}, refused {len(refused)}, RSS +{growth:.0f} MB")
    assert growth < MAX_GROWTH_MB, f"RSS grew by {growth:.0f} MB"
