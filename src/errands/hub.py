"""In-process fan-out of committed events.

The hub follows the event log in ``seq`` order and hands every event, exactly once and in order,
to the listeners of this process (workers, watches, notifiers). It is fed only by committed
events: the store reports this process's commits right after they commit, and the hub reads the
log itself for everything else (other processes' commits, or anything it missed), so a listener
never sees a change that was rolled back and never sees a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from errands.model import Event
from errands.store.base import Store

log = logging.getLogger("errands.hub")

Listener = Callable[[Event], None]


class Hub:
    """Follows the log from the seq it starts at; see the module docstring."""

    def __init__(self, store: Store, *, poll_s: float) -> None:
        self._store = store
        self._poll_s = poll_s
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self.last_seq = 0
        self.started = False

    def add_listener(self, listener: Listener) -> None:
        """``listener(event)`` is called on the event loop for each event; it must not block."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def start(self) -> None:
        self.last_seq = await self._store.last_seq()
        self._store.add_commit_listener(self._on_local_commit)
        self.started = True

    def wake(self) -> None:
        """Read the log now: another process may have committed events."""
        self._wake.set()

    def _on_local_commit(self, events: Sequence[Event]) -> None:
        # Fast path: our own commit directly follows what we delivered. Otherwise some other
        # process's events sit in between, and reading the log keeps the order.
        if events and events[0].seq == self.last_seq + 1:
            self._deliver(events)
        else:
            self._wake.set()

    def _deliver(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.seq <= self.last_seq:
                continue
            self.last_seq = event.seq
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("an event listener failed")

    async def catch_up(self) -> None:
        """Deliver every committed event after :attr:`last_seq`."""
        while True:
            events = await self._store.events_since(self.last_seq, limit=1000)
            if not events:
                return
            self._deliver(events)
            if len(events) < 1000:
                return

    async def run(self) -> None:
        """Follow the log until cancelled; errors are logged and retried."""
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            try:
                await self.catch_up()
                failures = 0
            except Exception:
                failures += 1
                log.exception("reading the event log failed")
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
