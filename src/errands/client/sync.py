"""The synchronous client (:class:`Client`): the async one, run on a loop of its own."""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterator
from typing import Any, TypeVar

from errands import errors
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
)
from errands.model import Task

T = TypeVar("T")


class _Portal:
    """An event loop in a daemon thread, for running the async client from sync code."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="errands-client", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def iterate(self, agen: AsyncGenerator[T, None]) -> Iterator[T]:
        """A blocking iterator over an async generator running on the portal's loop."""
        try:
            while True:
                try:
                    yield self.call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.call(agen.aclose())

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _construct(*args: Any, **kwargs: Any) -> AsyncClient:
    return AsyncClient(*args, **kwargs)


class Client:
    """The synchronous client: the same methods as :class:`AsyncClient`, blocking."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", token: str | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self._portal = _Portal()
        self._async = self._portal.call(_construct(url, token, timeout_s=timeout_s))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self._async.aclose())
        self._portal.close()

    def submit(self, type: str, input: dict[str, Any] | None = None, **options: Any) -> Task:
        return self._portal.call(self._async.submit(type, input, **options))

    def submit_many(self, tasks: builtins.list[dict[str, Any]]) -> builtins.list[Task | errors.ApiError]:
        return self._portal.call(self._async.submit_many(tasks))

    def get(self, task_id: str) -> Task:
        return self._portal.call(self._async.get(task_id))

    def list(self, **filters: Any) -> TaskPage:
        return self._portal.call(self._async.list(**filters))

    def cancel(self, task_id: str) -> Task:
        return self._portal.call(self._async.cancel(task_id))

    def retry(self, task_id: str) -> Task:
        return self._portal.call(self._async.retry(task_id))

    def events(self, task_id: str, *, after: int = 0) -> builtins.list[TaskEvent]:
        return self._portal.call(self._async.events(task_id, after=after))

    def stats(self) -> Stats:
        return self._portal.call(self._async.stats())

    def grant(self, owner: str, amount: int, *, note: str | None = None) -> CreditBalance:
        return self._portal.call(self._async.grant(owner, amount, note=note))

    def balances(self, *, after: str | None = None, limit: int = 100) -> Page[CreditBalance]:
        return self._portal.call(self._async.balances(after=after, limit=limit))

    def ledger(self, owner: str | None = None, *, after: int = 0, limit: int = 100) -> Page[LedgerEntry]:
        return self._portal.call(self._async.ledger(owner, after=after, limit=limit))

    def usage(self, **filters: Any) -> Page[DayUsage]:
        """As :meth:`AsyncClient.usage`."""
        return self._portal.call(self._async.usage(**filters))

    def mint_token(self, owner: str, **options: Any) -> str:
        return self._portal.call(self._async.mint_token(owner, **options))

    def schedules(self) -> builtins.list[dict[str, Any]]:
        return self._portal.call(self._async.schedules())

    def schedule(self, name: str, *, next: int = 5) -> dict[str, Any]:
        return self._portal.call(self._async.schedule(name, next=next))

    def put_schedule(self, name: str, *, type: str, cron: str, **options: Any) -> dict[str, Any]:
        return self._portal.call(self._async.put_schedule(name, type=type, cron=cron, **options))

    def pause_schedule(self, name: str, *, paused: bool = True) -> dict[str, Any]:
        return self._portal.call(self._async.pause_schedule(name, paused=paused))

    def delete_schedule(self, name: str) -> None:
        self._portal.call(self._async.delete_schedule(name))

    def wait(self, task_id: str, *, timeout_s: float | None = None) -> Task:
        return self._portal.call(self._async.wait(task_id, timeout_s=timeout_s))

    def watch(self, task_id: str, **options: Any) -> Iterator[Any]:
        """As :meth:`AsyncClient.watch`: :class:`TaskEvent` (and :class:`StreamChunk` with
        ``streams=True``)."""
        return self._portal.iterate(self._async.watch(task_id, **options))

    def stream(self, task_id: str, name: str = "text", **options: Any) -> Iterator[StreamChunk]:
        return self._portal.iterate(self._async.stream(task_id, name, **options))

    def watch_tasks(self, **options: Any) -> Iterator[TaskEvent]:
        return self._portal.iterate(self._async.watch_tasks(**options))
