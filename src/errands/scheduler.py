"""Schedules on behalf of a caller (the ``/v1/schedules`` API, the app's declarations), and the
loop that fires them.

Every node that runs a sweeper runs the loop. It sleeps until the earliest next slot of any
schedule (read from an index; woken at once when a schedule is stored here, and every
``schedule_poll_s`` for those stored by other nodes), then fires each due schedule: the store
moves the schedule's ``next_at`` on with a compare-and-set and creates the slot's task in the
same transaction, so each slot makes one task however many nodes fire it. The task is an
ordinary submission (``service.prepare``): same defaults, same checks, same events.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from errands.auth import SYSTEM, Principal
from errands.clock import Clock, on_advance
from errands.config import Settings
from errands.errors import Conflict, Forbidden, InvalidRequest, NotFound, UnknownTaskType
from errands.inputs import BadValue, Owner, Priority, Text, TypeName, check_json
from errands.model.schedules import (
    MAX_NEXT_RUNS,
    NAME_PATTERN,
    BadSchedule,
    Schedule,
    ScheduleSpec,
    check,
    fire,
    next_slots,
    slot_task_id,
)
from errands.registry import Registry
from errands.service import Service, SubmitRequest
from errands.store.base import Schedules
from errands.waits import wait_set

log = logging.getLogger("errands.scheduler")


class ScheduleRequest(BaseModel):
    """The body of ``POST /v1/schedules`` (and ``PUT /v1/schedules/{name}``, without ``name``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    type: TypeName
    cron: Annotated[Text, Field(min_length=1, max_length=200)]
    tz: Annotated[Text, Field(min_length=1, max_length=64)] = "UTC"
    input: dict[str, Any] = Field(default_factory=dict)
    owner: Owner | None = None
    priority: Priority = 0
    missed: Literal["last", "skip"] = "last"
    grace_s: float = Field(60.0, gt=0, le=86_400)


class Scheduler:
    def __init__(
        self, store: Schedules, service: Service, registry: Registry, settings: Settings, *, clock: Clock
    ) -> None:
        self.store = store
        self.service = service
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        on_advance(clock, self._wake.set)

    # -- on behalf of a caller -----------------------------------------------------------------

    def _spec(self, body: ScheduleRequest, name: str) -> ScheduleSpec:
        if body.type not in self.registry.task_types:
            raise UnknownTaskType(f"No handler or provider is registered for task type '{body.type}'.")
        try:
            check_json(body.input, what="input", max_depth=self.settings.max_json_depth)
            spec = ScheduleSpec(
                name,
                body.type,
                body.cron,
                body.tz,
                body.input,
                body.owner,
                body.priority,
                body.missed,
                body.grace_s,
            )
            check(spec, now=self.clock.now())
        except (BadValue, BadSchedule) as exc:
            raise InvalidRequest(f"{exc}".rstrip(".") + ".") from None
        return spec

    async def put(
        self, body: ScheduleRequest, principal: Principal, *, name: str | None = None
    ) -> tuple[Schedule, bool]:
        """Create a schedule (``name`` from the path replaces one of that name instead):
        ``(it, created)``. Creating one that exists with the same definition answers it; with
        another, :class:`Conflict`."""
        _admin(principal)
        replace = name is not None
        if name is None:
            if body.name is None:
                raise InvalidRequest("name: required.")
            name = body.name
        elif body.name is not None and body.name != name:
            raise InvalidRequest("name: the body names another schedule than the path.")
        spec = self._spec(body, name)
        schedule, created = await self.store.put_schedule(
            spec, source="api", next_at=self._first_slot(spec), replace=replace
        )
        if not created and not replace and schedule.spec != spec:
            raise Conflict(
                f"A schedule named '{name}' exists with another definition.", code="schedule_exists"
            )
        self._wake.set()
        return schedule, created

    async def get(self, name: str, principal: Principal) -> Schedule:
        _admin(principal)
        schedule = await self.store.get_schedule(name)
        if schedule is None:
            raise NotFound("No schedule has this name.")
        return schedule

    async def list_all(self, principal: Principal) -> list[Schedule]:
        _admin(principal)
        return await self.store.list_schedules()

    async def delete(self, name: str, principal: Principal) -> None:
        _admin(principal)
        if not await self.store.delete_schedule(name):
            raise NotFound("No schedule has this name.")

    async def pause(self, name: str, principal: Principal, *, paused: bool) -> Schedule:
        """Pause (no slot fires), or resume from the next slot after now (the slots that passed
        while it was paused are not run)."""
        current = await self.get(name, principal)
        next_at = current.next_at if paused else self._first_slot(current.spec)
        schedule = await self.store.pause_schedule(name, paused=paused, next_at=next_at)
        if schedule is None:
            raise NotFound("No schedule has this name.")
        self._wake.set()
        return schedule

    def next_runs(self, schedule: Schedule, n: int) -> list[float]:
        """The next ``n`` slots (none while paused)."""
        if schedule.paused or schedule.next_at is None or n <= 0:
            return []
        return [
            schedule.next_at,
            *next_slots(schedule.spec, after=schedule.next_at, n=min(n, MAX_NEXT_RUNS) - 1),
        ]

    def _first_slot(self, spec: ScheduleSpec) -> float | None:
        slots = next_slots(spec, after=self.clock.now(), n=1)
        return slots[0] if slots else None

    # -- the app's declarations ---------------------------------------------------------------

    async def declare(self) -> None:
        """Store the app's declared schedules: a new one from its next slot, a changed one
        replaced (paused stays paused), an unchanged one left as it is. One the app declared
        before and no longer does is paused (not deleted: an operator may resume or delete it)."""
        declared = self.registry.schedules
        for spec in declared.values():
            current = await self.store.get_schedule(spec.name)
            if current is None or current.spec != spec or current.source != "app":
                first = self._first_slot(spec)
                await self.store.put_schedule(spec, source="app", next_at=first, replace=True)
                if current is not None and current.source == "undeclared" and current.paused:
                    # errands paused it when a release stopped declaring it: this one does again.
                    await self.store.pause_schedule(spec.name, paused=False, next_at=first)
                    log.info("schedule %s is declared again: resumed", spec.name)
        for schedule in await self.store.list_schedules():
            name = schedule.spec.name
            if schedule.source == "app" and name not in declared:
                # Paused, not deleted (an operator may resume or delete it), and marked as paused
                # by errands, so that a release that declares it again resumes it.
                await self.store.pause_schedule(name, paused=True, next_at=schedule.next_at)
                await self.store.put_schedule(
                    schedule.spec, source="undeclared", next_at=schedule.next_at, replace=True
                )
                log.warning("schedule %s is no longer declared by the app: paused", name)

    # -- the loop -----------------------------------------------------------------------------

    async def tick(self) -> int:
        """Fire every due schedule once; how many slots made a task."""
        now = self.clock.now()
        made = 0
        for schedule in await self.store.due_schedules(now=now, limit=100):
            firing = fire(schedule, now=now)
            task = None
            if firing.slot is not None:
                spec = schedule.spec
                try:
                    request = SubmitRequest(
                        type=spec.type,
                        input=spec.input,
                        id=slot_task_id(spec.name, firing.slot),
                        owner=spec.owner,
                        priority=spec.priority,
                    )
                    task = await self.service.prepare(request, SYSTEM)
                except (UnknownTaskType, InvalidRequest, ValidationError) as exc:
                    # Its type is gone from the app, or it was stored by an older errands that
                    # checked less: the slot passes (logged), the other schedules fire on.
                    log.warning("schedule %s cannot submit: %s", spec.name, exc)
            moved, record = await self.store.fire_schedule(
                schedule, slot=None if task is None else firing.slot, next_at=firing.next_at, task=task
            )
            if moved and firing.skipped:
                log.info("schedule %s: %d missed slots skipped", schedule.spec.name, firing.skipped)
            if moved and record is not None:
                made += 1
        return made

    async def run(self) -> None:
        """Fire schedules as they come due, until cancelled."""
        while True:
            wait_s = self.settings.schedule_poll_s
            self._wake.clear()  # before the tick: a schedule stored meanwhile wakes the next
            try:
                await self.tick()
                upcoming = await self.store.next_schedule_at()
                self.last_error = None
                if upcoming is not None:
                    wait_s = min(wait_s, max(0.0, upcoming - self.clock.now()))
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("firing schedules failed")
            await wait_set(self._wake, wait_s)


def _admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden("Only an admin may manage schedules.")
