"""Flow control: how many tasks of a pool may run at once, and how many may start per period.

A :class:`Limit` is declared on a task type (its *pool* is the type) or on a provider (every type
the provider performs shares one pool). It counts either the whole pool (``per="all"``), each
owner apart (``per="owner"``), or each *key* apart (``per="key"``: the ``key`` given at submit,
for example the customer whose API key the provider call spends, else the owner). The counters
of one pool and key make a *scope*.

``concurrency`` caps the tasks running at once in a scope (counted from the store's running
tasks). ``rate`` caps the starts: a generic cell rate algorithm whose only state per scope is
its *theoretical arrival time* (``tat``), kept by the store. In any interval of length ``t`` a
scope starts at most ``burst + rate·t`` tasks, and never more than ``burst`` at once; ``burst``
defaults to a tenth of a second's worth (at least 1), which keeps a claim of several tasks at a
time possible without letting the rate come in lumps.

:func:`choose_claims` picks, from the tasks a claim reads in queue order, those every limit
allows, and says which scopes held the others back and when a rate lets the next one start.
A scope another claim is counting at this moment (``None`` usage) holds its tasks back for this
claim: the other claim is about to start them, or will leave them to the next.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from errands.model.decisions import too_late_to_start
from errands.model.task import Status, TaskRecord

Per = Literal["all", "owner", "key"]
PER_VALUES: tuple[Per, ...] = ("all", "owner", "key")
#: What keeps a pending task waiting, as ``waiting_for`` names it.
Reason = Literal["schedule", "provider", "concurrency", "rate"]

#: Every unit a rate may be given in, spelled out (no guessing at what else might be meant:
#: "ms" is not minutes).
_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86_400.0),
}
_RATE = re.compile(r"\s*(\d{1,9})\s*/\s*(\d{1,6})?\s*([a-z]+)\s*", re.IGNORECASE)
#: How soon a claim looks again at a scope another claim was counting.
BUSY_RETRY_S = 0.005
_EPSILON = 1e-6  # epoch seconds near 2e9 hold steps of 2.4e-7 s


class BadLimit(ValueError):
    """A limit that cannot be enforced as declared."""


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` starts per ``period_s`` seconds."""

    count: int
    period_s: float

    @property
    def interval_s(self) -> float:
        """The time one start uses up (the algorithm's emission interval)."""
        return self.period_s / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g}s"


def parse_rate(text: str) -> Rate:
    """``"10/s"``, ``"600/min"``, ``"100/hour"``, ``"5/10s"`` (five per ten seconds), ``"1000/day"``."""
    match = _RATE.fullmatch(text)
    unit = _UNITS.get(match.group(3).lower()) if match else None
    if match is None or unit is None:
        raise BadLimit(f"{text!r} is not a rate (for example '10/s', '600/min', '5/10s', '1000/day')")
    count, times = int(match.group(1)), int(match.group(2) or 1)
    if count < 1 or times < 1:
        raise BadLimit(f"{text!r}: a rate needs at least one start in a period longer than nothing")
    return Rate(count, unit * times)


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``concurrency`` running at once and at most ``rate`` started per period, in the
    whole pool or ``per`` owner or key (see the module docstring). One of the two is needed."""

    concurrency: int | None = None
    rate: str | None = None
    per: Per = "all"
    burst: int | None = None
    parsed_rate: Rate | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            raise BadLimit("a limit needs a concurrency, a rate, or both")
        if self.concurrency is not None and not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise BadLimit("concurrency must be a whole number of at least 1")
        if self.per not in PER_VALUES:
            raise BadLimit(f"per must be one of {', '.join(PER_VALUES)}")
        if self.burst is not None and (
            self.rate is None or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise BadLimit("burst goes with a rate, and is a whole number of at least 1")
        if self.rate is not None:
            object.__setattr__(self, "parsed_rate", parse_rate(self.rate))

    @property
    def allowed_burst(self) -> int:
        """The starts a scope may make at once (see the module docstring)."""
        if self.burst is not None:
            return self.burst
        rate = self.parsed_rate
        return 1 if rate is None else max(1, math.floor(rate.count * 0.1 / rate.period_s))

    def describe(self) -> str:
        parts = [f"concurrency {self.concurrency}"] if self.concurrency is not None else []
        if self.parsed_rate is not None:
            parts.append(f"rate {self.rate} (burst {self.allowed_burst})")
        return " and ".join(parts) + ("" if self.per == "all" else f" per {self.per}")


@dataclass(frozen=True, slots=True)
class Bound:
    """A limit as it applies to a pool: ``types`` are the task types that share it."""

    pool: str  # "type:<name>" or "provider:<name>"
    types: tuple[str, ...]
    limit: Limit  # one per pool and ``per`` (two would count the same tasks twice)

    def scope(self, record: TaskRecord) -> str:
        """The counters ``record`` is counted in (no spaces in pools or ``per``)."""
        return f"{self.pool} {self.limit.per} {_scope_key(self.limit.per, record.owner, record.key)}"


def _scope_key(per: Per, owner: str, key: str | None) -> str:
    """A scope's part after its pool and ``per``. A key counts within its owner: a key that one
    owner gives never shares counters with another owner's tasks, nor with an owner's scope
    (owner and key are any text: JSON keeps them apart)."""
    if per == "all":
        return ""
    if per == "owner":
        return json.dumps([owner], ensure_ascii=False)
    return json.dumps([owner, key if key is not None else owner], ensure_ascii=False)  # no key: the owner


def split_scope(scope: str) -> tuple[str, Per, str | None, str | None]:
    """``(pool, per, owner, key)`` of a scope made by :meth:`Bound.scope` (``None`` where the
    scope does not count by it)."""
    pool, per, rest = scope.split(" ", 2)
    assert per in PER_VALUES
    if per == "all":
        return pool, per, None, None
    parts = json.loads(rest)
    return pool, per, parts[0], parts[1] if per == "key" else None


@dataclass(frozen=True, slots=True)
class Usage:
    """A scope as the store read it: tasks running now, and the rate's arrival time (if any)."""

    running: int = 0
    tat: float | None = None


@dataclass(slots=True)
class Choice:
    """What :func:`choose_claims` decided."""

    chosen: list[TaskRecord]
    #: The scopes whose rate state the claim moves, and to what.
    tats: dict[str, float] = field(default_factory=dict)
    #: Scopes that held a task back, and why (``"busy"``: another claim was counting them).
    blocked: dict[str, str] = field(default_factory=dict)
    #: When a task held back here may be allowed (the earliest), if any was held back.
    retry_at: float | None = None
    #: Every scope's usage after the chosen tasks started (for a next look in the same claim).
    usage: dict[str, Usage | None] = field(default_factory=dict)


def rate_allows(limit: Limit, tat: float | None, now: float) -> bool:
    """Whether a scope at ``tat`` may start one more task now."""
    rate = limit.parsed_rate
    if rate is None or tat is None:
        return True
    return max(tat, now) + rate.interval_s - now <= limit.allowed_burst * rate.interval_s + _EPSILON


def next_allowed(limit: Limit, tat: float) -> float:
    """The first time a scope at ``tat`` may start again."""
    rate = limit.parsed_rate
    assert rate is not None
    return tat - (limit.allowed_burst - 1) * rate.interval_s


def blocking(
    bounds: Sequence[Bound], record: TaskRecord, usage: Mapping[str, Usage | None], now: float
) -> tuple[str, str] | None:
    """The first scope (and why) that would not let ``record`` start now, if one would not."""
    for bound in bounds:
        scope = bound.scope(record)
        use = usage.get(scope, Usage())
        if use is None:
            return scope, "busy"
        limit = bound.limit
        if limit.concurrency is not None and use.running >= limit.concurrency:
            return scope, "concurrency"
        if not rate_allows(limit, use.tat, now):
            return scope, "rate"
    return None


def tally(
    scopes: Mapping[str, Bound],
    running: Iterable[tuple[str, str, str | None, int]],
    tats: Mapping[str, float],
) -> dict[str, Usage]:
    """Each scope's usage from the running tasks per ``(type, owner, key)`` and the stored
    rate states (a scope with none has never been held back)."""
    rows = list(running)
    usage = {}
    for scope, bound in scopes.items():
        _, per, scope_owner, scope_key = split_scope(scope)
        count = 0
        if bound.limit.concurrency is not None:
            for task_type, owner, task_key, n in rows:
                if task_type in bound.types and (
                    per == "all"
                    or (owner == scope_owner and (per == "owner" or (task_key or owner) == scope_key))
                ):
                    count += n
        usage[scope] = Usage(count, tats.get(scope))
    return usage


def exclusions(
    scopes: Iterable[str], bounds: Mapping[str, Bound]
) -> tuple[list[str], list[str], list[str | None], list[str | None]]:
    """The ``(types, pers, owners, keys)`` a claim's second look skips: the tasks of ``scopes``."""
    types: list[str] = []
    pers: list[str] = []
    owners: list[str | None] = []
    keys: list[str | None] = []
    for scope in scopes:
        _, per, owner, key = split_scope(scope)
        for task_type in bounds[scope].types:
            types.append(task_type)
            pers.append(per)
            owners.append(owner)
            keys.append(key)
    return types, pers, owners, keys


def claim_window(limit: int, *, limited: bool) -> int:
    """How many queued tasks a claim of ``limit`` reads: more than it takes when limits per
    owner or key may skip tasks at the head of the queue."""
    return limit * 4 + 32 if limited else limit


def choose_claims(
    candidates: Sequence[TaskRecord],
    *,
    bounds: Mapping[str, Sequence[Bound]],
    usage: Mapping[str, Usage | None],
    limit: int,
    now: float,
) -> Choice:
    """The tasks a claim starts, in queue order: at most ``limit``, each allowed by every bound
    of its type (``bounds[type]``) given the scopes' ``usage`` and the starts of this claim.
    A task past its ``start_by`` is not started (the sweeper ends it)."""
    current: dict[str, Usage | None] = dict(usage)
    choice = Choice([], usage=current)
    for record in candidates:
        if len(choice.chosen) >= limit:
            break
        if too_late_to_start(record, now):
            continue  # the sweeper ends it
        mine = bounds.get(record.type, ())
        held = blocking(mine, record, current, now) if mine else None
        if held is not None:
            scope, why = held
            choice.blocked.setdefault(scope, why)
            again = _retry_at(mine, record, scope, why, current, now)
            if again is not None and (choice.retry_at is None or again < choice.retry_at):
                choice.retry_at = again
            continue
        for bound in mine:
            scope = bound.scope(record)
            use = current.get(scope) or Usage()
            tat = use.tat
            rate = bound.limit.parsed_rate
            if rate is not None:
                tat = max(tat if tat is not None else now, now) + rate.interval_s
                choice.tats[scope] = tat
            current[scope] = Usage(use.running + 1, tat)
        choice.chosen.append(record)
    return choice


def _retry_at(
    bounds: Sequence[Bound],
    record: TaskRecord,
    scope: str,
    why: str,
    usage: Mapping[str, Usage | None],
    now: float,
) -> float | None:
    if why == "busy":
        return now + BUSY_RETRY_S
    use = usage.get(scope)
    if why != "rate" or use is None or use.tat is None:
        return None  # a running task's end announces the free slot
    for bound in bounds:
        if bound.limit.parsed_rate is not None and bound.scope(record) == scope:
            return next_allowed(bound.limit, use.tat)
    return None


def waiting_for(
    record: TaskRecord,
    *,
    bounds: Sequence[Bound],
    usage: Mapping[str, Usage | None],
    held_until: float | None,
    now: float,
) -> Reason | None:
    """Why a pending task does not run yet, as far as errands knows: its provider asked to wait
    (``held_until``, which also makes a task it gave back wait that long), it is not due, or a
    limit of its type holds it back; ``None`` when it waits for a worker (or is not pending)."""
    if record.status is not Status.PENDING:
        return None
    if held_until is not None and held_until > now and record.run_after <= held_until:
        return "provider"
    if record.run_after > now:
        return "schedule"
    found = blocking(bounds, record, usage, now)
    if found is None or found[1] == "busy":
        return None
    return "concurrency" if found[1] == "concurrency" else "rate"
