"""Schedules: stored, read, paused, and fired (the slot's task created with the schedule moved on,
in one transaction)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import orjson

from errands.model import NewTask, TaskRecord, create
from errands.model.schedules import Schedule, ScheduleSpec
from errands.store.shared import Dialect, Tx

_COLUMNS = "name, definition, source, paused, next_at, last_slot, last_task_id, created_at, updated_at"

#: The same SQL on both stores but for the table's name (``{t}``) and placeholders (``{n}``).
_SQL = {
    "insert": (
        f"INSERT INTO {{t}} ({_COLUMNS}) VALUES ({{1}}, {{2}}, {{3}}, {{4}}, {{5}}, NULL, NULL, {{6}}, {{6}}) "
        "ON CONFLICT (name) DO NOTHING"
    ),
    "replace": (
        "UPDATE {t} SET definition = {2}, source = {3}, next_at = {4}, updated_at = {5} WHERE name = {1}"
    ),
    "select": f"SELECT {_COLUMNS} FROM {{t}} WHERE name = {{1}}",
    "list": f"SELECT {_COLUMNS} FROM {{t}} ORDER BY name",
    "delete": "DELETE FROM {t} WHERE name = {1}",
    "pause": "UPDATE {t} SET paused = {2}, next_at = {3}, updated_at = {4} WHERE name = {1}",
    "due": f"SELECT {_COLUMNS} FROM {{t}} WHERE paused = 0 AND next_at <= {{1}} ORDER BY next_at LIMIT {{2}}",
    "next": "SELECT min(next_at) FROM {t} WHERE paused = 0",
    # A compare-and-set on next_at: of two nodes firing the same slot, one moves it on.
    "advance": (
        "UPDATE {t} SET next_at = {2}, last_slot = coalesce({3}, last_slot), "
        "last_task_id = coalesce({4}, last_task_id), updated_at = {5} "
        # As it was read: the same next slot, and not replaced, paused or resumed since.
        "WHERE name = {1} AND next_at = {6} AND updated_at = {7} AND paused = 0"
    ),
}


def _schedule(row: Sequence[Any]) -> Schedule:
    name, definition, source, paused, next_at, last_slot, last_task_id, created_at, updated_at = row
    return Schedule(
        spec=ScheduleSpec.of(name, orjson.loads(definition)),
        source=source,
        paused=bool(paused),
        next_at=next_at,
        last_slot=last_slot,
        last_task_id=last_task_id,
        created_at=created_at,
        updated_at=updated_at,
    )


class ScheduleOps(Dialect):
    #: The dialect's name for the table.
    schedules_table: str

    @functools.cached_property
    def _schedule_sql(self) -> dict[str, str]:
        def fill(sql: str) -> str:
            for n in range(1, 10):
                sql = sql.replace(f"{{{n}}}", self.sql.param(n))
            return sql.replace("{t}", self.schedules_table)

        return {k: fill(v) for k, v in _SQL.items()}

    async def put_schedule(
        self, spec: ScheduleSpec, *, source: str, next_at: float | None, replace: bool
    ) -> tuple[Schedule, bool]:
        """Store a schedule: ``(it, True)`` when new. An existing one is kept as it is unless
        ``replace`` (then its definition and next slot change; paused stays paused)."""
        now = self.clock.now()
        definition = orjson.dumps(spec.definition(), option=orjson.OPT_SORT_KEYS).decode()
        sql = self._schedule_sql

        async def op(tx: Tx) -> tuple[Schedule, bool]:
            created = await tx.execute(sql["insert"], spec.name, definition, source, 0, next_at, now) > 0
            if not created and replace:
                await tx.execute(sql["replace"], spec.name, definition, source, next_at, now)
            return _schedule((await tx.fetch(sql["select"], spec.name))[0]), created

        return await self._write(op, mode="own")

    async def get_schedule(self, name: str) -> Schedule | None:
        rows = await self._fetch(self._schedule_sql["select"], name)
        return _schedule(rows[0]) if rows else None

    async def list_schedules(self) -> list[Schedule]:
        return [_schedule(r) for r in await self._fetch(self._schedule_sql["list"])]

    async def delete_schedule(self, name: str) -> bool:
        async def op(tx: Tx) -> bool:
            return await tx.execute(self._schedule_sql["delete"], name) > 0

        return await self._write(op, mode="own")

    async def pause_schedule(self, name: str, *, paused: bool, next_at: float | None) -> Schedule | None:
        """Pause it, or resume it from ``next_at``; ``None`` if there is no such schedule."""
        now = self.clock.now()
        sql = self._schedule_sql

        async def op(tx: Tx) -> Schedule | None:
            if not await tx.execute(sql["pause"], name, int(paused), next_at, now):
                return None
            return _schedule((await tx.fetch(sql["select"], name))[0])

        return await self._write(op, mode="own")

    async def due_schedules(self, *, now: float, limit: int) -> list[Schedule]:
        return [_schedule(r) for r in await self._fetch(self._schedule_sql["due"], now, limit)]

    async def next_schedule_at(self) -> float | None:
        value: float | None = await self._first(self._schedule_sql["next"])
        return value

    async def fire_schedule(
        self, schedule: Schedule, *, slot: float | None, next_at: float | None, task: NewTask | None
    ) -> tuple[bool, TaskRecord | None]:
        """Move a due schedule on to ``next_at`` and create the task of ``slot``, in one
        transaction: ``(False, None)`` if another node moved it first (or it was paused,
        changed or deleted). The task is ``None`` when the slot is skipped; when a task of that
        id exists already, it is the existing one."""
        now = self.clock.now()
        sql = self._schedule_sql

        async def op(tx: Tx) -> tuple[bool, TaskRecord | None]:
            task_id = None if task is None else task.id
            moved = await tx.execute(
                sql["advance"],
                schedule.spec.name,
                next_at,
                slot,
                task_id,
                now,
                schedule.next_at,
                schedule.updated_at,
            )
            if not moved:
                return False, None
            if task is None:
                return True, None
            record = create(task, now=now)
            if await tx.insert(record):
                return True, record
            return True, await tx.load(task.id)

        return await self._write(op)
