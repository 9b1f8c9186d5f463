"""Watches as Server-Sent Events: ``GET /v1/tasks/{task_id}/watch`` and ``GET /v1/watch``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from errands.api.routing import Call
from errands.api.watch.items import (
    Batch,
    Item,
    open_set_watch,
    open_task_watch,
    resume_point,
    set_items,
    task_items,
)
from errands.hub import Watch
from errands.inputs import TYPE_PATTERN, Owner, Seq
from errands.model import Status
from errands.model.streams import StreamChoice

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


class TaskWatchQuery(BaseModel):
    """Where to resume (``access_token`` is read by the guard, before routing)."""

    model_config = ConfigDict(extra="ignore")

    after: Annotated[Seq | None, Field(description="Resume after this seq (or send Last-Event-ID).")] = None
    streams: Annotated[
        StreamChoice,
        Field(description="Streams: `none`, `include` (task.stream events too), `only` (them, and the end)."),
    ] = "none"
    compact: Annotated[
        bool,
        Field(
            description="After a task's first event, send only the fields that changed (and id, status, seq)."
        ),
    ] = False


class SetWatchQuery(TaskWatchQuery):
    streams: Annotated[
        StreamChoice,
        Field(description="Streams: `none`, `include` (task.stream events too), `only` (them, and ends)."),
    ] = "none"
    type: Annotated[str, Field(pattern=TYPE_PATTERN, description="Only tasks of this type.")] | None = None
    status: Annotated[Status | None, Field(description="Only events that leave a task in this status.")] = (
        None
    )
    owner: Annotated[Owner | None, Field(description="Admins only: this owner's tasks.")] = None


def _resume(call: Call, after: int | None) -> int | None:
    return resume_point(call.header(b"last-event-id"), after)


async def watch_task(call: Call) -> Response:
    """``task.snapshot``, then every change as it commits, each with ``id: <seq>``; the stream
    ends after a terminal event. Reconnect with ``Last-Event-ID`` (or ``?after=``) to resume:
    every event after it is sent, none twice."""
    q = call.query(TaskWatchQuery)
    resume = _resume(call, q.after)
    task_id = call.path_params["task_id"]
    watch = await open_task_watch(call.runtime, call.principal, task_id, streams=q.streams)
    return EventStream(task_items(call.runtime, watch, task_id, resume, compact=q.compact), watch)


async def watch_tasks(call: Call) -> Response:
    """``tasks.snapshot`` (the matching unfinished tasks), then every matching event. Resume as
    for one task; a resume point older than the log gets ``reset`` and a fresh snapshot."""
    q = call.query(SetWatchQuery)
    resume = _resume(call, q.after)
    watch = open_set_watch(
        call.runtime, call.principal, type=q.type, status=q.status, owner=q.owner, streams=q.streams
    )
    return EventStream(set_items(call.runtime, watch, resume, compact=q.compact), watch)
