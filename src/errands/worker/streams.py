"""A handler's output streams: chunks buffered in memory and written in order, a few tens of
writes a second however many chunks the handler makes.

:class:`StreamBuffer` holds the rules (no I/O, times given by the caller); :class:`Streams`
drives it on the event loop for one attempt: it writes what the buffer says is due, one write at
a time, so every stream's chunks land in the order they were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from errands.context import DONE, StreamLimit
from errands.inputs import STREAM_NAME_PATTERN, BadValue, check_text
from errands.model.streams import MAX_STREAMS

#: A stream's name: what ``GET /v1/tasks/{id}/streams/{name}`` and the events call it.
STREAM_NAME = re.compile(STREAM_NAME_PATTERN)
#: The longest a sync handler's thread waits for room (the attempt may have ended meanwhile).
_THREAD_WAIT_S = 30.0


@dataclass(slots=True)
class Part:
    """Chunks of one stream to write together; ``index`` is the first one's position (from 0 in
    each attempt)."""

    name: str
    index: int
    chunks: list[Any] = field(default_factory=list)


def encode_chunk(name: str, chunk: Any) -> int:
    """The size of ``chunk`` as stored, once checked: a string, or any JSON value."""
    if not isinstance(name, str) or not STREAM_NAME.match(name):
        raise ValueError(
            "a stream name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    if isinstance(chunk, str):
        try:
            check_text(chunk, "A stream chunk")
        except BadValue as exc:
            raise ValueError(str(exc)) from None
    try:
        return len(orjson.dumps(chunk))
    except TypeError as exc:
        raise ValueError(f"a stream chunk must be a string or a JSON value: {exc}") from None


class StreamBuffer:
    """What to write, and when.

    * A chunk written after a quiet interval goes out at once (no added latency); while chunks
      keep coming, what arrived is written at most once per ``flush_s``.
    * ``flush_bytes`` waiting makes a write due at once (a burst is not held in memory).
    * Past ``max_bytes`` in all (per attempt) a chunk is refused with :class:`StreamLimit`, and so
      is every later one.
    """

    def __init__(self, *, flush_s: float, flush_bytes: int, max_bytes: int) -> None:
        self.flush_s = flush_s
        self.flush_bytes = flush_bytes
        self.max_bytes = max_bytes
        self.total_bytes = 0  # accepted so far, written or not
        self.pending_bytes = 0
        self._parts: dict[str, Part] = {}
        self._next_index: dict[str, int] = {}
        self._first_at: float | None = None  # when the oldest unwritten chunk came
        self._last_write_at: float | None = None
        self._full = False

    def add(self, name: str, chunk: Any, size: int, now: float) -> None:
        if self._full or self.total_bytes + size > self.max_bytes:
            self._full = True
            raise StreamLimit(self.max_bytes)
        if name not in self._next_index and len(self._next_index) >= MAX_STREAMS:
            raise ValueError(f"a task may write at most {MAX_STREAMS} streams")
        index = self._next_index.get(name, 0)
        self._next_index[name] = index + 1
        part = self._parts.get(name)
        if part is None:
            part = self._parts[name] = Part(name, index)
        part.chunks.append(chunk)
        self.total_bytes += size
        self.pending_bytes += size
        if self._first_at is None:
            self._first_at = now

    def due_at(self) -> float | None:
        """When the next write is due (``None``: nothing to write)."""
        if self._first_at is None:
            return None
        if self.pending_bytes >= self.flush_bytes or self._last_write_at is None:
            return self._first_at
        return max(self._first_at, self._last_write_at + self.flush_s)

    def take(self, now: float) -> list[Part]:
        """Everything not yet written, per stream, to write now."""
        parts = list(self._parts.values())
        self._parts = {}
        self.pending_bytes = 0
        self._first_at = None
        self._last_write_at = now
        return parts


Write = Callable[[list[Part]], Awaitable[None]]


class Streams:
    """Drives a :class:`StreamBuffer` for one attempt. Chunks may come from a sync handler's
    thread; a handler that makes chunks faster than they are written waits (``add`` returns an
    awaitable that is done once its chunk fits in the buffer again)."""

    def __init__(
        self,
        write: Write,
        spawn: Callable[[Any], object],
        *,
        flush_s: float,
        max_bytes: int,
        flush_bytes: int = 64 * 1024,
    ) -> None:
        self._write_out = write
        self._spawn = spawn
        self._buffer = StreamBuffer(flush_s=flush_s, flush_bytes=flush_bytes, max_bytes=max_bytes)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._lock = threading.Lock()  # add() from a handler's thread and from the loop

    def add(self, name: str, chunk: Any) -> Awaitable[None]:
        size = encode_chunk(name, chunk)
        with self._lock:
            if self._closed:
                raise RuntimeError("the attempt has ended: its streams are closed")
            self._buffer.add(name, chunk, size, time.monotonic())
            over = self._buffer.pending_bytes >= 4 * self._buffer.flush_bytes
        if threading.get_ident() == self._loop_thread:
            self._schedule()
            if not over:
                return DONE
            self._room.clear()
            return asyncio.ensure_future(self._wait_room())
        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop is gone or stuck
            if over:  # a sync handler's thread waits here until its chunks fit again
                asyncio.run_coroutine_threadsafe(self._make_room(), self._loop).result(_THREAD_WAIT_S)
            else:
                self._loop.call_soon_threadsafe(self._schedule)
        return DONE

    async def _wait_room(self) -> None:
        await self._room.wait()

    async def _make_room(self) -> None:
        if self._closed:
            return
        self._room.clear()
        self._schedule()
        await self._room.wait()

    def _schedule(self) -> None:
        if self._timer is not None or self._writing is not None or self._closed:
            return
        with self._lock:
            due = self._buffer.due_at()
        if due is not None:
            self._timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._writing is None and not self._closed:
            self._writing = self._loop.create_future()
            self._spawn(self._write())

    async def _write(self) -> None:
        assert self._writing is not None
        try:
            with self._lock:
                parts = self._buffer.take(time.monotonic())
            if parts:
                await self._write_out(parts)
        finally:
            self._writing.set_result(None)
            self._writing = None
            self._room.set()
            self._schedule()

    async def close(self, *, write: bool = True) -> None:
        """End the attempt's streams: wait for the write in flight, then write what is left
        (unless ``write`` is false: the attempt no longer counts)."""
        with self._lock:
            self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await asyncio.shield(self._writing)
        with self._lock:
            parts = self._buffer.take(time.monotonic())
        self._room.set()
        if parts and write:
            await self._write_out(parts)
