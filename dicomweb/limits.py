"""Plans, per-plan rate limits and monthly quotas.

The rate limit applies to every call an API key makes (the auth middleware asks
:class:`RateLimiter`). The middleware counts every authenticated call against its owner
(the developer, else the credential) in the identity store, so counters survive a
restart; a family meters a route with :func:`monthly_quota`, which reads that count.
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from aiohttp import web

from .auth import Handler, principal
from .keys import ARCHIVE, EXECUTOR

MONTHLY_QUOTA = 1000  # seed 003: calls a month per developer on /api/dicom/read/file/


@dataclass(frozen=True)
class Plan:
    name: str
    requests_per_minute: int | None  # None: unlimited
    max_study_bytes: int | None  # None: unlimited (seed 000)


PLANS = {
    "developer": Plan("developer", 60, 500 * 1024**2),
    "professional": Plan("professional", 600, 4 * 1024**3),
    "enterprise": Plan("enterprise", None, None),
}


def plan(name: str | None) -> Plan | None:
    return PLANS.get(name) if name else None


class RateLimiter:
    """Sliding one-minute window per credential. Thread-safe: with worker processes
    (cli/workers.py) the serving process's limiters answer for all of them."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._calls: dict[str, deque[float]] = {}
        self._checks = 0
        self._lock = threading.Lock()

    SWEEP_EVERY = 4096  # calls between sweeps of idle credentials (keeps memory bounded)

    def retry_after(self, credential: str, per_window: int | None) -> int | None:
        """Seconds to wait when this call is over the limit (not counted), else None (counted)."""
        if per_window is None:
            return None
        with self._lock:
            return self._retry_after(credential, per_window)

    def _retry_after(self, credential: str, per_window: int) -> int | None:
        now = self.clock()
        self._checks += 1
        if self._checks % self.SWEEP_EVERY == 0:
            self._sweep(now)
        calls = self._calls.setdefault(credential, deque())
        while calls and calls[0] <= now - self.window_s:
            calls.popleft()
        if len(calls) >= per_window:
            return max(1, math.ceil(calls[0] + self.window_s - now))
        calls.append(now)
        return None

    def _sweep(self, now: float) -> None:
        idle = [name for name, calls in self._calls.items() if not calls or calls[-1] <= now - self.window_s]
        for name in idle:
            del self._calls[name]

    def tracked(self) -> int:
        return len(self._calls)


def monthly_quota(limit: int = MONTHLY_QUOTA) -> Callable[[Handler], Handler]:
    """Refuse a route (429, seed 003 body) once the caller used it ``limit`` times this
    month. Put it under :func:`requires`; refused calls count too, as the seed shows.
    Concurrent calls may overshoot by how many run at once (the count is read before the
    handler and written with the audit row after it)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def metered(request: web.Request) -> web.StreamResponse:
            owner = principal(request).usage_owner
            if owner is None:  # [auth] required = false: nobody to count against
                return await handler(request)
            route = request.match_info.route.resource.canonical
            store = request.app[ARCHIVE].identity
            used = await asyncio.get_running_loop().run_in_executor(
                request.app[EXECUTOR], store.month_usage, owner, route) + 1  # this call counts too
            if used > limit:
                body = {"error": f"Monthly API request for '{route}' limit exceeded.", "quota": limit,
                        "requests_used": used}
                raise web.HTTPTooManyRequests(
                    text=json.dumps(body), content_type="application/json",
                    headers={"Retry-After": str(seconds_to_next_month())},
                )
            return await handler(request)

        return metered

    return wrap


def seconds_to_next_month(now: float | None = None) -> int:
    today = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    first = datetime(today.year + today.month // 12, today.month % 12 + 1, 1, tzinfo=timezone.utc)
    return max(1, math.ceil(first.timestamp() - today.timestamp()))
