"""Python SDK: :class:`AsyncClient`, and :class:`Client` which wraps it for synchronous code.

::

    async with AsyncClient("http://127.0.0.1:8000", token) as client:
        task = await client.submit("photography", {"prompt": "a cat"}, id="order-42")
        async for event in client.watch(task.id):      # live, resumes by itself
            print(event.type, event.task.progress)

Errors are :class:`errands.errors.ErrandsError` subclasses: ``NotFound``, ``Conflict``,
``TooManyRequests`` (with ``retry_after_s``), ``Unavailable`` when the server cannot be reached…

Watches reconnect after a dropped connection or a server restart and resume from the last event
they delivered (``Last-Event-ID``), so the sequence they yield has no gap and no duplicate. If
the server (or a proxy in between) cannot stream, they fall back to polling.
"""

from __future__ import annotations

from errands.client.aio import AsyncClient
from errands.client.results import (
    CreditBalance,
    DayUsage,
    LedgerEntry,
    Page,
    Stats,
    StreamChunk,
    TaskEvent,
    TaskPage,
    Timing,
)
from errands.client.sync import Client
from errands.client.wire import SseMessage, StreamingUnavailable, parse_sse

__all__ = [
    "AsyncClient",
    "Client",
    "CreditBalance",
    "DayUsage",
    "LedgerEntry",
    "Page",
    "SseMessage",
    "Stats",
    "StreamChunk",
    "StreamingUnavailable",
    "TaskEvent",
    "TaskPage",
    "Timing",
    "parse_sse",
]
