"""Counters and gauges rendered in the Prometheus text format for ``/metrics``."""
from __future__ import annotations

import threading
from typing import Callable

_HELP = {
    "dicomnode_associations_total": ("counter", "DIMSE associations by outcome"),
    "dicomnode_associations_active": ("gauge", "DIMSE associations open now"),
    "dicomnode_dimse_requests_total": ("counter", "DIMSE requests by service and status"),
    "dicomnode_instances_stored_total": ("counter", "Instances stored, by way in"),
    "dicomnode_bytes_stored_total": ("counter", "Bytes stored, by way in"),
    "dicomnode_ingest_failures_total": ("counter", "Instances refused, by reason"),
    "dicomnode_http_requests_total": ("counter", "HTTP requests by route family and status"),
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def add(self, name: str, amount: float, **labels: str) -> None:
        self.inc(name, amount, **labels)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is read when metrics are rendered."""
        self._gauges[name] = read

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def counters(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A copy of every counter, keyed by (name, sorted labels)."""
        with self._lock:
            return dict(self._values)

    def render(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        lines: list[str] = []
        seen: set[str] = set()

        def header(name: str, default_type: str) -> None:
            if name in seen:
                return
            seen.add(name)
            mtype, text = _HELP.get(name, (default_type, name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {mtype}")

        for (name, labels), value in items:
            header(name, "counter")
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
        for name, read in sorted(self._gauges.items()):
            header(name, "gauge")
            lines.append(f"{name} {read():g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
