"""What a handler sees: :class:`TaskContext`, and the :class:`Fail` and :class:`Retry` it may raise."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Generator
from typing import Any, Protocol

from errands.inputs import check_text


class Fail(Exception):
    """Raised by a handler to end its task ``failed`` at once, without retry.

    ``code`` is a short stable identifier (``"bad_image"``), ``message`` is shown to the client.
    """

    def __init__(self, code: str, message: str) -> None:
        check_text(code, "A Fail code")
        check_text(message, "A Fail message")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Retry(Exception):
    """Raised by a handler to ask for another attempt, after ``after_s`` seconds if given.

    When no attempt is left the task ends ``failed`` with code ``retries_exhausted``.
    """

    def __init__(self, after_s: float | None = None, message: str | None = None) -> None:
        if message is not None:
            check_text(message, "A Retry message")
        super().__init__(message or "retry requested")
        self.after_s = after_s
        self.message = message


class StreamLimit(Fail):
    """Raised by :meth:`TaskContext.stream` once the attempt's streams reached their size limit
    (``ERRANDS_STREAM_MAX_BYTES``): nothing more is written. Uncaught, the task fails with code
    ``stream_too_large``."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__("stream_too_large", f"The task's streams reached their limit of {max_bytes} bytes.")


class ProgressSink(Protocol):
    def report(self, progress: int | None, message: str | None) -> None: ...


class StreamSink(Protocol):
    def add(self, name: str, chunk: Any) -> Awaitable[None]: ...


class _Reported:
    """What :meth:`TaskContext.progress` returns: already done, and awaitable for async handlers."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


#: Already done (what a report returns when it needs no waiting).
DONE = _Reported()
MAX_MESSAGE_CHARS = 1000


class TaskContext:
    """The running attempt of one task, handed to its handler.

    ``progress`` may be called as often as the handler likes, from async code (``await
    ctx.progress(40, "rendering")``) or from a sync handler's thread (``ctx.progress(40)``): reports
    are coalesced, so at most one is written per ``progress_interval_s``, and the last one is never
    lost. Progress never goes backwards within an attempt.

    A handler whose task is cancelled, or whose lease is lost, is cancelled (async) or sees
    :attr:`cancelled` become true (sync); nothing it writes afterwards lands.
    """

    def __init__(
        self,
        *,
        task_id: str,
        type: str,
        owner: str,
        attempt: int,
        max_attempts: int,
        sink: ProgressSink,
        streams: StreamSink | None = None,
    ) -> None:
        self.task_id = task_id
        self.type = type
        self.owner = owner
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.log = logging.getLogger(f"errands.task.{type}")
        self._sink = sink
        self._streams = streams
        self._cancelled = False

    def progress(self, percent: float | None = None, message: str | None = None) -> _Reported:
        """Report progress (0 to 100) and/or a short message; awaiting it is optional."""
        value: int | None = None
        if percent is not None:
            if (
                isinstance(percent, bool)
                or not isinstance(percent, int | float)
                or not math.isfinite(percent)
            ):
                raise ValueError("progress must be a number from 0 to 100")
            if not 0 <= percent <= 100:
                raise ValueError("progress must be a number from 0 to 100")
            value = int(percent)
        if message is not None:
            if not isinstance(message, str):
                raise ValueError("the progress message must be a string")
            message = check_text(message[:MAX_MESSAGE_CHARS], "The progress message")
        if value is not None or message is not None:
            self._sink.report(value, message)
        return DONE

    def stream(self, name: str, chunk: Any) -> Awaitable[None]:
        """Append ``chunk`` (a string, or any JSON value) to the attempt's stream ``name``.

        Watchers receive it live, in order, as a ``task.stream`` event, and
        ``GET /v1/tasks/{id}/streams/{name}`` keeps it. Chunks are written in batches, a few tens
        a second, the first after a pause at once; awaiting is optional, but a handler that makes
        chunks much faster than they are written waits when it awaits (a sync handler's thread
        waits in the call). Past the size limit it raises :class:`StreamLimit`
        (a :class:`Fail`: uncaught, the task fails with code ``stream_too_large``). A retry's
        attempt starts its streams again, from index 0.
        """
        if self._streams is None:
            raise RuntimeError("this context cannot stream (no worker runs it)")
        return self._streams.add(name, chunk)

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled or this worker lost it; sync handlers should stop."""
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        """For sync handlers: stop here if the attempt no longer counts."""
        if self._cancelled:
            raise Fail("cancelled", "The task was cancelled.")

    def _cancel(self) -> None:
        self._cancelled = True
