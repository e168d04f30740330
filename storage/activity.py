"""Requests being served, so that background work can stand back for them."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator


class Foreground:
    """Counts the requests and associations being served (HTTP handlers, DIMSE
    associations). Background work (the metadata prefill) works at a low duty while
    :meth:`busy`: in one interpreter its CPU time is taken from the requests' (the GIL)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._last_end = 0.0

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        with self._lock:
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)
            self._last_end = time.monotonic()

    def busy(self, quiet_s: float = 0.1) -> bool:
        """Something is being served, or was less than ``quiet_s`` ago."""
        return self._active > 0 or time.monotonic() - self._last_end < quiet_s
