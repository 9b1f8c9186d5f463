"""Live watches: Server-Sent Events and WebSocket, with gap-free resume.

Both transports stream the same items, built here:

* a watch of one task starts with ``task.snapshot`` (or, when resuming after ``seq``, with every
  later event of the task from the log), then every event as it commits, and ends after a
  terminal one;
* a watch of a set of tasks starts with ``tasks.snapshot`` (the matching unfinished tasks), or
  resumes from the log, or sends ``reset`` and a fresh snapshot when the resume point is older
  than what the log still holds.

Ordering without gaps or duplicates: the watch is registered with the hub *before* anything is
read, and ``until`` is the hub's delivered position at that moment. Everything up to ``until``
is committed and is read from the log; everything after it arrives through the watch. Items
already covered (by the snapshot or the replay) are skipped by ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from errands.api.errors import invalid
from errands.api.middleware import PRINCIPAL
from errands.auth import READ, Principal
from errands.clock import iso
from errands.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
)
from errands.hub import Watch, WatchClosed, WatchFilter
from errands.inputs import TASK_ID_PATTERN, TYPE_PATTERN, BadValue, Owner, Seq, parse_seq
from errands.model import Event, Status, TaskRecord
from errands.runtime import Runtime
from errands.store.base import TaskQuery

log = logging.getLogger("errands.watch")

router = APIRouter(tags=["watch"])

SNAPSHOT_LIMIT = 1000
REPLAY_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Item:
    """One thing a watch sends: an event, a snapshot, a reset, an overflow notice or a keep-alive."""

    name: str  # the SSE event name; "" for a keep-alive
    seq: int | None  # the SSE id (resume point); None when the item moves no position
    data: bytes = b""
    event: Event | None = None


KEEPALIVE = Item("", None)


def _event_item(event: Event) -> Item:
    return Item(event.type.value, event.seq, event.to_json(), event)


def _snapshot_item(record: TaskRecord) -> Item:
    data = b'{"seq":%d,"type":"task.snapshot","at":"%s","task":%s}' % (
        record.seq,
        (iso(record.updated_at) or "").encode(),
        record.public_json(),
    )
    return Item("task.snapshot", record.seq, data)


def _overflow_item(last: int) -> Item:
    return Item("overflow", last, b'{"type":"overflow","last_id":%d}' % last)


def _owner_key(principal: Principal) -> str | None:
    return None if principal.admin else principal.owner


Batch = list[Item]


async def task_items(
    runtime: Runtime, watch: Watch, task_id: str, after: int | None
) -> AsyncGenerator[Batch, None]:
    """The items of a watch of one task (see the module docstring), in batches: everything
    ready at once goes out together. Closes ``watch`` at the end."""
    keepalive_s = runtime.settings.watch_keepalive_s
    until = runtime.hub.last_seq
    try:
        found = await runtime.store.get(task_id)
        if not isinstance(found, TaskRecord):
            return
        if after is None:
            yield [_snapshot_item(found)]
            last, done = found.seq, found.status.terminal
        else:
            last, done = after, False
            while True:
                page = await runtime.store.events(task_id, after=last, limit=REPLAY_PAGE)
                page = [e for e in page if e.seq <= until]
                if page:
                    yield [_event_item(e) for e in page]
                    last, done = page[-1].seq, page[-1].status.terminal
                if len(page) < REPLAY_PAGE:
                    break
            # Nothing newer than the resume point and the task has ended: the stream is complete.
            done = done or (found.status.terminal and found.seq <= last)
        while not done:
            try:
                events = await watch.next(keepalive_s)
            except WatchClosed:
                if watch.overflowed:
                    yield [_overflow_item(last)]
                return
            if not events:
                yield [KEEPALIVE]
                continue
            batch = []
            for event in events:
                if event.seq <= last:
                    continue
                batch.append(_event_item(event))
                last = event.seq
                if event.status.terminal:
                    done = True
                    break
            if batch:
                yield batch
    finally:
        watch.close()


async def _snapshot(runtime: Runtime, f: WatchFilter, until: int) -> tuple[Item, dict[str, int]]:
    statuses = [f.status] if f.status is not None else [Status.PENDING, Status.PROCESSING]
    tasks: list[TaskRecord] = []
    for status in statuses:
        if status.terminal:
            continue
        query = TaskQuery(owner=f.owner, status=status, type=f.type, limit=SNAPSHOT_LIMIT)
        tasks.extend(await runtime.store.list_tasks(query))
    tasks.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    truncated = len(tasks) > SNAPSHOT_LIMIT
    tasks = tasks[:SNAPSHOT_LIMIT]
    data = b'{"seq":%d,"type":"tasks.snapshot","truncated":%s,"tasks":[%s]}' % (
        until,
        b"true" if truncated else b"false",
        b",".join(r.public_json() for r in tasks),
    )
    return Item("tasks.snapshot", until, data), {r.id: r.seq for r in tasks}


async def set_items(runtime: Runtime, watch: Watch, after: int | None) -> AsyncGenerator[Batch, None]:
    """The items of a watch of a set of tasks (see the module docstring). Closes ``watch``."""
    keepalive_s = runtime.settings.watch_keepalive_s
    f = watch.filter
    until = runtime.hub.last_seq
    covered: dict[str, int] = {}
    try:
        reset = None
        if after is not None and after < await runtime.store.horizon():
            reset = Item("reset", None, b'{"type":"reset","reason":"the resume point is older than the log"}')
            after = None
        if after is None:
            item, covered = await _snapshot(runtime, f, until)
            yield [item] if reset is None else [reset, item]
            last = until
        else:
            last = after
            while last < until:
                page = await runtime.store.owner_events(f.owner, after=last, until=until, limit=REPLAY_PAGE)
                matching = [_event_item(e) for e in page if f.matches(e)]
                if matching:
                    yield matching
                if page:
                    last = page[-1].seq
                if len(page) < REPLAY_PAGE:
                    break
            last = max(last, until)
        while True:
            try:
                events = await watch.next(keepalive_s)
            except WatchClosed:
                if watch.overflowed:
                    yield [_overflow_item(last)]
                return
            if not events:
                yield [KEEPALIVE]
                continue
            batch = []
            for event in events:
                if event.seq <= last or event.seq <= covered.get(event.task_id, 0):
                    continue
                batch.append(_event_item(event))
                last = event.seq
            if batch:
                yield batch
    finally:
        watch.close()


def _resume_point(last_event_id: str | None, after: int | None) -> int | None:
    if last_event_id is not None and last_event_id.strip():
        try:
            return parse_seq(last_event_id, "Last-Event-ID")
        except BadValue as exc:
            raise BadRequest(f"{exc}.") from None
    return after


async def open_task_watch(runtime: Runtime, principal: Principal, task_id: str) -> Watch:
    """Check the caller may watch the task, then register the watch (before reading anything)."""
    await runtime.service.get(task_id, principal)
    return runtime.hub.watch(WatchFilter(task_id=task_id), key=_owner_key(principal))


def open_set_watch(
    runtime: Runtime, principal: Principal, *, type: str | None, status: Status | None, owner: str | None
) -> Watch:
    principal.require(READ)
    if principal.task_id is not None:
        raise Forbidden("A token scoped to one task can only watch that task.")
    if principal.admin:
        watch_owner = owner
    elif owner is not None and owner != principal.owner:
        raise Forbidden("Only an admin may watch another owner's tasks.")
    else:
        watch_owner = principal.owner
    f = WatchFilter(owner=watch_owner, type=type, status=status)
    return runtime.hub.watch(f, key=_owner_key(principal))


# -- Server-Sent Events ---------------------------------------------------------------------------

SSE_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx and friends must not buffer the stream
    "Connection": "keep-alive",
}


def _sse(item: Item) -> bytes:
    if item.event is not None:
        return item.event.sse()
    if not item.name:
        return b": keep-alive\n\n"
    if item.seq is None:
        return b"event: %s\ndata: %s\n\n" % (item.name.encode(), item.data)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (item.seq, item.name.encode(), item.data)


_SSE_START = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
    (k.lower().encode(), v.encode()) for k, v in SSE_HEADERS.items()
]


class EventStream(Response):
    """An ASGI response streaming a watch as Server-Sent Events.

    Written directly against ASGI rather than with Starlette's ``StreamingResponse``: it is the
    fan-out path, paid per watcher per event, so it sends each batch in one message with no
    extra layers, and it ends the watch as soon as the client goes away.
    """

    media_type = "text/event-stream"

    def __init__(self, batches: AsyncGenerator[Batch, None], watch: Watch) -> None:
        # Not Response.__init__: there is no body to render; the stream is written in __call__.
        self.status_code = 200
        self.background = None
        self._batches = batches
        self._watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = asyncio.create_task(self._listen(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_START})
            await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
            async for batch in self._batches:
                body = _sse(batch[0]) if len(batch) == 1 else b"".join(map(_sse, batch))
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            listener.cancel()
            self._watch.close()
            await self._batches.aclose()

    async def _listen(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._watch.close()  # the generator sees WatchClosed and ends the response
                return


class WatchQuery(BaseModel):
    """The query of the SSE watch endpoints (``access_token`` is read by the guard)."""

    model_config = ConfigDict(extra="ignore")

    type: Annotated[str, Field(pattern=TYPE_PATTERN)] | None = None
    status: Status | None = None
    owner: Owner | None = None
    after: Seq | None = None


_TASK_ID = re.compile(TASK_ID_PATTERN)


async def open_stream(runtime: Runtime, scope: Scope, task_id: str | None) -> EventStream:
    """The SSE response of ``GET /v1/tasks/{task_id}/watch`` (or of ``GET /v1/watch`` without a
    ``task_id``) for an authenticated request; raises an :class:`ApiError` to refuse it."""
    principal = scope.get(PRINCIPAL)
    if not isinstance(principal, Principal):
        raise Unauthorized()
    try:
        query = WatchQuery.model_validate(dict(parse_qsl(scope["query_string"].decode("latin-1"))))
    except ValidationError as exc:
        raise invalid(list(exc.errors())) from None
    last_event_id = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"last-event-id"), None)
    resume = _resume_point(last_event_id, query.after)
    if task_id is not None:
        if not _TASK_ID.match(task_id):
            raise InvalidRequest("task_id: the id must match [A-Za-z0-9_-]{1,64}")
        watch = await open_task_watch(runtime, principal, task_id)
        return EventStream(task_items(runtime, watch, task_id, resume), watch)
    watch = open_set_watch(runtime, principal, type=query.type, status=query.status, owner=query.owner)
    return EventStream(set_items(runtime, watch, resume), watch)


# -- WebSocket --------------------------------------------------------------------------------------


class WsFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Annotated[str, Field(pattern=TYPE_PATTERN)] | None = None
    status: Status | None = None
    owner: Owner | None = None


class WsMessage(BaseModel):
    """``{"op": "subscribe", "task_id" | "filter", "after"?, "sub"?}`` or ``{"op": "unsubscribe", "sub"}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    op: Literal["subscribe", "unsubscribe", "ping"]
    sub: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] | None = None
    task_id: Annotated[str, Field(pattern=TASK_ID_PATTERN)] | None = None
    filter: WsFilter | None = None
    after: Seq | None = None


MAX_SUBSCRIPTIONS_PER_SOCKET = 100


class _Socket:
    """One WebSocket connection with its subscriptions; sends are serialised by a lock."""

    def __init__(self, websocket: WebSocket, runtime: Runtime, principal: Principal) -> None:
        self.ws = websocket
        self.runtime = runtime
        self.principal = principal
        self.subs: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._counter = 0

    async def send(self, data: bytes) -> None:
        async with self._lock:
            await self.ws.send_text(data.decode())

    async def error(self, sub: str | None, exc: ApiError) -> None:
        body = {"op": "error", "sub": sub, "error": {"code": exc.code, "message": exc.message}}
        await self.send(orjson.dumps(body))

    async def run(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    await self.error(None, BadRequest("Send each message as a text frame holding JSON."))
                    continue
                await self.handle(text)
        except WebSocketDisconnect:
            pass
        finally:
            for task in self.subs.values():
                task.cancel()
            if self.subs:
                await asyncio.wait(list(self.subs.values()), timeout=5)

    async def handle(self, raw: str) -> None:
        try:
            message = WsMessage.model_validate_json(raw)
        except ValidationError as exc:
            await self.error(None, invalid(list(exc.errors())))
            return
        if message.op == "ping":
            await self.send(b'{"op":"pong"}')
        elif message.op == "unsubscribe":
            task = self.subs.pop(message.sub or "", None)
            if task is None:
                await self.error(message.sub, NotFound("No such subscription."))
                return
            task.cancel()
            await self.send(orjson.dumps({"op": "unsubscribed", "sub": message.sub}))
        else:
            await self.subscribe(message)

    async def subscribe(self, message: WsMessage) -> None:
        sub = message.sub or f"s{self._counter + 1}"
        try:
            if sub in self.subs:
                raise BadRequest("A subscription with this name exists on this socket.")
            if len(self.subs) >= MAX_SUBSCRIPTIONS_PER_SOCKET:
                raise BadRequest(f"At most {MAX_SUBSCRIPTIONS_PER_SOCKET} subscriptions per socket.")
            if (message.task_id is None) == (message.filter is None):
                raise BadRequest("Subscribe to either a task_id or a filter.")
            if message.task_id is not None:
                watch = await open_task_watch(self.runtime, self.principal, message.task_id)
                items = task_items(self.runtime, watch, message.task_id, message.after)
            else:
                f = message.filter or WsFilter()
                watch = open_set_watch(
                    self.runtime, self.principal, type=f.type, status=f.status, owner=f.owner
                )
                items = set_items(self.runtime, watch, message.after)
        except ApiError as exc:
            await self.error(sub, exc)
            return
        if message.sub is None:
            self._counter += 1
        await self.send(orjson.dumps({"op": "subscribed", "sub": sub}))
        self.subs[sub] = asyncio.create_task(self._pump(sub, items, watch))

    async def _pump(self, sub: str, items: AsyncGenerator[Batch, None], watch: Watch) -> None:
        tag = orjson.dumps(sub)
        try:
            async for batch in items:
                for item in batch:
                    if not item.name:
                        continue  # WebSocket has its own pings
                    seq = b"null" if item.seq is None else str(item.seq).encode()
                    name = item.name.encode()
                    await self.send(
                        b'{"sub":%s,"id":%s,"event":"%s","data":%s}' % (tag, seq, name, item.data)
                    )
            await self.send(b'{"op":"end","sub":%s}' % tag)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the socket closed under us
        finally:
            watch.close()
            with contextlib.suppress(Exception):
                await items.aclose()
            self.subs.pop(sub, None)


@router.websocket("/v1/ws")
async def websocket_watch(websocket: WebSocket) -> None:
    """JSON messages: ``subscribe`` to a ``task_id`` or a ``filter`` (optionally ``after`` a seq);
    every item comes back as ``{"sub", "id", "event", "data"}`` with ``data`` as on SSE."""
    runtime: Runtime = websocket.app.state.runtime
    principal = websocket.scope.get("errands.principal")
    if not isinstance(principal, Principal):
        await websocket.close(code=4401)
        return
    await websocket.accept()
    await _Socket(websocket, runtime, principal).run()
