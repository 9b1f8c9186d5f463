"""Schedules (admin): create, replace, list, read with the next runs, pause, resume, delete."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from errands.api.routing import Call, PathParam, Route
from errands.model.schedules import MAX_NEXT_RUNS, NAME_PATTERN, Schedule
from errands.scheduler import ScheduleRequest

NAME = PathParam("name", NAME_PATTERN, "The schedule's name.")


class ScheduleOut(BaseModel):
    name: str
    type: str
    cron: str
    tz: str
    input: dict[str, Any]
    owner: str | None
    priority: int
    missed: str
    grace_s: float
    paused: bool
    source: str
    next_at: str | None
    last_slot: str | None
    last_task_id: str | None
    created_at: str
    updated_at: str
    next_runs: list[str] | None = None


class SchedulePage(BaseModel):
    schedules: list[ScheduleOut]


class NextQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    next: Annotated[int, Field(ge=0, le=MAX_NEXT_RUNS, description="How many next runs to list.")] = 5


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _out(call: Call, schedule: Schedule, n: int = 5) -> dict[str, Any]:
    return schedule.public(next_runs=call.runtime.scheduler.next_runs(schedule, n))


async def create_schedule(call: Call) -> Response:
    """A task of ``type`` is submitted at each slot of ``cron`` (five fields, or six with
    seconds first) in ``tz``, once per slot across all nodes; its id is the schedule's name and
    the slot (``digest-20261203T010000Z``). ``201`` when created; the same definition again
    answers ``200``, another one ``409`` (replace it with ``PUT``)."""
    schedule, created = await call.runtime.scheduler.put(await call.json(ScheduleRequest), call.principal)
    return _json(_out(call, schedule), 201 if created else 200)


async def replace_schedule(call: Call) -> Response:
    """Create or replace the schedule of this name (``201`` when created). A replaced schedule
    moves to its new definition's next slot; a paused one stays paused."""
    schedule, created = await call.runtime.scheduler.put(
        await call.json(ScheduleRequest), call.principal, name=call.path_params["name"]
    )
    return _json(_out(call, schedule), 201 if created else 200)


async def list_schedules(call: Call) -> Response:
    """Every schedule, by name."""
    found = await call.runtime.scheduler.list_all(call.principal)
    return _json({"schedules": [_out(call, s, 1) for s in found]})


async def get_schedule(call: Call) -> Response:
    """The schedule and its next ``next`` runs."""
    query = call.query(NextQuery)
    schedule = await call.runtime.scheduler.get(call.path_params["name"], call.principal)
    return _json(_out(call, schedule, query.next))


async def pause_schedule(call: Call) -> Response:
    """No slot fires until it is resumed."""
    schedule = await call.runtime.scheduler.pause(call.path_params["name"], call.principal, paused=True)
    return _json(_out(call, schedule))


async def resume_schedule(call: Call) -> Response:
    """Fire again from the next slot after now (the slots that passed while paused do not run)."""
    schedule = await call.runtime.scheduler.pause(call.path_params["name"], call.principal, paused=False)
    return _json(_out(call, schedule))


async def delete_schedule(call: Call) -> Response:
    """Delete the schedule; the tasks it submitted stay."""
    await call.runtime.scheduler.delete(call.path_params["name"], call.principal)
    return Response(status_code=204)


_TAG = "schedules"
_ONE = "/v1/schedules/{name}"
_ADMIN = (401, 403, 404, 422)

ROUTES = [
    Route(
        "POST", "/v1/schedules", create_schedule, "Create a schedule", _TAG, status=201,
        body=ScheduleRequest, response=ScheduleOut, errors=(400, 401, 403, 409, 413, 422),
        answers={200: ("The same schedule existed.", ScheduleOut)},
    ),
    Route(
        "GET", "/v1/schedules", list_schedules, "List schedules", _TAG, response=SchedulePage,
        errors=(401, 403),
    ),
    Route(
        "GET", _ONE, get_schedule, "Get a schedule and its next runs", _TAG, path_params=(NAME,),
        query=NextQuery, response=ScheduleOut, errors=_ADMIN,
    ),
    Route(
        "PUT", _ONE, replace_schedule, "Create or replace a schedule", _TAG, path_params=(NAME,),
        body=ScheduleRequest, response=ScheduleOut, answers={201: ("Created.", ScheduleOut)},
        errors=(400, 401, 403, 413, 422),
    ),
    Route(
        "POST", f"{_ONE}/pause", pause_schedule, "Pause a schedule", _TAG, path_params=(NAME,),
        response=ScheduleOut, errors=_ADMIN,
    ),
    Route(
        "POST", f"{_ONE}/resume", resume_schedule, "Resume a schedule", _TAG, path_params=(NAME,),
        response=ScheduleOut, errors=_ADMIN,
    ),
    Route(
        "DELETE", _ONE, delete_schedule, "Delete a schedule", _TAG, status=204, path_params=(NAME,),
        errors=_ADMIN,
    ),
]  # fmt: skip
