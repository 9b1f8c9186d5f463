"""The store's interface: one small protocol per concern, each shaped by the code that uses it.

A store keeps the task table and the append-only event log and applies every change of a task
together with its event in one transaction. It never decides what a change is: callers pass a
decision from :mod:`errands.model` (``TaskRecord -> Change``) which the store runs on the row it
has just read under its write lock, so the decision and the write are one compare-and-set. The
same holds for the other decisions a write depends on (which report outcome, which messages are
next, an endpoint's health): they are functions the caller passes in, run on locked rows.

=============  ==========================================  =================================
protocol       what it keeps                               used by
=============  ==========================================  =================================
``Tasks``      tasks: create, read, change, claim, lease   service, worker, sweeper, intake
``Sweeping``   what is due, purging, statistics            sweeper, service
``EventLog``   the log: by task, after a seq, by owner     hub, watches, notifier
``Reports``    provider reports and their receipts         intake, admin API
``Outbox``     endpoints, messages, the delivery log       notifier, notification admin
``Schedules``  cron schedules and the firing of slots      scheduler, schedules API
``Meta``       the service's own small state               runtime (credentials)
``Lifecycle``  open, migrate, close, the one subscriber    runtime, hub
=============  ==========================================  =================================

Both implementations (SQLite, PostgreSQL) raise only :mod:`errands.errors` exceptions.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from errands.errors import ErrandsError
from errands.model import Bound, Change, Event, EventType, NewTask, Status, TaskRecord, Usage
from errands.model.credits import Balance, LedgerEntry
from errands.model.schedules import Schedule, ScheduleSpec
from errands.model.streams import StreamChoice
from errands.model.usage import DayUsage
from errands.store.records import (
    Attempt,
    AttemptResult,
    Claimed,
    ClaimSpec,
    DueTasks,
    Endpoint,
    LogRead,
    Message,
    MessageQuery,
    Outcome,
    Receipt,
    ReportOutcome,
    SeriesRows,
    StatsRows,
    TaskQuery,
    Tombstone,
)

#: What a decision asks for: nothing, a change, or changes to write in order (each made from the
#: record the one before it left), one event each.
Changes = Change | Sequence[Change] | None
Decision = Callable[[TaskRecord], Changes]
#: A provider report's decision, with the outcome it amounts to (see :mod:`errands.intake`).
Judge = Callable[[TaskRecord], tuple[ReportOutcome, Changes]]


class Hint(enum.Flag):
    """What a commit may mean to the workers of other processes (carried by its notification)."""

    NONE = 0
    #: A task became claimable (created, or sent back to the queue).
    WORK = enum.auto()
    #: A task ended or left its worker (a slot of its limits came free for the next).
    ENDED = enum.auto()
    #: A running task may have been taken from its worker (cancelled, requeued, timed out, failed).
    STOPPED = enum.auto()
    #: A task will become claimable later (delayed, or retried after a backoff): workers read
    #: when the next one is due again.
    LATER = enum.auto()
    ALL = WORK | ENDED | STOPPED | LATER


_HINTS = {
    EventType.CREATED: Hint.WORK,
    EventType.RETRYING: Hint.WORK | Hint.STOPPED | Hint.ENDED,
    EventType.COMPLETED: Hint.ENDED,
    EventType.FAILED: Hint.ENDED | Hint.STOPPED,
    EventType.TIMEOUT: Hint.ENDED | Hint.STOPPED,
    EventType.CANCELLED: Hint.ENDED | Hint.STOPPED,
}


# The same as plain numbers (flag arithmetic builds enum members, and this runs per event).
_NOW = {kind: hint.value for kind, hint in _HINTS.items()}
_LATER = {kind: (hint & ~Hint.WORK | Hint.LATER).value for kind, hint in _HINTS.items()}
_WORK = frozenset(kind for kind, hint in _HINTS.items() if hint & Hint.WORK)
_LATER_ONLY = Hint.LATER.value


def hints(events: Iterable[tuple[EventType, bool]]) -> Hint:
    """The hints of a commit that wrote events of these types, each with whether it left its
    task waiting to be due (:attr:`errands.model.TaskRecord.waits`)."""
    found = 0
    for kind, waits in events:
        found |= _LATER.get(kind, _LATER_ONLY) if waits else _NOW.get(kind, 0)
    return Hint(found)


#: How many tasks a commit made claimable, by task type: what its ``WORK`` hint stands for. The
#: type ``""`` counts tasks of types not told (a node of an earlier version, or a commit of too
#: many types for its notification).
Work = Mapping[str, int]


def claimable(events: Iterable[tuple[EventType, bool, str]]) -> dict[str, int]:
    """How many tasks, by type, a commit made claimable now, from its events: each event's
    type, whether it left its task waiting, and its task's type."""
    work: dict[str, int] = {}
    for kind, waits, task_type in events:
        if not waits and kind in _WORK:
            work[task_type] = work.get(task_type, 0) + 1
    return work


class CommitSubscriber(Protocol):
    """The one listener of a store's commits (the hub, which tells everyone else)."""

    def committed(self, events: Sequence[Event], after: int | None) -> None:
        """This process committed ``events`` (in seq order), on the event loop, right after.
        ``after``, when not ``None``: every event with a seq at or below it has committed, and
        none but ``events`` can still commit between it and them (one that has read the log up
        to ``after`` may take them at once); ``None`` when the store cannot tell."""

    @property
    def wanted(self) -> Hint | None:
        """Which remote commits matter here: those with one of these hints, or every one
        (``None``: the whole log is followed). A store may tell only those."""

    def remote_commit(
        self, hint: Hint, seq: int | None, work: Work, events: Sequence[Event] = (), after: int | None = None
    ) -> None:
        """Another process may have committed events, which may mean ``hint`` (all of it after
        a reconnect); ``seq`` is the commit's last, when known, and ``work`` how many tasks of
        each type it made claimable. ``events``, when the store could tell them: the commit's
        events, and ``after`` what precedes them (as for :meth:`committed`). Stores that cannot
        tell (SQLite) never call it: readers poll their log."""


class Lifecycle(Protocol):
    dialect: str
    #: How often a hub reads the log for other processes' events when nothing woke it.
    log_poll_s: float
    #: The shortest time between two reads of the log by a hub that serves watches.
    log_read_gap_s: float

    async def open(self, *, migrate: bool = True) -> None: ...

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; return the versions applied."""

    async def ping(self) -> None:
        """Raise :class:`errands.errors.StoreError` if the database cannot be reached."""

    def subscribe(self, subscriber: CommitSubscriber) -> None:
        """Set the one subscriber of commits (it catches up from the log when it starts, so
        what committed before it subscribed is not lost); again when what it wants changed."""

    async def hold_sweeper_lock(self) -> bool:
        """Whether this process should sweep now: one process at a time sweeps a database (a
        lock the database server or the system releases when its holder's process ends)."""


class Tasks(Protocol):
    async def create(
        self, new: NewTask, *, max_pending_per_owner: int | None = None
    ) -> tuple[TaskRecord, bool]:
        """Insert a task and its ``task.created`` event; ``(task, False)`` if the id exists.

        Raises :class:`IdConflict` when the existing task was created by a different request,
        and :class:`TooManyRequests` when the owner already has ``max_pending_per_owner``
        pending tasks.
        """

    async def create_many(
        self, news: Sequence[NewTask], *, max_pending_per_owner: int | None = None
    ) -> list[tuple[TaskRecord, bool] | ErrandsError]:
        """Several creates in one transaction, each answered as :meth:`create` would (its task
        and whether it was created, or the error that refused it), in order."""

    async def get(self, task_id: str) -> TaskRecord | Tombstone | None: ...

    async def list_tasks(self, query: TaskQuery) -> list[TaskRecord]: ...

    async def apply(self, task_id: str, decide: Decision, *, seen: TaskRecord | None = None) -> TaskRecord:
        """Run ``decide`` on the current row and write its change and event atomically.

        Returns the task after the change (unchanged if ``decide`` returned ``None``). Raises
        :class:`NotFound`, or whatever ``decide`` raised, in which case nothing was written.
        ``seen``: the row as the caller last saw it (or wrote it); a store may decide on it
        without reading the row, and then writes the change only if the row is still as seen
        (otherwise it decides again, on the row as it is): the result is the same.
        """

    async def apply_many(self, decisions: Sequence[tuple[str, Decision]]) -> list[Outcome]:
        """Like :meth:`apply` for several tasks in one transaction; one outcome per decision."""

    async def claim(
        self, *, worker_id: str, specs: Sequence[ClaimSpec], limit: int, lease_s: float, alone: bool = False
    ) -> Claimed:
        """Start up to ``limit`` ready tasks of the given types, by priority then age, as
        :func:`errands.model.choose_claims` chooses them within the types' limits; every started
        task gets a new lease. ``alone``: the caller takes its tasks one at a time and nobody
        else claims them (see :mod:`errands.worker.pace`); a store may then claim more cheaply
        (and more dearly where others claim the same tasks after all)."""

    async def flow_usage(self, scopes: Mapping[str, Bound]) -> dict[str, Usage]:
        """How many tasks run now in each flow-control scope, and its rate state (no locks)."""

    async def renew(self, leases: Mapping[str, str], lease_s: float) -> set[str]:
        """Extend the leases ``{task_id: lease_token}``; return the ids whose lease was lost."""

    async def next_ready_at(self, types: Sequence[str], *, after: float) -> float | None:
        """When the next pending task of these types waiting out a backoff becomes claimable,
        if one becomes claimable later than ``after``."""

    async def set_poll_at(self, task_id: str, when: float) -> None:
        """When to poll a handed-off task next (bookkeeping, like a lease: no event)."""


class Sweeping(Protocol):
    async def due(self, *, now: float, limit: int) -> DueTasks: ...

    async def due_polls(self, *, now: float, limit: int) -> list[str]:
        """Running tasks whose provider is to be polled by ``now``."""

    async def next_poll_at(self) -> float | None:
        """When the next poll of a running task falls due (``None``: none is to be polled)."""

    async def purge(self, *, finished_before: float, tombstones_before: float, limit: int) -> int:
        """Delete finished tasks and their events, leaving tombstones; drop old tombstones."""

    async def stats(self, *, since: float, sample: int) -> StatsRows: ...

    async def count_tasks(self, query: TaskQuery) -> int:
        """How many tasks match ``query`` (its ``limit`` aside)."""

    async def count_by_status(self, query: TaskQuery) -> dict[Status, int]:
        """How many tasks match ``query`` in each status (one scan: statuses without any are left out)."""

    async def series(self, *, since: float, step_s: float, sample: int) -> SeriesRows:
        """Tasks created and ended per ``step_s`` since ``since``, and the latest ``sample``
        queue waits and run times with their types."""

    async def pending_counts(self) -> dict[str, int]:
        """Pending tasks by type (read from the pending tasks only: cheap enough to scrape)."""


class EventLog(Protocol):
    async def events(
        self, task_id: str, *, after: int = 0, limit: int = 1000, streams: StreamChoice = "include"
    ) -> list[Event]:
        """A task's events after ``after``, in order; ``streams``: with its ``task.stream``
        events (``include``), without (``none``), or only them and those that end it (``only``)."""

    async def read_log(self, after: int, *, limit: int = 1000, snapshots: bool = True) -> LogRead:
        """Committed events with ``seq > after``, in order, never skipping one that commits later.

        With ``snapshots=False`` the events carry no task snapshot (``task_json`` is empty): all
        a worker process needs to route them, for a fraction of the reading.
        """

    async def last_seq(self) -> int:
        """A seq up to which every committed event can be read (nothing appears below it later)."""

    async def owner_events(self, owner: str | None, *, after: int, until: int, limit: int) -> list[Event]:
        """An owner's events (everyone's for ``None``) with ``after < seq <= until``, in order."""

    async def horizon(self) -> int:
        """The highest seq whose event was purged; the log is complete only after it."""


@runtime_checkable
class TaskLog(Protocol):
    """A store that tells every remote commit with its :class:`Hint` can also read the log of a
    few tasks alone: what a worker process follows instead of the whole log."""

    async def read_tasks_log(self, tasks: Mapping[str, int], *, limit: int = 1000) -> LogRead:
        """The committed events of ``tasks`` (id → after this seq), in order, without snapshots;
        ``behind`` when some of theirs wait for an older transaction."""


class Reports(Protocol):
    async def apply_report(
        self, receipt: Receipt, judge: Judge, *, job: tuple[Sequence[str], str] | None = None
    ) -> tuple[ReportOutcome, TaskRecord | None]:
        """In one transaction: refuse a delivery id seen before (``duplicate``), else remember it
        and apply ``judge`` to the task; record the receipt with the outcome.

        The task is ``receipt.task_id``, or with ``job=(types, external_id)`` the task of one of
        these types whose provider job that is (``unknown_task`` when there is none)."""

    async def record_receipt(self, receipt: Receipt) -> None:
        """Record a report that was refused before reaching a task."""

    async def receipts(self, *, task_id: str | None, limit: int) -> list[Receipt]:
        """Recorded reports, newest first (one task's, or all)."""


class Outbox(Protocol):
    async def create_endpoint(self, endpoint: Endpoint) -> None: ...

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None: ...

    async def list_endpoints(self) -> list[Endpoint]: ...

    async def update_endpoint(self, endpoint_id: str, change: Callable[[Endpoint], Endpoint]) -> Endpoint:
        """Apply ``change`` to the endpoint under its lock (:class:`NotFound` if it is gone).
        Disabling it fails its pending messages (``recover`` sends them again later)."""

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete the endpoint and fail its pending messages; ``False`` if there was none."""

    async def notify_cursor(self) -> int:
        """The seq up to which events were turned into messages."""

    async def notify_urls_after(self, seq: int) -> bool:
        """Whether a task with a ``notify_url`` may have ended after ``seq`` (so the fan-out can
        skip reading the log when nothing else wants events): ``True`` for every such end event
        after it, and perhaps for other changes of such tasks too (the log then tells)."""

    async def add_messages(self, after: int, upto: int, messages: Sequence[Message]) -> bool:
        """Move the cursor from ``after`` to ``upto`` and store ``messages``, in one transaction;
        ``False`` (nothing stored) if another process moved the cursor first. A message for an
        event and destination that already has one is skipped."""

    async def claim_messages(
        self,
        *,
        now: float,
        limit: int,
        lease_s: float,
        channels: Sequence[str],
        hooks: Sequence[str],
    ) -> list[tuple[Message, Endpoint | None]]:
        """Take up to ``limit`` due messages of these channels (hook messages only of these
        hooks) whose endpoint is enabled and not throttled, each first in line for its
        destination (:data:`errands.store.statements.FIRST_IN_LINE`): each gets a new lease
        token, one more attempt and ``next_at = now + lease_s``."""

    async def finish_message(self, result: AttemptResult) -> None:
        """Log the attempt and, if the lease still holds, apply its result to the message and its
        endpoint (``result.health`` on the endpoint's locked row); when the last message that
        counts for a task's end is delivered, mark the task (``notification_sent``, event
        ``task.notified``), all in one transaction."""

    async def next_message_at(self, *, channels: Sequence[str], hooks: Sequence[str]) -> float | None:
        """When the earliest pending message of these channels is due."""

    async def get_message(self, message_id: str) -> Message | None: ...

    async def list_messages(self, query: MessageQuery) -> list[Message]:
        """Messages, newest first."""

    async def attempts(
        self,
        *,
        target: str | None = None,
        message_id: str | None = None,
        succeeded: bool | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Attempt]:
        """Logged attempts, newest first (``before``: only older than that attempt id)."""

    async def resend_message(self, message_id: str, *, now: float) -> Message:
        """Send a message again now, with a fresh retry schedule (:class:`NotFound` if unknown)."""

    async def recover_endpoint(self, endpoint_id: str, *, since: float, now: float) -> int:
        """Send again every failed message of the endpoint created since ``since``; the count."""


class Schedules(Protocol):
    async def put_schedule(
        self, spec: ScheduleSpec, *, source: str, next_at: float | None, replace: bool
    ) -> tuple[Schedule, bool]:
        """Store a schedule; ``(it, True)`` when new. An existing one stays as it is unless
        ``replace`` (its definition and next slot change; a paused one stays paused)."""

    async def get_schedule(self, name: str) -> Schedule | None: ...

    async def list_schedules(self) -> list[Schedule]:
        """Every schedule, by name."""

    async def delete_schedule(self, name: str) -> bool: ...

    async def pause_schedule(self, name: str, *, paused: bool, next_at: float | None) -> Schedule | None:
        """Pause a schedule, or resume it from ``next_at``; ``None`` if there is none."""

    async def due_schedules(self, *, now: float, limit: int) -> list[Schedule]:
        """Unpaused schedules whose next slot has come, the earliest first."""

    async def next_schedule_at(self) -> float | None:
        """The earliest next slot of an unpaused schedule."""

    async def fire_schedule(
        self, schedule: Schedule, *, slot: float | None, next_at: float | None, task: NewTask | None
    ) -> tuple[bool, TaskRecord | None]:
        """Move a due schedule on (a compare-and-set on its ``next_at``) and create the slot's
        task in the same transaction; ``(False, None)`` when another node moved it first."""


class Meta(Protocol):
    async def meta_setdefault(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless one is there; return the stored value."""

    async def hold(self, name: str, until: float) -> float:
        """Hold ``name`` (a provider) until ``until``, or later if it is held longer already;
        when it is held until now."""

    async def holds(self) -> dict[str, float]:
        """Every hold, name → until (those that have passed too)."""

    async def add_admin_key(self, key_hash: str) -> None: ...

    async def admin_key_hashes(self) -> set[str]: ...


class Credits(Protocol):
    """Owners' credits (:mod:`errands.model.credits`): a task's own moves are made with its
    changes; these are the grants and the reads."""

    async def grant(self, owner: str, amount: int, *, note: str | None = None) -> Balance:
        """Add ``amount`` (taken back when negative) to the owner's balance, with a ledger
        entry; :class:`errands.errors.InsufficientCredits` when the balance cannot go so low."""

    async def balance(self, owner: str) -> Balance:
        """The owner's credits (``0``/``0`` when it never had any)."""

    async def balances(self, *, after: str, limit: int) -> list[Balance]:
        """Owners with credits, by owner, after ``after``."""

    async def ledger(self, owner: str | None, *, after: int, limit: int) -> list[LedgerEntry]:
        """The owner's ledger entries (every owner's with ``None``) after id ``after``, oldest
        first."""

    async def usage(
        self,
        *,
        first: dt.date,
        last: dt.date,
        owner: str | None = None,
        type: str | None = None,
        after: tuple[str, str, str] = ("", "", ""),
        limit: int = 1000,
    ) -> list[DayUsage]:
        """What tasks submitted from day ``first`` to ``last`` (UTC, both included) came to, per
        (day, owner, type) in that order, after ``after``; of one owner or type if named."""


class Store(Lifecycle, Tasks, Sweeping, EventLog, Reports, Outbox, Schedules, Meta, Credits, Protocol):
    """Everything a store does (what the runtime opens and hands out, by concern)."""
