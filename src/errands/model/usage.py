"""Usage: what each owner's tasks of each type, submitted on one day (UTC), came to. No I/O.

A day's figures are counted from the tasks themselves while they are stored; a purge that
deletes finished tasks adds what they were to the day's rollup in the same transaction, so a
day's figures do not change because its tasks were purged. A task counts on the day it was
submitted, under its status now (a retried task moves from ``failed`` back to ``pending``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from errands.model.task import Status

#: The statuses a day's counts are given for, in the order the store returns them.
STATUSES: tuple[Status, ...] = tuple(Status)
#: How a day is written (``YYYY-MM-DD``), in a query and in a cursor.
DAY_PATTERN = r"\d{4}-\d{2}-\d{2}"
#: The longest range one read may cover.
MAX_DAYS = 366

#: One rollup row: day, owner, type, status, tasks, credits (the sum of their costs).
RollupRow = tuple[str, str, str, str, int, int]


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One owner's tasks of one type submitted on one day: how many are in each status, the
    credits charged for those that completed and held by those not yet ended."""

    day: str
    owner: str
    type: str
    counts: tuple[int, ...]  # by STATUSES
    charged: int = 0
    reserved: int = 0

    @property
    def submitted(self) -> int:
        return sum(self.counts)

    def by_status(self) -> dict[str, int]:
        return {status.value: n for status, n in zip(STATUSES, self.counts, strict=True)}


def utc_day(at: float) -> str:
    """The day (``YYYY-MM-DD``, UTC) of a timestamp, as the stores' SQL computes it: of its whole
    second (a timestamp rounded up to the next day's midnight would fall outside its range)."""
    return dt.datetime.fromtimestamp(math.floor(at), dt.UTC).date().isoformat()


def day_range(first: dt.date, last: dt.date) -> tuple[float, float]:
    """The timestamps a range of days covers: from the first's midnight (UTC) to the midnight
    after the last (excluded)."""
    start = dt.datetime.combine(first, dt.time(), dt.UTC).timestamp()
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()
    return start, end


def rollup(purged: Iterable[tuple[str, str, float, str, int]]) -> list[RollupRow]:
    """What purged tasks (owner, type, created_at, status, cost) add to the daily rollups."""
    tasks: Counter[tuple[str, str, str, str]] = Counter()
    credits: Counter[tuple[str, str, str, str]] = Counter()
    for owner, type_, created_at, status, cost in purged:
        key = (utc_day(created_at), owner, type_, status)
        tasks[key] += 1
        credits[key] += cost
    return [(*key, n, credits[key]) for key, n in sorted(tasks.items())]
