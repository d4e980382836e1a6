"""The error every dataset reader raises for unusable input.

It lives in a module of its own so that image loading and record reading can both raise it
without importing each other.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Unusable dataset input; the message names the file (and line) to fix.

    ``file``, ``line`` and ``reason`` repeat the location and category when known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.file, self.line, self.reason = file, line, reason
