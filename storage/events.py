"""Archive events: later work (processing, callbacks, routing, workitems) subscribes
here instead of touching the ingest path."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("dicomnode.events")


@dataclass(frozen=True)
class InstanceStored:
    result: Any  # storage.archive.StoreResult
    source: Any  # storage.archive.Source
    new_study: bool


@dataclass(frozen=True)
class StudyStable:
    study_uid: str


class EventBus:
    """Synchronous fan-out: subscribers run in the emitting thread and must be quick
    (queue long work). A failing subscriber is logged and never fails the emitter."""

    def __init__(self) -> None:
        self._subscribers: dict[type, list[Callable[[Any], None]]] = {}
        self._lock = threading.Lock()

    def subscribe(self, event_type: type, callback: Callable[[Any], None]) -> Callable[[], None]:
        with self._lock:
            self._subscribers.setdefault(event_type, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.get(event_type, []).remove(callback)

        return unsubscribe

    def emit(self, event: Any) -> None:
        with self._lock:
            callbacks = list(self._subscribers.get(type(event), ()))
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                log.exception("subscriber %r failed on %s", callback, type(event).__name__)
