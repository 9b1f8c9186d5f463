"""The async client (:class:`AsyncClient`)."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import date, datetime
from typing import Any, Literal, overload

import httpx
import orjson

from errands import errors
from errands.client.results import (
    CreditBalance,
    DayUsage,
    LedgerEntry,
    Page,
    Stats,
    StreamChunk,
    TaskEvent,
    TaskPage,
    chunks,
)
from errands.client.wire import SseMessage, StreamingUnavailable, api_error, parse_sse, raise_for
from errands.model import Status, Task

log = logging.getLogger("errands.client")

#: How long a stream may stay silent (the server sends a keep-alive every 15 s by default).
STREAM_READ_TIMEOUT_S = 60.0


class AsyncClient:
    """An async client of one errands server, authenticated with an admin key or owner token."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"Cannot reach errands at {self.url}: {type(exc).__name__}.") from exc
        raise_for(response)
        return response.json() if response.content else None

    async def submit(
        self,
        type: str,
        input: dict[str, Any] | None = None,
        *,
        id: str | None = None,
        owner: str | None = None,
        priority: int | None = None,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        expires_in_s: float | None = None,
        notify_url: str | None = None,
        run_at: datetime | str | None = None,
        delay_s: float | None = None,
        start_within_s: float | None = None,
        key: str | None = None,
        debounce_key: str | None = None,
        debounce_s: float | None = None,
    ) -> Task:
        """Submit a task; with ``id`` the call is idempotent (safe to repeat). ``run_at`` (an
        aware datetime, or RFC 3339 text) or ``delay_s`` delays its first run; never started
        within ``start_within_s`` of then, it ends ``timeout`` with code ``not_started``.
        ``key`` names whose share of the type's ``per="key"`` limits it uses. ``debounce_key``
        replaces the owner's pending tasks of the type with the same key (``debounce_s``: wait
        that long for a newer one first)."""
        body: dict[str, Any] = {"type": type, "input": input or {}}
        for name, value in (
            ("id", id),
            ("owner", owner),
            ("priority", priority),
            ("timeout_s", timeout_s),
            ("max_attempts", max_attempts),
            ("expires_in_s", expires_in_s),
            ("notify_url", notify_url),
            ("run_at", run_at.isoformat() if isinstance(run_at, datetime) else run_at),
            ("delay_s", delay_s),
            ("start_within_s", start_within_s),
            ("key", key),
            ("debounce_key", debounce_key),
            ("debounce_s", debounce_s),
        ):
            if value is not None:
                body[name] = value
        return Task(**await self._request("POST", "/v1/tasks", json=body))

    async def submit_many(
        self, tasks: builtins.list[dict[str, Any]]
    ) -> builtins.list[Task | errors.ApiError]:
        """Up to 1,000 submissions (each a ``POST /v1/tasks`` body: ``{"type", "input"?, "id"?,
        …}``) in one call and one transaction: for each, in order, its task, or the error that
        refused it (an :class:`~errands.errors.ApiError`, not raised: one refused item refuses
        only itself). Items with an ``id`` are idempotent, as alone."""
        data = await self._request("POST", "/v1/tasks/batch", json={"tasks": tasks})
        return [
            Task(**r["task"]) if "task" in r and r["task"] is not None
            else api_error(int(r["status"]), str(r["error"]["code"]), str(r["error"]["message"]))
            for r in data["results"]
        ]  # fmt: skip

    async def get(self, task_id: str) -> Task:
        return Task(**await self._request("GET", f"/v1/tasks/{task_id}"))

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        params = {
            k: v for k, v in {"status": status, "type": type, "owner": owner, "cursor": cursor}.items() if v
        }
        params["limit"] = str(limit)
        data = await self._request("GET", "/v1/tasks", params=params)
        return TaskPage([Task(**t) for t in data["tasks"]], data["next_cursor"])

    async def cancel(self, task_id: str) -> Task:
        return Task(**await self._request("POST", f"/v1/tasks/{task_id}/cancel"))

    async def retry(self, task_id: str) -> Task:
        return Task(**await self._request("POST", f"/v1/tasks/{task_id}/retry"))

    async def events(self, task_id: str, *, after: int = 0) -> builtins.list[TaskEvent]:
        """The task's events from the log (not its output: see :meth:`stream`)."""
        data = await self._request("GET", f"/v1/tasks/{task_id}/events", params={"after": after})
        return [TaskEvent.from_json(e) for e in data["events"] if e["type"] != "task.stream"]

    async def stats(self) -> Stats:
        """Tasks by status and type, queue waits and run times (admin)."""
        return Stats.from_json(await self._request("GET", "/v1/stats"))

    # -- credits and usage --------------------------------------------------------------------

    async def grant(self, owner: str, amount: int, *, note: str | None = None) -> CreditBalance:
        """Add credits to an owner's balance, or take them back with a negative ``amount``
        (admin); :class:`~errands.errors.InsufficientCredits` when it cannot go that low."""
        body: dict[str, Any] = {"owner": owner, "amount": amount}
        if note is not None:
            body["note"] = note
        return CreditBalance(**await self._request("POST", "/v1/credits", json=body))

    async def balances(self, *, after: str | None = None, limit: int = 100) -> Page[CreditBalance]:
        """Owners' credits by owner (admin); an owner token gets its own."""
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        data = await self._request("GET", "/v1/credits", params=params)
        return Page([CreditBalance(**b) for b in data["balances"]], data["next_after"])

    async def ledger(
        self, owner: str | None = None, *, after: int = 0, limit: int = 100
    ) -> Page[LedgerEntry]:
        """An owner's ledger, oldest first (an admin: every owner's when it names none)."""
        params: dict[str, Any] = {"after": after, "limit": limit, **({"owner": owner} if owner else {})}
        data = await self._request("GET", "/v1/credits/ledger", params=params)
        return Page([LedgerEntry(**e) for e in data["entries"]], data["next_after"])

    async def usage(
        self,
        *,
        owner: str | None = None,
        type: str | None = None,
        since: date | str | None = None,
        until: date | str | None = None,
        after: str | None = None,
        limit: int = 500,
    ) -> Page[DayUsage]:
        """Tasks per day (UTC), owner and type from ``since`` to ``until`` (the last 30 days by
        default): how many were submitted, in each status, the credits charged and held."""
        params: dict[str, Any] = {"limit": limit}
        for name, value in (
            ("owner", owner),
            ("type", type),
            ("since", since),
            ("until", until),
            ("after", after),
        ):
            if value is not None:
                day = value.date() if isinstance(value, datetime) else value  # a datetime is a date too
                params[name] = day.isoformat() if isinstance(day, date) else day
        data = await self._request("GET", "/v1/usage", params=params)
        return Page([DayUsage(**u) for u in data["usage"]], data["next_after"])

    async def mint_token(
        self,
        owner: str,
        *,
        scopes: builtins.list[str] | None = None,
        task_id: str | None = None,
        ttl_s: int = 3600,
    ) -> str:
        """An owner token (admin keys only)."""
        body: dict[str, Any] = {"owner": owner, "ttl_s": ttl_s}
        if scopes is not None:
            body["scopes"] = scopes
        if task_id is not None:
            body["task_id"] = task_id
        return str((await self._request("POST", "/v1/tokens", json=body))["token"])

    async def schedules(self) -> builtins.list[dict[str, Any]]:
        """Every schedule (admin), as ``GET /v1/schedules`` shows them."""
        data = await self._request("GET", "/v1/schedules")
        return builtins.list(data["schedules"])

    async def schedule(self, name: str, *, next: int = 5) -> dict[str, Any]:
        """A schedule and its next ``next`` runs (admin)."""
        data: dict[str, Any] = await self._request("GET", f"/v1/schedules/{name}", params={"next": next})
        return data

    async def put_schedule(self, name: str, *, type: str, cron: str, **options: Any) -> dict[str, Any]:
        """Create or replace a schedule (admin); ``options``: ``tz``, ``input``, ``owner``,
        ``priority``, ``missed`` (``"last"`` or ``"skip"``), ``grace_s``."""
        body = {"type": type, "cron": cron, **options}
        data: dict[str, Any] = await self._request("PUT", f"/v1/schedules/{name}", json=body)
        return data

    async def pause_schedule(self, name: str, *, paused: bool = True) -> dict[str, Any]:
        """Pause a schedule, or with ``paused=False`` resume it from its next slot (admin)."""
        action = "pause" if paused else "resume"
        data: dict[str, Any] = await self._request("POST", f"/v1/schedules/{name}/{action}")
        return data

    async def delete_schedule(self, name: str) -> None:
        await self._request("DELETE", f"/v1/schedules/{name}")

    async def wait(self, task_id: str, *, timeout_s: float | None = None) -> Task:
        """The task once it has ended (watched live); ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            task = None
            async for event in self.watch(task_id):
                task = event.task
            assert task is not None, "a watch of a task always yields at least its snapshot"
            return task

    # -- watching -----------------------------------------------------------------------------

    async def _stream(self, path: str, params: dict[str, Any], last: int | None) -> AsyncIterator[SseMessage]:
        """One SSE connection; raises :class:`StreamingUnavailable` if the server cannot stream."""
        headers = {"Accept": "text/event-stream"}
        if last is not None:
            headers["Last-Event-ID"] = str(last)
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        try:
            async with self._http.stream(
                "GET", path, params=params, headers=headers, timeout=timeout
            ) as response:
                if response.status_code in (404, 405, 501) and not response.headers.get(
                    "content-type", ""
                ).startswith("application/json"):
                    raise StreamingUnavailable()
                if not response.is_success:
                    await response.aread()
                    if response.status_code == 404 and "No such route" in response.text:
                        raise StreamingUnavailable()
                    raise_for(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise StreamingUnavailable()
                async for message in parse_sse(response.aiter_lines()):
                    yield message
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"The stream from {self.url} broke: {type(exc).__name__}.") from exc

    @overload
    def watch(
        self,
        task_id: str,
        *,
        after: int | None = ...,
        poll_s: float = ...,
        max_backoff_s: float = ...,
        streams: Literal[False] = ...,
    ) -> AsyncGenerator[TaskEvent, None]: ...

    @overload
    def watch(
        self,
        task_id: str,
        *,
        after: int | None = ...,
        poll_s: float = ...,
        max_backoff_s: float = ...,
        streams: Literal[True],
    ) -> AsyncGenerator[TaskEvent | StreamChunk, None]: ...

    async def watch(
        self,
        task_id: str,
        *,
        after: int | None = None,
        poll_s: float = 2.0,
        max_backoff_s: float = 10.0,
        streams: bool = False,
    ) -> AsyncGenerator[Any, None]:
        """Every change of a task as it happens, until it ends.

        Starts with the task's current state (an event of type ``task.snapshot``) unless
        ``after`` is given, in which case it replays every event after that seq first.
        Reconnects and resumes by itself; falls back to polling when streaming is unavailable.
        With ``streams=True`` the chunks of its output streams come too, as :class:`StreamChunk`,
        in order with the events (not while polling).
        """
        last, backoff, streaming = after, 0.2, True
        params = {"streams": "include" if streams else "none"}
        while True:
            if streaming:
                try:
                    async for message in self._stream(f"/v1/tasks/{task_id}/watch", params, last):
                        if message.event in ("overflow", "") or message.data is None:
                            continue
                        data = orjson.loads(message.data)
                        if message.event == "task.stream":
                            last, backoff = int(data["seq"]), 0.2
                            for chunk in chunks(data):
                                yield chunk
                            continue
                        event = TaskEvent.from_json(data)
                        last, backoff = event.seq, 0.2
                        yield event
                        if event.task.done:
                            return
                except StreamingUnavailable:
                    log.info("the server cannot stream; polling task %s", task_id)
                    streaming = False
                    continue
                except errors.Unavailable as exc:
                    log.info("watch of %s interrupted (%s); resuming", task_id, exc.message)
                    await asyncio.sleep(backoff)
                    backoff = min(max_backoff_s, backoff * 2)
                    continue
                # The stream ended without a terminal event (server stopping, or we fell behind).
                continue
            try:
                async for event in self._poll_task(task_id, last, poll_s):
                    last = event.seq
                    yield event
                return
            except errors.Unavailable:
                await asyncio.sleep(backoff)
                backoff = min(max_backoff_s, backoff * 2)

    async def stream(
        self, task_id: str, name: str = "text", *, after: int = 0, max_backoff_s: float = 10.0
    ) -> AsyncGenerator[StreamChunk, None]:
        """The chunks of one output stream of a task, from its start (or from the events after
        seq ``after``), live, until the task ends: every chunk once, in order, across
        reconnects. A chunk at ``index`` 0 after others starts the stream over (a retry's
        attempt, or the same attempt run again after a worker gave it back): the text so far is
        ``"".join(c.value for c in chunks)`` from the last chunk at index 0."""
        last, backoff = after, 0.2
        while True:
            heard = False
            try:
                async for message in self._stream(f"/v1/tasks/{task_id}/watch", {"streams": "only"}, last):
                    if message.event in ("overflow", "") or message.data is None:
                        continue
                    data = orjson.loads(message.data)
                    last, backoff, heard = int(data["seq"]), 0.2, True
                    if message.event == "task.stream":
                        for chunk in chunks(data):
                            if chunk.name == name:
                                yield chunk
                    elif Status(data["task"]["status"]).terminal:
                        return
            except StreamingUnavailable:
                raise errors.Unavailable(
                    f"{self.url} cannot stream; read GET /v1/tasks/{task_id}/streams/{name}"
                ) from None
            except errors.Unavailable as exc:
                log.info("stream of %s interrupted (%s); resuming", task_id, exc.message)
                await asyncio.sleep(backoff)
                backoff = min(max_backoff_s, backoff * 2)
                continue
            if not heard:  # closed at once: the task ended before ``last``, or the server is stopping
                try:
                    if (await self.get(task_id)).done and not await self._events_after(task_id, last):
                        return
                except errors.Unavailable:
                    pass
                await asyncio.sleep(backoff)
                backoff = min(max_backoff_s, backoff * 2)

    async def _events_after(self, task_id: str, after: int) -> bool:
        """Whether the log holds output (or an end) of the task after ``after``."""
        params = {"after": after, "limit": 1, "streams": "only"}
        return bool((await self._request("GET", f"/v1/tasks/{task_id}/events", params=params))["events"])

    async def _poll_task(self, task_id: str, last: int | None, poll_s: float) -> AsyncIterator[TaskEvent]:
        if last is None:
            task = await self.get(task_id)
            yield TaskEvent(seq=task.seq, type="task.snapshot", at=task.updated_at.isoformat(), task=task)
            last = task.seq
            if task.done:
                return
        while True:
            for event in await self.events(task_id, after=last):
                last = event.seq
                yield event
                if event.task.done:
                    return
            current = await self.get(task_id)
            if current.done and current.seq <= last:
                return
            await asyncio.sleep(poll_s)

    async def watch_tasks(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        owner: str | None = None,
        after: int | None = None,
        poll_s: float = 2.0,
        max_backoff_s: float = 10.0,
    ) -> AsyncGenerator[TaskEvent, None]:
        """Every change of the caller's tasks that match, forever.

        Starts with one ``task.snapshot`` event per matching unfinished task (again after a
        ``reset``, when the resume point was older than the server's log). Reconnects and
        resumes by itself; falls back to polling the task list when streaming is unavailable.
        """
        params = {k: v for k, v in {"type": type, "status": status, "owner": owner}.items() if v}
        last, backoff = after, 0.2
        while True:
            try:
                async for message in self._stream("/v1/watch", params, last):
                    if message.data is None or message.event in ("overflow", "reset", ""):
                        continue
                    data = orjson.loads(message.data)
                    if message.event == "tasks.snapshot":
                        for task in data["tasks"]:
                            t = Task(**task)
                            yield TaskEvent(
                                seq=t.seq, type="task.snapshot", at=t.updated_at.isoformat(), task=t
                            )
                        last = int(data["seq"])
                    else:
                        event = TaskEvent.from_json(data)
                        last = event.seq
                        yield event
                    backoff = 0.2
            except StreamingUnavailable:
                async for event in self._poll_tasks(params, poll_s):
                    yield event
                return
            except errors.Unavailable as exc:
                log.info("watch of tasks interrupted (%s); resuming", exc.message)
                await asyncio.sleep(backoff)
                backoff = min(max_backoff_s, backoff * 2)

    async def _poll_tasks(self, params: dict[str, Any], poll_s: float) -> AsyncIterator[TaskEvent]:
        """Polling stand-in for a set watch: each task whose state changed, as a snapshot."""
        seen: dict[str, int] = {}
        while True:
            try:
                page = await self.list(limit=200, **params)
            except errors.Unavailable:
                await asyncio.sleep(poll_s)
                continue
            for task in reversed(page.tasks):
                if seen.get(task.id) != task.seq:
                    seen[task.id] = task.seq
                    yield TaskEvent(
                        seq=task.seq, type="task.snapshot", at=task.updated_at.isoformat(), task=task
                    )
            await asyncio.sleep(poll_s)
