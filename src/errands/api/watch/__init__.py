"""Live watches: Server-Sent Events and WebSocket, with gap-free resume (see ``items``)."""

from __future__ import annotations

from typing import Any

from errands.api.routing import Header, Route
from errands.api.tasks import TASK_ID
from errands.api.watch.sse import SetWatchQuery, TaskWatchQuery, watch_task, watch_tasks
from errands.api.watch.ws import websocket_watch
from errands.model import EventType

_LAST_EVENT_ID = Header(
    "Last-Event-ID",
    {"type": "string", "pattern": r"^\s*([0-9]{1,19})?\s*$"},
    "Resume after this seq (browsers' EventSource sends it when it reconnects); empty: from the start.",
)
_TASK_EVENTS = ["task.snapshot", *(e.value for e in EventType), "overflow"]
_SET_EVENTS = ["tasks.snapshot", "reset", *(e.value for e in EventType), "overflow"]


def stream_of(names: list[str]) -> dict[str, Any]:
    """One Server-Sent Event, as OpenAPI describes the items of an event stream: ``data`` is a
    JSON document, ``id`` the seq to resume after."""
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string", "enum": names},
            "id": {"type": "string", "pattern": "^[0-9]+$", "description": "The seq: resume after it."},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "description": "An event ({seq, type, at, task}), a snapshot, or a notice (overflow, reset).",
            },
            "retry": {"type": "integer", "minimum": 0},
        },
    }


ROUTES = [
    Route(
        "GET",
        "/v1/tasks/{task_id}/watch",
        watch_task,
        "Watch one task (SSE)",
        "watch",
        path_params=(TASK_ID,),
        query=TaskWatchQuery,
        headers=(_LAST_EVENT_ID,),
        response=stream_of(_TASK_EVENTS),
        media_type="text/event-stream",
        errors=(400, 401, 403, 404, 410, 422, 429),
    ),
    Route(
        "GET",
        "/v1/watch",
        watch_tasks,
        "Watch a set of tasks (SSE)",
        "watch",
        query=SetWatchQuery,
        headers=(_LAST_EVENT_ID,),
        response=stream_of(_SET_EVENTS),
        media_type="text/event-stream",
        errors=(400, 401, 403, 422, 429),
    ),
    Route(
        "GET",
        "/v1/ws",
        websocket_watch,
        "Watch tasks over one WebSocket",
        "watch",
        websocket=True,
        documented=False,
    ),
]
