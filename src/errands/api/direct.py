"""The routes served ahead of FastAPI's routing: the SSE watches, task submission, webhooks.

They are paid for far more often than the rest. A watcher holds its request open for minutes or
hours, so whatever a request allocates is multiplied by every open watch and sits on every
event's way out; submission is the call every client makes for every task, and a provider
sends a webhook or two per task. FastAPI's
per-request machinery (routing through the included routers, exit stacks, exception wrappers)
cost about as much again as the work itself on both. The routes stay declared in FastAPI for
the OpenAPI document (the watches are added to it here), and answer errors exactly as the
FastAPI routes do (:func:`errands.api.errors.response_for`). The guard has authenticated the
caller and holds the body to its size limit before this runs.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from errands.api.errors import response_for
from errands.api.hooks import capability_response, inbound_of, signed_response
from errands.api.middleware import PRINCIPAL
from errands.api.tasks import submit_response
from errands.api.watch import open_stream
from errands.auth import Principal
from errands.errors import Unauthorized
from errands.inputs import TASK_ID_PATTERN, TYPE_PATTERN
from errands.model import Status
from errands.runtime import Runtime

_TASK_WATCH = re.compile(r"^/v1/tasks/([^/]*)/watch$")
#: ``/v1/hooks/{provider}`` and ``/v1/hooks/callback/{token}`` (one path segment each, as routed).
_HOOK = re.compile(r"^/v1/hooks/(callback/)?[^/]+$")


class DirectRoutes:
    """ASGI middleware answering ``POST /v1/tasks``, ``POST /v1/hooks/…``,
    ``GET /v1/tasks/{id}/watch`` and ``GET /v1/watch`` itself, and passing everything else on
    to FastAPI."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and (path == "/v1/tasks" or _HOOK.match(path)):
                try:
                    response = await self._post(scope, path, await _read_body(receive))
                except Exception as exc:
                    response = response_for(exc)
                await response(scope, receive, send)
                return
            match = _TASK_WATCH.match(path) if method == "GET" else None
            if match is not None or (method == "GET" and path == "/v1/watch"):
                try:
                    task_id = None if match is None else match.group(1)
                    stream: Response = await open_stream(self.runtime, scope, task_id)
                except Exception as exc:
                    stream = response_for(exc)
                await stream(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _post(self, scope: Scope, path: str, body: bytes) -> Response:
        if path == "/v1/tasks":
            return await submit_response(self.runtime, _principal(scope), body)
        target = path.removeprefix("/v1/hooks/")
        if target.startswith("callback/"):
            return await capability_response(
                self.runtime, target.removeprefix("callback/"), inbound_of(scope, body)
            )
        return await signed_response(self.runtime, target, inbound_of(scope, body))


def _principal(scope: Scope) -> Principal:
    principal = scope.get(PRINCIPAL)
    if not isinstance(principal, Principal):
        raise Unauthorized()
    return principal


async def _read_body(receive: Receive) -> bytes:
    """The whole request body (the guard's receive raises once it passes the size limit)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _param(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


_RESUME = [
    _param("after", "query", {"type": "integer", "minimum": 0}, "Resume after this seq."),
    _param("Last-Event-ID", "header", {"type": "string"}, "Resume after this seq (sent by EventSource)."),
    _param("access_token", "query", {"type": "string"}, "The token, for clients that cannot set headers."),
]
_STREAM_RESPONSES = {
    "200": {
        "description": "An event stream.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    "401": {"description": "No valid token."},
    "404": {"description": "No such task (or another owner's)."},
    "429": {"description": "Too many open watches."},
}

#: The SSE endpoints' entries in the OpenAPI document (they are not FastAPI routes).
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/tasks/{task_id}/watch": {
        "get": {
            "tags": ["watch"],
            "summary": "Watch one task (SSE)",
            "description": "`task.snapshot`, then every change as it commits, each with `id: <seq>`; the "
            "stream ends after a terminal event. Reconnect with `Last-Event-ID` (or `?after=`) to resume.",
            "operationId": "watch_task",
            "parameters": [
                _param("task_id", "path", {"type": "string", "pattern": TASK_ID_PATTERN}, "The task id."),
                *_RESUME,
            ],
            "responses": _STREAM_RESPONSES,
        }
    },
    "/v1/watch": {
        "get": {
            "tags": ["watch"],
            "summary": "Watch a set of tasks (SSE)",
            "description": "`tasks.snapshot` (the matching unfinished tasks), then every matching event. "
            "Resume as for one task; a resume point older than the log gets `reset` and a fresh snapshot.",
            "operationId": "watch_tasks",
            "parameters": [
                _param("type", "query", {"type": "string", "pattern": TYPE_PATTERN}, "Only this task type."),
                _param("status", "query", {"type": "string", "enum": [s.value for s in Status]},
                       "Only events that leave a task in this status."),
                _param("owner", "query", {"type": "string"}, "Admins only: this owner's tasks."),
                *_RESUME,
            ],
            "responses": _STREAM_RESPONSES,
        }
    },
}  # fmt: skip
