"""What an operator looks at, and does to many tasks at once (the console's API).

* **Counts** of the tasks a selection matches (a bulk action's confirmation says how many).
* **Bulk actions**: cancel or retry every task of a selection, one bounded page per call, so
  neither the service nor the page waits on 100,000 tasks at once. A call acts on up to
  ``limit`` of the tasks the action applies to (cancel: pending or running; retry: failed or
  timed out) and answers where to go on (``next_cursor``); a task that refuses (it changed
  meanwhile, or used up its manual retries) is counted as skipped and not met again.
* **Series**: tasks created, completed and failed per minute over the last hour (per quarter
  hour over the day), and queue wait and run time p50/p95 by type, from the task table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from errands import model
from errands.auth import WRITE, Principal
from errands.clock import Clock, iso
from errands.config import Settings
from errands.errors import Forbidden
from errands.intake import Intake
from errands.model import Status, TaskRecord
from errands.service import Selection, Service, decode_cursor, encode_cursor, percentile
from errands.store.base import Store

Action = Literal["cancel", "retry"]
Window = Literal["hour", "day"]
#: The statuses each action applies to.
APPLIES: dict[str, tuple[Status, ...]] = {
    "cancel": (Status.PENDING, Status.PROCESSING),
    "retry": (Status.FAILED, Status.TIMEOUT),
}
MAX_BULK = 500
#: The windows of the series: their length and step, in seconds.
WINDOWS = {"hour": (3600, 60), "day": (86_400, 900)}
SAMPLE = 20_000


@dataclass(frozen=True, slots=True)
class BulkResult:
    done: int
    skipped: int
    next_cursor: str | None

    def public(self) -> dict[str, Any]:
        return {"done": self.done, "skipped": self.skipped, "next_cursor": self.next_cursor}


class Overview:
    def __init__(
        self, store: Store, service: Service, intake: Intake, settings: Settings, clock: Clock
    ) -> None:
        self.store = store
        self.service = service
        self.intake = intake
        self.settings = settings
        self.clock = clock

    async def count(self, principal: Principal, selection: Selection) -> int:
        return await self.store.count_tasks(self.service.query(principal, selection))

    async def count_by_status(self, principal: Principal, selection: Selection) -> dict[str, int]:
        """Every status's count (0 where there is none), in one read."""
        counts = await self.store.count_by_status(self.service.query(principal, selection))
        return {status.value: counts.get(status, 0) for status in Status}

    async def bulk(
        self, principal: Principal, action: Action, selection: Selection, *, limit: int, cursor: str | None
    ) -> BulkResult:
        """Act on the next ``limit`` tasks of ``selection`` the action applies to, newest first."""
        principal.require(WRITE)
        statuses = APPLIES[action]
        if selection.status is not None and selection.status not in statuses:
            return BulkResult(0, 0, None)  # none of them can be acted on
        limit = max(1, min(limit, MAX_BULK))
        found: list[TaskRecord] = []
        before = decode_cursor(cursor) if cursor else None
        full = False  # a read gave as many as it asked for: more may follow
        # Each status in its own read (each has its index), merged newest first.
        for status in [selection.status] if selection.status is not None else statuses:
            query = self.service.query(principal, replace(selection, status=status))
            # The bulk page's own size (a list's page is capped lower), from the cursor on.
            rows = await self.store.list_tasks(replace(query, limit=limit, before=before))
            full = full or len(rows) >= limit
            found.extend(rows)
        found.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        page = found[:limit]
        now = self.clock.now()
        retries = self.settings.max_manual_retries

        def decide(record: TaskRecord) -> model.Change:
            if action == "cancel":
                return model.cancel(record, now=now)
            return model.manual_retry(record, now=now, max_manual_retries=retries)

        outcomes = await self.store.apply_many([(r.id, decide) for r in page])
        done = [o.record for o in outcomes if o.record is not None]
        if action == "cancel":
            for record in done:
                self.intake.cancel_at_provider(record)
        next_cursor = encode_cursor(page[-1]) if page and (full or len(found) > limit) else None
        return BulkResult(len(done), len(page) - len(done), next_cursor)

    async def series(self, principal: Principal, window: Window) -> dict[str, Any]:
        if not principal.admin:
            raise Forbidden("Only an admin may read the series.")
        window_s, step = WINDOWS[window]
        now = self.clock.now()
        first = int((now - window_s) // step) + 1
        rows = await self.store.series(since=first * step, step_s=step, sample=SAMPLE)
        buckets: dict[int, dict[str, int]] = {
            b: {"submitted": 0, "completed": 0, "failed": 0} for b in range(first, int(now // step) + 1)
        }
        for bucket, count in rows.created:
            if bucket in buckets:
                buckets[bucket]["submitted"] += count
        for bucket, status, count in rows.finished:
            # "failed": every end that is not a success or a cancel (failed, timeout).
            kind = {"completed": "completed", "failed": "failed", "timeout": "failed"}.get(status)
            if bucket in buckets and kind is not None:
                buckets[bucket][kind] += count
        return {
            "window_s": window_s,
            "step_s": step,
            "buckets": [{"at": iso(b * step), **counts} for b, counts in sorted(buckets.items())],
            "by_type": _by_type(rows.waits, rows.runs),
        }


def _by_type(waits: Sequence[tuple[str, float]], runs: Sequence[tuple[str, float]]) -> dict[str, Any]:
    grouped: dict[str, dict[str, list[float]]] = {}
    for key, pairs in (("queue_wait_s", waits), ("run_time_s", runs)):
        for task_type, seconds in pairs:
            grouped.setdefault(task_type, {"queue_wait_s": [], "run_time_s": []})[key].append(seconds)
    return {
        task_type: {
            key: {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}
            for key, values in timings.items()
        }
        for task_type, timings in sorted(grouped.items())
    }
