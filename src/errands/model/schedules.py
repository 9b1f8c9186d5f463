"""Schedules: rules that submit a task at the slots of a cron expression. No I/O.

A slot is a moment the expression names, in the schedule's time zone; the task it submits has an
id made of the schedule's name and the slot (:func:`slot_task_id`), so every node that fires the
same slot makes the same task, once. Which slots fire is decided here:

* the schedule stores ``next_at``, its next slot; a node that finds it due fires it and moves
  ``next_at`` past now in the same transaction, with a compare-and-set on the old value;
* slots missed while no node ran (or while errands was behind) follow the schedule's
  ``missed`` policy: ``"last"`` fires the most recent one (late) and skips the others;
  ``"skip"`` fires it only if it is at most ``grace_s`` late, and otherwise none;
* daylight-saving changes do what cronsim (and Debian's cron, which it follows) does: a job at a
  fixed time that falls in the skipped hour runs right after the jump; in the repeated hour it
  runs once; expressions of a finer granularity than an hour run by the wall clock.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

from errands.clock import iso
from errands.inputs import PRIORITY_MAX, PRIORITY_MIN, BadValue, check_json, check_owner

Missed = Literal["last", "skip"]

#: The longest name: its slot ids (name, ``-``, ``20261202T090000Z``) must stay task ids.
MAX_NAME = 40
#: How far ahead ``next_runs`` looks at most (a slot per second for a day).
MAX_NEXT_RUNS = 100


class BadSchedule(ValueError):
    """A cron expression or time zone errands cannot use (the message says which)."""


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What a schedule submits, and when: the part its declaration or ``POST`` gives."""

    name: str
    type: str
    cron: str
    tz: str = "UTC"
    input: Any = None
    owner: str | None = None
    priority: int = 0
    missed: Missed = "last"
    grace_s: float = 60.0

    def definition(self) -> dict[str, Any]:
        """The spec as stored and compared (all but the name)."""
        return {
            "type": self.type,
            "cron": self.cron,
            "tz": self.tz,
            "input": {} if self.input is None else self.input,
            "owner": self.owner,
            "priority": self.priority,
            "missed": self.missed,
            "grace_s": self.grace_s,
        }

    @staticmethod
    def of(name: str, definition: dict[str, Any]) -> ScheduleSpec:
        return ScheduleSpec(name=name, **definition)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule as stored. ``next_at`` is its next slot (epoch seconds), ``None`` when the
    expression names no more."""

    spec: ScheduleSpec
    #: Who made it: the app's declaration, the API, or an app declaration no longer declared
    #: (``undeclared``: paused by errands, resumed when the app declares it again).
    source: Literal["app", "api", "undeclared"]
    paused: bool
    next_at: float | None
    last_slot: float | None
    last_task_id: str | None
    created_at: float
    updated_at: float

    def public(self, *, next_runs: list[float] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.spec.name,
            **self.spec.definition(),
            "paused": self.paused,
            "source": self.source,
            "next_at": None if self.paused else iso(self.next_at),
            "last_slot": iso(self.last_slot),
            "last_task_id": self.last_task_id,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }
        if next_runs is not None:
            out["next_runs"] = [iso(t) for t in next_runs]
        return out


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``Asia/Shanghai``, ``UTC``); :class:`BadSchedule` otherwise."""
    try:
        return ZoneInfo(name)
    except (ValueError, OSError, KeyError):  # unknown names, paths, NUL
        raise BadSchedule(f"tz: {name!r} is not an IANA time zone.") from None


NAME_PATTERN = rf"^[A-Za-z0-9_-]{{1,{MAX_NAME}}}$"
_NAME = re.compile(NAME_PATTERN)


def check(spec: ScheduleSpec, *, now: float) -> None:
    """:class:`BadSchedule` unless the name, time zone, policy and expression are usable, the
    expression names a slot after ``now``, and the tasks it makes would be accepted (owner,
    priority, input), so that a declared schedule cannot fail at every slot."""
    if not _NAME.match(spec.name):
        raise BadSchedule(f"name: 1 to {MAX_NAME} letters, digits, '_' or '-'.")
    if not PRIORITY_MIN <= spec.priority <= PRIORITY_MAX:
        raise BadSchedule(f"priority: from {PRIORITY_MIN} to {PRIORITY_MAX}.")
    try:
        if spec.owner is not None:
            check_owner(spec.owner)
        check_json(spec.input, what="input")
    except BadValue as exc:
        raise BadSchedule(f"{exc}.") from None
    if spec.missed not in ("last", "skip"):
        raise BadSchedule("missed: 'last' or 'skip'.")
    if not 0 < spec.grace_s <= 86_400:
        raise BadSchedule("grace_s: more than 0, at most 86400.")
    if not next_slots(spec, after=now, n=1):
        raise BadSchedule("cron: the expression names no time from now on.")


def _cron(spec: ScheduleSpec, start: datetime, *, reverse: bool = False) -> CronSim:
    try:
        return CronSim(spec.cron, start, reverse=reverse)
    except (CronSimError, ValueError, IndexError) as exc:
        raise BadSchedule(f"cron: {exc or 'not a cron expression'}.") from None


def _slots(spec: ScheduleSpec, *, after: float) -> Iterator[float]:
    """Every slot strictly after ``after``, in order."""
    start = datetime.fromtimestamp(int(after), tz=UTC).astimezone(zone(spec.tz))
    for moment in _cron(spec, start):  # ends where the expression names no more
        slot = moment.timestamp()
        if slot > after:
            yield slot


def next_slots(spec: ScheduleSpec, *, after: float, n: int) -> list[float]:
    """The first ``n`` slots strictly after ``after``."""
    return list(itertools.islice(_slots(spec, after=after), n))


def _last_slot(spec: ScheduleSpec, *, at_or_before: float) -> float | None:
    """The latest slot at or before ``at_or_before``, found backwards."""
    start = datetime.fromtimestamp(int(at_or_before) + 1, tz=UTC).astimezone(zone(spec.tz))
    try:
        slot = next(_cron(spec, start, reverse=True)).timestamp()
    except StopIteration:
        return None
    return slot if slot <= at_or_before else None


@dataclass(frozen=True, slots=True)
class Firing:
    """What a due schedule does now: submit the task of ``slot`` (``None``: none), then wait
    for ``next_at``; ``skipped`` slots were missed and are not run."""

    slot: float | None
    next_at: float | None
    skipped: int


#: Missed slots counted one by one up to this many, then the latest is found backwards.
_COUNT_UP_TO = 10_000


def fire(schedule: Schedule, *, now: float) -> Firing:
    """The firing of a schedule whose ``next_at`` may have come (see the module docstring)."""
    spec = schedule.spec
    upcoming = next_slots(spec, after=now, n=1)
    next_at = upcoming[0] if upcoming else None
    if schedule.next_at is None or schedule.next_at > now:
        return Firing(None, schedule.next_at, 0)
    due = [schedule.next_at]
    for slot in _slots(spec, after=schedule.next_at):
        if slot > now or len(due) >= _COUNT_UP_TO:
            break
        due.append(slot)
    latest = due[-1]
    if len(due) >= _COUNT_UP_TO:
        latest = max(latest, _last_slot(spec, at_or_before=now) or latest)
    fired: float | None = latest
    if spec.missed == "skip" and now - latest > spec.grace_s:
        fired = None
    return Firing(fired, next_at, len(due) - (fired is not None))


def slot_task_id(name: str, slot: float) -> str:
    """The id of the task a slot submits: the same on every node."""
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(slot))}"
