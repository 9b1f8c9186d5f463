"""Every background loop of a process, kept: a loop that ends on its own is reported, one-off
jobs are logged if they fail, and everything is cancelled at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("errands.runtime")


class Supervisor:
    """Keeps every background loop of the process; a loop that ends on its own is reported."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._transient: set[asyncio.Task[Any]] = set()
        self.failures: dict[str, str] = {}
        self._stopping = False

    def run_soon(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        """A one-off background job (calling a provider, say): kept, logged if it fails,
        cancelled at shutdown."""
        task = asyncio.create_task(coro, name=f"errands-{name}")
        self._transient.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._transient.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background job %s failed: %s", name, t.exception())

        task.add_done_callback(done)

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"errands-{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._ended(name, t))
        return task

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("background loop %s crashed", name, exc_info=error)
            self.failures[name] = f"crashed: {type(error).__name__}"
        else:
            self.failures[name] = "stopped"

    def alive(self) -> dict[str, bool]:
        return {name: not task.done() for name, task in self._tasks.items()}

    async def stop(self) -> None:
        self._stopping = True
        everything = [*self._tasks.values(), *self._transient]
        for task in everything:
            task.cancel()
        if everything:
            await asyncio.wait(everything, timeout=10)
