"""A handler's progress reports, coalesced: at most one write per interval, the last one kept."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

Write = Callable[[int | None, str | None], Awaitable[None]]


class Progress:
    """Merges reports in memory (the highest value and the latest message win) and writes them at
    most once per ``interval_s``; :meth:`close` hands what was not yet written to the attempt's
    final write, so the last report is never lost. Reports may come from a sync handler's thread."""

    def __init__(self, interval_s: float, write: Write, spawn: Callable[[Any], object]) -> None:
        self._interval_s = interval_s
        self._write_out = write
        self._spawn = spawn
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._progress: int | None = None
        self._message: str | None = None
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._writing = False
        self._last_write = 0.0
        self._closed = False

    def report(self, progress: int | None, message: str | None) -> None:
        if threading.get_ident() == self._loop_thread:
            self._merge(progress, message)
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._merge, progress, message)

    def _merge(self, progress: int | None, message: str | None) -> None:
        if self._closed:
            return
        if progress is not None:
            self._progress = progress if self._progress is None else max(self._progress, progress)
        if message is not None:
            self._message = message
        self._dirty = True
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and not self._writing and self._dirty and not self._closed:
            delay = max(0.0, self._last_write + self._interval_s - time.monotonic())
            self._timer = self._loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._closed or not self._dirty:
            return
        self._dirty = False
        self._writing = True
        self._last_write = time.monotonic()
        self._spawn(self._write(self._progress, self._message))

    async def _write(self, progress: int | None, message: str | None) -> None:
        try:
            await self._write_out(progress, message)
        finally:
            self._writing = False
            self._schedule()

    def close(self) -> tuple[int | None, str | None]:
        """Stop writing; return the latest values, for the attempt's final write to carry."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._progress, self._message
