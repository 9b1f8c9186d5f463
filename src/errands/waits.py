"""Waiting for an event with a time limit, without losing a cancellation.

On Python 3.11, ``asyncio.wait_for`` returns normally when the task is cancelled at the moment
what it waits for completes: the cancellation is lost, and a loop built on it (``while True:
wait for a wake-up or a timeout``) goes on forever under a ``stop()`` that cancelled it and
waits for it. ``asyncio.timeout`` cancels only for itself, so a cancellation from outside
always arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout_s``; whether it is set."""
    if not event.is_set():
        await within(event.wait(), timeout_s)
    return event.is_set()


async def within(awaitable: Awaitable[object], timeout_s: float) -> bool:
    """Await ``awaitable`` for at most ``timeout_s`` (abandoned after that); whether it ended."""
    try:
        async with asyncio.timeout(timeout_s):
            await awaitable
    except TimeoutError:
        return False
    return True
