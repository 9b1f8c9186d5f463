"""Watches over one WebSocket: ``/v1/ws``, any number of subscriptions per socket.

Messages are JSON text frames: ``{"op": "subscribe", "task_id" | "filter", "after"?, "sub"?}``,
``{"op": "unsubscribe", "sub"}`` and ``{"op": "ping"}``. Every item a watch sends comes back as
``{"sub", "id", "event", "data"}`` with ``data`` as on SSE; a refused message gets
``{"op": "error", "sub", "error"}`` and the socket stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from errands.api.errors import invalid
from errands.api.routing import Call
from errands.api.watch.items import Batch, open_set_watch, open_task_watch, set_items, task_items
from errands.auth import Principal
from errands.errors import ApiError, BadRequest, NotFound
from errands.hub import Watch
from errands.inputs import TASK_ID_PATTERN, TYPE_PATTERN, Owner, Seq
from errands.model import Status
from errands.model.streams import StreamChoice

if TYPE_CHECKING:
    from errands.runtime import Runtime


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
    #: Output streams (see the SSE routes).
    streams: StreamChoice = "none"
    compact: bool = False


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
                watch = await open_task_watch(
                    self.runtime, self.principal, message.task_id, streams=message.streams
                )
                items = task_items(
                    self.runtime, watch, message.task_id, message.after, compact=message.compact
                )
            else:
                f = message.filter or WsFilter()
                watch = open_set_watch(
                    self.runtime,
                    self.principal,
                    type=f.type,
                    status=f.status,
                    owner=f.owner,
                    streams=message.streams,
                )
                items = set_items(self.runtime, watch, message.after, compact=message.compact)
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


async def websocket_watch(call: Call) -> None:
    """JSON text frames. Send `{"op": "subscribe", "task_id": …}` or `{"op": "subscribe",
    "filter": {"type"?, "status"?, "owner"?}}` (optionally with `"after": <seq>` to resume and
    `"sub": <your name for it>`), `{"op": "unsubscribe", "sub": …}` or `{"op": "ping"}`. Each
    item of a watch comes back as `{"sub", "id", "event", "data"}` with `data` as on SSE; the
    socket answers `subscribed`, `unsubscribed`, `pong`, `end` (a watched task ended) and
    `{"op": "error", "sub", "error"}` for a refused frame (the socket stays open). A handshake
    without a valid token is refused with 401; one from a page of another origin with 403."""
    assert call.send is not None, "a WebSocket route is called with its send"
    websocket = WebSocket(call.scope, call.receive, call.send)
    principal = call.principal  # the guard refused the handshake of anyone else
    await websocket.accept()
    await _Socket(websocket, call.runtime, principal).run()
