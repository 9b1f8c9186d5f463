"""``/v1/tasks``: submit, read, list, cancel, retry, and a task's event log."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from errands.api.routing import Call, PathParam, Route
from errands.api.schemas import BulkOut, CountOut, EventPage, TaskPage
from errands.inputs import TASK_ID_PATTERN, TYPE_PATTERN, Moment, Owner, Seq, integral, parse
from errands.model import Status, Task
from errands.model.streams import StreamChoice
from errands.overview import MAX_BULK
from errands.service import MAX_BATCH, Selection, SubmitRequest

TASK_ID = PathParam("task_id", TASK_ID_PATTERN, "The task id.")


def json(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


class SelectionQuery(BaseModel):
    """Which tasks (a list's, a count's, a bulk action's): every parameter narrows it."""

    model_config = ConfigDict(extra="ignore")

    status: Status | None = None
    type: Annotated[str, Field(pattern=TYPE_PATTERN)] | None = None
    owner: Annotated[Owner | None, Field(description="Admins only: this owner's tasks.")] = None
    id_prefix: Annotated[
        str | None, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Tasks whose id starts with this.")
    ] = None
    created_after: Annotated[
        Moment | None, Field(description="Created at or after (RFC 3339, with an offset).")
    ] = None
    created_before: Annotated[Moment | None, Field(description="Created before (RFC 3339).")] = None

    def selection(self) -> Selection:
        return Selection(
            status=self.status,
            type=self.type,
            owner=self.owner,
            id_prefix=self.id_prefix,
            created_after=None if self.created_after is None else self.created_after.timestamp(),
            created_before=None if self.created_before is None else self.created_before.timestamp(),
        )


class ListQuery(SelectionQuery):
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: Annotated[str | None, Field(max_length=512, description="next_cursor of the page before.")] = None


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    after: Annotated[Seq, Field(description="Only events with a greater seq.")] = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 1000
    streams: Annotated[
        StreamChoice,
        Field(description="Output (task.stream events): `none`, `include`, or `only` them (and ends)."),
    ] = "none"


async def submit(call: Call) -> Response:
    """Store the task and answer at once: ``202`` when created, ``200`` when this exact request
    (same id, same body) was already accepted, ``409`` when the id is taken by another request."""
    request = await call.json(SubmitRequest)
    record, created = await call.runtime.service.submit(request, call.principal)
    return json(record.public_json(), 202 if created else 200)


class BatchRequest(BaseModel):
    """The body of ``POST /v1/tasks/batch``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: Annotated[
        list[Any], Field(min_length=1, max_length=MAX_BATCH, description="Each a POST /v1/tasks body.")
    ]


class _ValidBatch(BaseModel):
    """A batch whose every item is valid, validated in one pass (the common case): the same
    rules as :class:`BatchRequest` then :class:`SubmitRequest` for each item."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: Annotated[list[SubmitRequest], Field(min_length=1, max_length=MAX_BATCH)]


class BatchResult(BaseModel):
    """One item's answer: ``status`` 202 (created) or 200 (the same request, already accepted)
    with its ``task``, or a 4xx with its ``error``."""

    status: int
    task: Task | None = None
    error: dict[str, str] | None = None


class BatchAnswer(BaseModel):
    results: list[BatchResult]


async def submit_batch(call: Call) -> Response:
    """Up to 1,000 submissions in one transaction, far cheaper than one call each: a result per
    item, in order. One refused item (invalid, a conflict, the owner's limit) refuses only
    itself; each item is idempotent by its id, as alone."""
    body = await call.body()
    try:
        items: list[Any] = list(_ValidBatch.model_validate_json(body).tasks)
    except ValidationError:  # some item is refused: each is validated alone, and answered so
        items = parse(BatchRequest, body).tasks
    answers = await call.runtime.service.submit_many(items, call.principal)
    parts = []
    for answer in answers:
        if isinstance(answer, tuple):
            record, created = answer
            parts.append(b'{"status":%d,"task":%s}' % (202 if created else 200, record.public_json()))
        else:
            error = orjson.dumps({"code": answer.code, "message": answer.message})
            parts.append(b'{"status":%d,"error":%s}' % (answer.status_code, error))
    return json(b'{"results":[%s]}' % b",".join(parts))


async def list_tasks(call: Call) -> Response:
    """Newest first, a page at a time (``next_cursor``); an owner token sees its own tasks only."""
    q = call.query(ListQuery)
    service = call.runtime.service
    page = await service.list_tasks(call.principal, q.selection(), limit=q.limit, cursor=q.cursor)
    tasks = b",".join(r.public_json() for r in page.tasks)
    return json(b'{"tasks":[%s],"next_cursor":%s}' % (tasks, orjson.dumps(page.next_cursor)))


class CountQuery(SelectionQuery):
    by: Annotated[Literal["status"] | None, Field(description="`status`: a count per status too.")] = None


async def count_tasks(call: Call) -> Response:
    """How many tasks match the selection (an owner token counts its own); with ``by=status``
    also ``by_status``, every status's count, read at once."""
    q = call.query(CountQuery)
    overview = call.runtime.overview
    if q.by == "status":
        by_status = await overview.count_by_status(call.principal, q.selection())
        return json(orjson.dumps({"count": sum(by_status.values()), "by_status": by_status}))
    return json(orjson.dumps({"count": await overview.count(call.principal, q.selection())}))


class BulkSelection(SelectionQuery):
    """A bulk action's selection: a misspelt field is refused, never ignored (it would widen
    the action to every task)."""

    model_config = ConfigDict(extra="forbid")


class BulkRequest(BaseModel):
    """The body of ``POST /v1/tasks/bulk``: an action, the selection, and where to go on."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["cancel", "retry"]
    selection: BulkSelection = Field(default_factory=BulkSelection)
    limit: Annotated[int, Field(ge=1, le=MAX_BULK), integral] = MAX_BULK
    cursor: Annotated[str, Field(max_length=512, description="next_cursor of the call before.")] | None = None


async def bulk(call: Call) -> Response:
    """Cancel (pending, running) or retry (failed, timed out) the next ``limit`` tasks of the
    selection, newest first; call again with ``next_cursor`` until it is ``null``. Answers
    ``{"done", "skipped", "next_cursor"}`` (skipped: tasks that changed meanwhile, or used up
    their manual retries)."""
    body = await call.json(BulkRequest)
    result = await call.runtime.overview.bulk(
        call.principal, body.action, body.selection.selection(), limit=body.limit, cursor=body.cursor
    )
    return json(orjson.dumps(result.public()))


async def get_task(call: Call) -> Response:
    """The task as it is now; ``410`` once it was purged after its retention period."""
    return json((await call.runtime.service.read(call.path_params["task_id"], call.principal)).public_json())


async def cancel_task(call: Call) -> Response:
    """``pending`` or ``processing`` → ``cancelled``; ``409`` if it already ended. A running
    handler is stopped, and nothing it writes afterwards lands."""
    record = await call.runtime.service.cancel(call.path_params["task_id"], call.principal)
    return json(record.public_json())


async def retry_task(call: Call) -> Response:
    """``failed`` or ``timeout`` → ``pending`` with one more attempt; limited per task."""
    record = await call.runtime.service.retry(call.path_params["task_id"], call.principal)
    return json(record.public_json())


async def task_events(call: Call) -> Response:
    """The task's events from the log, oldest first."""
    q = call.query(EventsQuery)
    events = await call.runtime.service.events(
        call.path_params["task_id"], call.principal, after=q.after, limit=q.limit, streams=q.streams
    )
    return json(b'{"events":[%s]}' % b",".join(e.to_json() for e in events))


_STATE = (400, 401, 403, 404, 409, 410, 413, 422, 429)

ROUTES = [
    Route(
        "POST",
        "/v1/tasks",
        submit,
        "Submit a task",
        "tasks",
        status=202,
        body=SubmitRequest,
        response=Task,
        answers={200: ("The same request was already accepted.", Task)},
        errors=(400, 401, 402, 403, 409, 413, 422, 429),
    ),
    Route(
        "POST",
        "/v1/tasks/batch",
        submit_batch,
        "Submit many tasks at once",
        "tasks",
        body=BatchRequest,
        response=BatchAnswer,
        errors=(400, 401, 403, 413, 422, 429),
    ),
    Route(
        "GET",
        "/v1/tasks/count",
        count_tasks,
        "Count the tasks of a selection",
        "tasks",
        query=CountQuery,
        response=CountOut,
        errors=(400, 401, 403, 422),
    ),
    Route(
        "POST",
        "/v1/tasks/bulk",
        bulk,
        "Cancel or retry every task of a selection, a page at a time",
        "tasks",
        body=BulkRequest,
        response=BulkOut,
        errors=(400, 401, 403, 413, 422),
    ),
    Route(
        "GET",
        "/v1/tasks",
        list_tasks,
        "List tasks, newest first",
        "tasks",
        query=ListQuery,
        response=TaskPage,
    ),
    Route(
        "GET",
        "/v1/tasks/{task_id}",
        get_task,
        "Get a task",
        "tasks",
        path_params=(TASK_ID,),
        response=Task,
        errors=(401, 403, 404, 410, 422),
    ),
    Route(
        "POST",
        "/v1/tasks/{task_id}/cancel",
        cancel_task,
        "Cancel a task",
        "tasks",
        path_params=(TASK_ID,),
        response=Task,
        errors=_STATE,
    ),
    Route(
        "POST",
        "/v1/tasks/{task_id}/retry",
        retry_task,
        "Retry a task",
        "tasks",
        path_params=(TASK_ID,),
        response=Task,
        errors=(402, *_STATE),
    ),
    Route(
        "GET",
        "/v1/tasks/{task_id}/events",
        task_events,
        "A task's events",
        "tasks",
        path_params=(TASK_ID,),
        query=EventsQuery,
        response=EventPage,
        errors=(401, 403, 404, 410, 422),
    ),
]
