"""The event log: a task's events, everything after a seq, an owner's, the purge horizon."""

from __future__ import annotations

from errands.model import Event
from errands.model.streams import StreamChoice
from errands.store.columns import to_event
from errands.store.records import LogRead
from errands.store.shared import Dialect


class LogOps(Dialect):
    async def events(
        self, task_id: str, *, after: int = 0, limit: int = 1000, streams: StreamChoice = "include"
    ) -> list[Event]:
        sql = {"include": self.sql.task_events, "none": self.sql.task_events_plain}.get(
            streams, self.sql.task_events_output
        )
        rows = await self._fetch(sql, task_id, after, limit)
        return [to_event(r, seq_in_snapshot=self.snapshots_have_seq) for r in rows]

    async def read_log(self, after: int, *, limit: int = 1000, snapshots: bool = True) -> LogRead:
        # Each row: an event's columns and whether events wait above what may be read yet; a
        # dialect that can say so without events answers one row of NULLs and the flag.
        rows = await self._fetch(
            self.sql.log_since if snapshots else self.sql.log_since_headers, after, limit
        )
        behind = bool(rows and rows[0][8])
        events = [to_event(r, seq_in_snapshot=self.snapshots_have_seq) for r in rows if r[0] is not None]
        return LogRead(events, behind)

    async def last_seq(self) -> int:
        return int(await self._first(self.sql.last_seq) or 0)

    async def owner_events(self, owner: str | None, *, after: int, until: int, limit: int) -> list[Event]:
        if owner is None:
            rows = await self._fetch(self.sql.all_events_between, after, until, limit)
        else:
            rows = await self._fetch(self.sql.owner_events_between, owner, after, until, limit)
        return [to_event(r, seq_in_snapshot=self.snapshots_have_seq) for r in rows]

    async def horizon(self) -> int:
        return int(await self._first(self.sql.horizon) or 0)
