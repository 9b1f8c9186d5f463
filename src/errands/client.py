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

import asyncio
import builtins
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar, overload

import httpx
import orjson

from errands import errors
from errands.model import Status, Task

T = TypeVar("T")

log = logging.getLogger("errands.client")

#: How long a stream may stay silent (the server sends a keep-alive every 15 s by default).
STREAM_READ_TIMEOUT_S = 60.0

_BY_STATUS: dict[int, type[errors.ApiError]] = {
    400: errors.BadRequest,
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    410: errors.Gone,
    413: errors.PayloadTooLarge,
    422: errors.InvalidRequest,
    429: errors.TooManyRequests,
    503: errors.Unavailable,
}
_BY_CODE: dict[str, type[errors.ApiError]] = {
    "id_conflict": errors.IdConflict,
    "invalid_state": errors.InvalidTransition,
    "unknown_type": errors.UnknownTaskType,
    "invalid_cursor": errors.InvalidCursor,
}


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {response.status_code}"
    try:
        retry_after = float(response.headers.get("retry-after", "1"))
    except ValueError:
        retry_after = 1.0
    raise _error(response.status_code, code, message, retry_after)


def _error(status: int, code: str, message: str, retry_after_s: float = 1.0) -> errors.ApiError:
    """The exception for an error the API answered (``status``, ``{code, message}``)."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, errors.ApiError)
    if cls is errors.TooManyRequests:
        return errors.TooManyRequests(message, retry_after_s=retry_after_s, code=code)
    error = cls(message, code=code)
    error.status_code = status
    return error


class StreamingUnavailable(errors.ErrandsError):
    """The server (or a proxy) does not stream events; the client polls instead."""


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str
    id: str | None
    data: str | None


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseMessage]:
    """Server-Sent Events from a stream of lines (the WHATWG format: fields, blank-line ends)."""
    event, last_id = "", None
    data: list[str] = []
    async for line in lines:
        if not line:
            if data or event:
                yield SseMessage(event or "message", last_id, "\n".join(data) if data else None)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One chunk of a task's output stream: its ``value`` (a string, or a JSON value), its
    position in the stream (``index``, from 0 in each attempt) and the ``attempt`` that wrote
    it (a retry starts its streams again: ``index == 0`` with a greater ``attempt``)."""

    name: str
    value: Any
    index: int
    attempt: int

    def __str__(self) -> str:
        return self.value if isinstance(self.value, str) else orjson.dumps(self.value).decode()


def _chunks(data: dict[str, Any]) -> list[StreamChunk]:
    part = data["stream"]
    return [
        StreamChunk(part["name"], value, index, part["attempt"])
        for index, value in enumerate(part["chunks"], start=part["index"])
    ]


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One committed change of a task, as the log and the watch streams report it."""

    seq: int
    type: str
    at: str
    task: Task

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskEvent:
        return cls(
            seq=int(data["seq"]), type=str(data["type"]), at=str(data["at"]), task=Task(**data["task"])
        )


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
        _raise_for(response)
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
            else _error(int(r["status"]), str(r["error"]["code"]), str(r["error"]["message"]))
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

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/v1/stats")
        return result

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
                    _raise_for(response)
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
                            for chunk in _chunks(data):
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
                        for chunk in _chunks(data):
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

    def stats(self) -> dict[str, Any]:
        return self._portal.call(self._async.stats())

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
