"""Where errands reads the time, so tests can control it."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    """A source of wall-clock time in seconds since the epoch."""

    def now(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to; for tests of leases, deadlines and retention."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for listener in list(self._listeners):
            listener()

    def on_advance(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs after each :meth:`advance` (timers waiting on this clock look again)."""
        self._listeners.append(listener)


def on_advance(clock: Clock, listener: Callable[[], None]) -> None:
    """Run ``listener()`` whenever a controlled clock is moved (the real one moves by itself)."""
    if isinstance(clock, ManualClock):
        clock.on_advance(listener)


_PREFIXES: dict[int, str] = {}


def iso_text(ts: float | None) -> str | None:
    """Format epoch seconds as ISO 8601 UTC with milliseconds (``2026-11-23T10:00:00.123Z``),
    the date-and-time part cached per second (see :data:`iso` for moments that recur)."""
    if ts is None:
        return None
    second, ms = divmod(int(ts * 1000), 1000)
    prefix = _PREFIXES.get(second)
    if prefix is None:
        if len(_PREFIXES) > 4096:
            _PREFIXES.clear()
        prefix = _PREFIXES[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{prefix}.{ms:03d}Z"


#: :func:`iso_text` with each moment's text cached: called for every timestamp of every event,
#: whose moments recur (a task's creation and expiry in all its events, a batch's in all its
#: tasks). Typed as the function it wraps (the cache's own type takes any hashable argument).
iso: Callable[[float | None], str | None] = functools.lru_cache(maxsize=4096)(iso_text)
