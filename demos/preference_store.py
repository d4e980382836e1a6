"""Where the preferences app keeps its work: a preference JSONL, its images and the pending pair.

A directory holds::

    preferences.jsonl   one judged pair per line, the format mmgpt.data.preference reads:
                        {"prompt", "image" (optional, relative path), "chosen", "rejected",
                         "pair_id", "seeds", "model", "created"}
    images/<sha>.png    the prompts' images, named by content (saved once)
    state.json          the pairs waiting for a judgement (one per session), and the count
                        of skipped pairs

Each session (a browser, an API client) has its own pending pair: sampling replaces only the
caller's pair, and any pending pair can be judged by its id (an unguessable uuid), so two
people labelling at once do not undo each other's work. At most ``MAX_PENDING`` pairs wait;
beyond that the oldest is dropped.

Nothing is lost across page reloads, server restarts or crashes:

* a judgement is appended as one line (append mode, flush, ``fsync``), under a lock held by
  one writer at a time (a thread lock plus ``flock`` on ``.lock`` across processes);
* a line cut short by a crash is closed off with a newline before the next append, so it
  cannot swallow the next pair (the reader reports it as a bad line);
* ``state.json`` is replaced atomically (temp file + rename); if a crash comes between the
  append and the state update, the pending pair is found in the JSONL on the next start and
  not offered again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.files import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

try:  # POSIX: a file lock also keeps a second server process from interleaving writes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

JSONL_NAME = "preferences.jsonl"
STATE_NAME = "state.json"
IMAGE_DIR = "images"
STATE_VERSION = 2  # 1: a single "pending" pair; read as the default session's
CHOICES = ("A", "B", "skip")
# Pending pairs kept at once: every API client is a session, so this must be bounded.
MAX_PENDING = 256
DEFAULT_OWNER = ""  # the session of callers that name none (and of version-1 state files)


class StaleChoiceError(ValueError):
    """A judgement for a pair that is no longer the pending one (judged in another tab)."""


@dataclass
class PendingPair:
    """Two answers to one prompt, waiting for a judgement."""

    prompt: str
    answers: list[str]  # [A, B]
    seeds: list[int]
    image: str | None = None  # relative to the directory
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def identical(self) -> bool:
        return self.answers[0] == self.answers[1]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PendingPair:
        return cls(
            prompt=str(data["prompt"]),
            answers=[str(a) for a in data["answers"]],
            seeds=[int(s) for s in data["seeds"]],
            image=data.get("image"),
            id=str(data["id"]),
            created=str(data.get("created", "")),
        )


class PreferenceStore:
    """The preference JSONL of ``directory``, with its images and pending pair.

    Args:
        directory: created if missing.
        model_name: written with each pair (``"model"``), to tell data sources apart.
    """

    def __init__(self, directory: str | os.PathLike, *, model_name: str | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.directory / JSONL_NAME
        self.state_path = self.directory / STATE_NAME
        self.model_name = model_name
        self._lock = threading.Lock()
        self._count = self._skipped = 0
        # owner → pending pair, oldest first; the default owner's pair is state.json's
        # "pending" (as in version 1), the others its "sessions"
        self._pairs: dict[str, PendingPair] = {}
        self._seen_size = -1  # JSONL size at the last count
        self._recorded_ids: set[str] = set()
        with self._writer():
            self._refresh()

    # -- reading ------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Pairs recorded in the JSONL (by this store, another process, or before)."""
        return self.snapshot()[0]

    @property
    def skipped(self) -> int:
        return self.snapshot()[1]

    @property
    def pending(self) -> PendingPair | None:
        """The default session's pending pair."""
        return self.snapshot()[2]

    def snapshot(self, owner: str = DEFAULT_OWNER) -> tuple[int, int, PendingPair | None]:
        """``(recorded pairs, skipped pairs, owner's pending pair)`` as on disk now."""
        with self._writer():
            self._refresh()
            return self._count, self._skipped, self._pairs.get(owner)

    def waiting(self) -> list[PendingPair]:
        """Every session's pending pair, oldest first."""
        with self._writer():
            self._refresh()
            return list(self._pairs.values())

    def _refresh(self) -> None:
        """Re-read the state and (when the file changed) the count; the lock is held."""
        state = self._read_state()
        self._skipped = int(state.get("skipped", 0))
        sessions = state.get("sessions")
        raw = dict(sessions) if isinstance(sessions, dict) else {}
        if state.get("pending"):
            raw[DEFAULT_OWNER] = state["pending"]
        self._pairs = {}
        for owner, data in raw.items():
            try:
                self._pairs[str(owner)] = PendingPair.from_dict(data)
            except (KeyError, TypeError, ValueError):
                continue  # one damaged entry must not cost the other sessions their pairs
        size = self.jsonl.stat().st_size if self.jsonl.is_file() else 0
        if size != self._seen_size:
            self._count, self._recorded_ids = self._scan()
            self._seen_size = size
        recorded = [o for o, pair in self._pairs.items() if pair.id in self._recorded_ids]
        if recorded:
            # judged, then the server stopped before the state was updated
            for owner in recorded:
                del self._pairs[owner]
            self._write_state()

    def image_path(self, pair: PendingPair) -> Path | None:
        return self.directory / pair.image if pair.image else None

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # keep the broken file for inspection; the JSONL (the data) is not affected
            broken = self.state_path.with_suffix(f".broken-{int(time.time())}.json")
            self.state_path.replace(broken)
            import logging

            logging.getLogger("mmgpt.demo").warning(
                "%s was unreadable (%s); moved to %s", self.state_path, exc, broken.name
            )
            return {}
        return state if isinstance(state, dict) else {}

    def _scan(self) -> tuple[int, set[str]]:
        """Count the complete pairs of the JSONL and collect their ids."""
        count, ids = 0, set()
        if not self.jsonl.is_file():
            return 0, ids
        with self.jsonl.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "chosen" in row and "rejected" in row:
                    count += 1
                    if isinstance(row.get("pair_id"), str):
                        ids.add(row["pair_id"])
        return count, ids

    # -- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        with self._lock:
            if fcntl is None:
                yield
                return
            with open(self.directory / ".lock", "a+b") as lock_file:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _write_state(self) -> None:
        default = self._pairs.get(DEFAULT_OWNER)
        state = {
            "version": STATE_VERSION,
            "pending": asdict(default) if default else None,
            "sessions": {o: asdict(p) for o, p in self._pairs.items() if o != DEFAULT_OWNER},
            "skipped": self._skipped,
        }
        atomic_write_bytes(self.state_path, (json.dumps(state, indent=1) + "\n").encode())

    def save_image(self, image: Image.Image) -> str:
        """Save a prompt image as PNG (once per content); returns its relative path."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        relative = f"{IMAGE_DIR}/{hashlib.sha256(data).hexdigest()[:20]}.png"
        path = self.directory / relative
        if not path.is_file():
            atomic_write_bytes(path, data)
        return relative

    def set_pending(self, pair: PendingPair, owner: str = DEFAULT_OWNER) -> None:
        """Make ``pair`` the one waiting for ``owner``'s judgement (replacing the owner's
        previous pair; other sessions' pairs stay)."""
        with self._writer():
            self._refresh()
            self._pairs.pop(owner, None)  # re-inserted last: the newest
            self._pairs[owner] = pair
            while len(self._pairs) > MAX_PENDING:
                del self._pairs[next(iter(self._pairs))]
            self._write_state()

    def judge(self, pair_id: str, choice: str) -> int:
        """Record the judgement of the pending pair ``pair_id``: ``"A"`` or ``"B"`` is the
        better answer, ``"skip"`` drops the pair. Returns the number of recorded pairs."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        with self._writer():
            self._refresh()
            owner = next((o for o, p in self._pairs.items() if p.id == pair_id), None)
            pair = self._pairs.get(owner) if owner is not None else None
            if pair is None:
                raise StaleChoiceError(
                    "This pair is no longer waiting for a judgement (it was judged or "
                    "replaced, perhaps in another tab); the page now shows the current one."
                )
            if choice == "skip":
                self._skipped += 1
            else:
                if pair.identical:
                    raise ValueError(
                        "The two answers are identical, so neither is better: skip this pair."
                    )
                better = 0 if choice == "A" else 1
                self._append(self._row(pair, better))
                self._count += 1
                self._recorded_ids.add(pair.id)
                self._seen_size = self.jsonl.stat().st_size
            del self._pairs[owner]
            self._write_state()
            return self._count

    def _row(self, pair: PendingPair, better: int) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": pair.prompt}
        if pair.image:
            row["image"] = pair.image
        row.update(
            chosen=pair.answers[better],
            rejected=pair.answers[1 - better],
            pair_id=pair.id,
            seeds={"chosen": pair.seeds[better], "rejected": pair.seeds[1 - better]},
            created=pair.created,
        )
        if self.model_name:
            row["model"] = self.model_name
        return row

    def _append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.jsonl, "ab") as f:
            if f.tell() > 0 and not self._ends_with_newline():
                f.write(b"\n")  # a line cut short by a crash must not swallow this one
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.jsonl, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


__all__ = [
    "CHOICES",
    "DEFAULT_OWNER",
    "JSONL_NAME",
    "MAX_PENDING",
    "STATE_NAME",
    "PendingPair",
    "PreferenceStore",
    "StaleChoiceError",
]
