"""Temporary files of the demos stay bounded and go away: the chat's drawn images (at most
N files / M bytes, the oldest removed first; removed when the server closes or the process
exits) and Gradio's cache of uploads and outputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio")

from gradio_client import Client, handle_file

from demos.chat import ChatApp
from demos.common import ImageFolder


def image(value: int, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), (value, 0, 0))


def wait_until_gone(*paths: Path, timeout: float = 15.0) -> list[Path]:
    """The paths still there after ``timeout`` seconds (the server shuts down in a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.exists() for p in paths):
        time.sleep(0.1)
    return [p for p in paths if p.exists()]


def test_image_folder_keeps_the_newest_files_within_its_bounds(tmp_path: Path) -> None:
    folder = ImageFolder(max_files=3)
    saved = [Path(folder.save(image(i))) for i in range(5)]
    assert sorted(folder.directory.iterdir()) == sorted(saved[2:])  # the two oldest went
    one = saved[-1].stat().st_size
    by_bytes = ImageFolder(max_bytes=2 * one + one // 2)
    saved = [Path(by_bytes.save(image(i))) for i in range(4)]
    assert sorted(by_bytes.directory.iterdir()) == sorted(saved[2:])
    directory = folder.directory
    folder.close()
    assert not directory.exists()

    given = tmp_path / "given"
    given.mkdir()
    (given / "mine.txt").write_text("not the app's")
    app_folder = ImageFolder(given)
    app_folder.save(image(1))
    app_folder.close()  # a folder the caller gave stays, with the caller's files
    assert [p.name for p in given.iterdir()] == ["mine.txt"]
    with pytest.raises(ValueError, match="max_files and max_bytes must be positive"):
        ImageFolder(max_files=0)


def test_the_chat_bounds_its_drawn_images(demo_model, tiny, tmp_path: Path) -> None:
    class Drawing:  # streams one drawn image per answer
        def __getattr__(self, name):
            return getattr(demo_model, name)

        def stream_reply(self, turns, images, settings, seed, adapter="none"):
            yield image(seed % 256)

    app = ChatApp(Drawing(), image_dir=tmp_path, max_files=2)
    history = [{"role": "user", "content": [tiny.draw_prompt]}]
    drawn = [list(app.respond(history, 0.7, 0.9, 8, 3.0, 2, s, "none"))[-1] for s in range(3)]
    newest = [Path(h[-1]["content"][0]["path"]) for h in drawn[1:]]
    assert sorted(tmp_path.iterdir()) == sorted(newest)


def test_the_folder_is_removed_at_exit(tmp_path: Path) -> None:
    code = """
        from PIL import Image
        from demos.common import ImageFolder

        folder = ImageFolder(prefix="mmgpt-chat-")  # as the chat makes it; never closed
        print(folder.save(Image.new("RGB", (4, 4))))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    drawn = Path(result.stdout.strip().splitlines()[-1])
    assert drawn.name.endswith(".png") and drawn.parent.name.startswith("mmgpt-chat-")
    assert not drawn.parent.exists()


def test_closing_the_app_removes_drawn_images_and_uploads(tiny, tmp_path: Path) -> None:
    from gradio.utils import get_upload_folder

    from demos.ui import closers

    upload = tmp_path / f"upload-{uuid.uuid4().hex}.png"
    tiny.circle_image(64).save(upload)
    with tiny.launched(tiny.dir, "chat") as app:
        [close] = closers(app)
        chat_dir = close.__self__.image_dir
        client = Client(app.local_url, verbose=False)
        reply, images = client.predict(
            {"text": tiny.draw_prompt, "files": []}, api_name="/chat", steps=2, seed=1
        )
        assert len(images) == 1 and len(list(chat_dir.iterdir())) == 1
        reply, _ = client.predict(
            {"text": tiny.image_question, "files": [handle_file(str(upload))]},
            api_name="/chat",
            temperature=0.0,
        )
        assert reply == tiny.answer
        [cached] = Path(get_upload_folder()).rglob(upload.name)  # Gradio's copy of the upload
    assert wait_until_gone(chat_dir, cached) == []
