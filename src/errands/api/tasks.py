"""``/v1/tasks``: submit, read, list, cancel, retry, and a task's event log."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from errands.api.deps import PrincipalDep, RuntimeDep, principal_of
from errands.api.errors import parse
from errands.auth import Principal
from errands.inputs import TASK_ID_PATTERN, TYPE_PATTERN, Owner, Seq
from errands.model import Status, Task
from errands.runtime import Runtime
from errands.service import SubmitRequest

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

TaskIdPath = Annotated[str, Path(pattern=TASK_ID_PATTERN, description="The task id.")]


class TaskPage(BaseModel):
    tasks: list[Task]
    next_cursor: str | None


class EventOut(BaseModel):
    seq: int
    type: str
    at: str
    task: Task


class EventPage(BaseModel):
    events: list[EventOut]


class ErrorOut(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorOut


ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 410, 413, 422, 429)
}


def json(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


@router.post(
    "",
    status_code=202,
    response_model=Task,
    responses={200: {"model": Task, "description": "The same request was already accepted."}, **ERRORS},
    summary="Submit a task",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SubmitRequest.model_json_schema()}},
        }
    },
)
async def submit(request: Request) -> Response:
    """Store the task and answer at once: ``202`` when created, ``200`` when this exact request
    (same id, same body) was already accepted, ``409`` when the id is taken by another request."""
    # Served by errands.api.direct ahead of FastAPI's routing; declared here for the OpenAPI
    # document (and for an app mounted without that middleware).
    runtime: Runtime = request.app.state.runtime
    return await submit_response(runtime, principal_of(request), await request.body())


async def submit_response(runtime: Runtime, principal: Principal, body: bytes) -> Response:
    """``POST /v1/tasks``: the body is parsed with pydantic-core directly (strict, unknown
    fields refused), not through FastAPI's dependency machinery."""
    record, created = await runtime.service.submit(parse(SubmitRequest, body), principal)
    return json(record.public_json(), 202 if created else 200)


@router.get("", response_model=TaskPage, responses=ERRORS, summary="List tasks, newest first")
async def list_tasks(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    status: Status | None = None,
    type: Annotated[str | None, Query(pattern=TYPE_PATTERN)] = None,
    owner: Annotated[Owner | None, Query(description="admins only")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    page = await runtime.service.list_tasks(
        principal, status=status, type=type, owner=owner, limit=limit, cursor=cursor
    )
    tasks = b",".join(r.public_json() for r in page.tasks)
    return json(b'{"tasks":[%s],"next_cursor":%s}' % (tasks, orjson.dumps(page.next_cursor)))


@router.get("/{task_id}", response_model=Task, responses=ERRORS, summary="Get a task")
async def get_task(task_id: TaskIdPath, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """The task as it is now; ``410`` once it was purged after its retention period."""
    return json((await runtime.service.get(task_id, principal)).public_json())


@router.post("/{task_id}/cancel", response_model=Task, responses=ERRORS, summary="Cancel a task")
async def cancel_task(task_id: TaskIdPath, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """``pending`` or ``processing`` → ``cancelled``; ``409`` if it already ended. A running
    handler is stopped, and nothing it writes afterwards lands."""
    return json((await runtime.service.cancel(task_id, principal)).public_json())


@router.post("/{task_id}/retry", response_model=Task, responses=ERRORS, summary="Retry a task")
async def retry_task(task_id: TaskIdPath, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """``failed`` or ``timeout`` → ``pending`` with one more attempt; limited per task."""
    return json((await runtime.service.retry(task_id, principal)).public_json())


@router.get("/{task_id}/events", response_model=EventPage, responses=ERRORS, summary="A task's events")
async def task_events(
    task_id: TaskIdPath,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    after: Annotated[Seq, Query(description="Only events with a greater seq.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> Response:
    """The task's events from the log, oldest first."""
    events = await runtime.service.events(task_id, principal, after=after, limit=limit)
    return json(b'{"events":[%s]}' % b",".join(e.to_json() for e in events))
