"""The one interface to persistence.

A store keeps the task table and the append-only event log and applies every change of a task
together with its event in one transaction. It never decides what a change is: callers pass a
decision from :mod:`errands.model` (``TaskRecord -> Change``) which the store runs on the row it
has just read under its write lock, so the decision and the write are one compare-and-set.

Both implementations (SQLite, PostgreSQL) raise only :mod:`errands.errors` exceptions.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from errands.clock import Clock
from errands.model import Change, Event, Status, TaskRecord

log = logging.getLogger("errands.store")

Decision = Callable[[TaskRecord], Change | None]
CommitListener = Callable[[Sequence[Event]], None]


@dataclass(frozen=True, slots=True)
class NewTask:
    """A validated submission. ``fingerprint`` identifies the request for idempotent re-submits."""

    id: str
    type: str
    owner: str
    input: Any
    priority: int
    max_attempts: int
    timeout_s: float
    expires_in_s: float
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What remains of a purged task: enough to answer ``410 Gone`` to its owner."""

    id: str
    owner: str
    purged_at: float


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """A page of tasks, newest first. ``owner=None`` means every owner (admins only)."""

    owner: str | None
    status: Status | None = None
    type: str | None = None
    task_id: str | None = None
    limit: int = 50
    before: tuple[float, str] | None = None


@dataclass(frozen=True, slots=True)
class ClaimSpec:
    """A task type a worker runs and the fair-share limit that applies to it."""

    type: str
    concurrency_per_owner: int | None = None


@dataclass(frozen=True, slots=True)
class DueTasks:
    """Ids the sweeper must look at (each is re-checked when its change is applied)."""

    lease_expired: Sequence[str]
    past_deadline: Sequence[str]
    expired: Sequence[str]
    to_poll: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Delivery:
    """One inbound webhook and what became of it (``outcome``)."""

    provider: str
    delivery_id: str | None
    task_id: str | None
    outcome: str  # applied, unchanged, duplicate, late, unauthorized, unknown_task, malformed
    status_code: int
    received_at: float
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one decision applied in a batch: the record, or the error that refused it."""

    record: TaskRecord | None
    error: Exception | None


@dataclass(frozen=True, slots=True)
class StatsRows:
    counts: Sequence[tuple[str, str, int]]  # (status, type, count)
    waits_s: Sequence[float]
    runs_s: Sequence[float]


class Store(abc.ABC):
    """Persistence for tasks, events and the service's own small state."""

    #: How often the hub reads the log for other processes' events when nothing woke it.
    log_poll_s: float = 1.0
    #: Set by :meth:`events_since` when committed events exist that it could not hand out yet
    #: (they wait for an older transaction to finish): the hub then reads again soon.
    behind: bool = False

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._listeners: list[CommitListener] = []
        self._remote: list[Callable[[], None]] = []

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Called on the event loop with the events of each local commit, in ``seq`` order.

        Other processes' commits are not reported here; readers of the log find them with
        :meth:`events_since`.
        """
        self._listeners.append(listener)

    def add_remote_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs when another process may have committed events. Stores that
        cannot tell (SQLite) never call it; the hub reads their log every ``log_poll_s``."""
        self._remote.append(callback)

    def _remote_commit(self) -> None:
        for callback in self._remote:
            try:
                callback()
            except Exception:
                log.exception("a remote commit listener failed")

    async def hold_sweeper_lock(self) -> bool:
        """Whether this process should sweep now: one sweeper at a time where that can be
        arranged (PostgreSQL); every process where sweeps are cheap and serialised (SQLite)."""
        return True

    def _committed(self, events: Sequence[Event]) -> None:
        for listener in self._listeners:
            listener(events)

    # -- life cycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self, *, migrate: bool = True) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; return the versions applied."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`errands.errors.StoreError` if the database cannot be reached."""

    # -- tasks --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create(
        self, new: NewTask, *, max_pending_per_owner: int | None = None
    ) -> tuple[TaskRecord, bool]:
        """Insert a task and its ``task.created`` event; ``(task, False)`` if the id exists.

        Raises :class:`IdConflict` when the existing task was created by a different request,
        and :class:`TooManyRequests` when the owner already has ``max_pending_per_owner``
        pending tasks.
        """

    @abc.abstractmethod
    async def get(self, task_id: str) -> TaskRecord | Tombstone | None: ...

    @abc.abstractmethod
    async def list_tasks(self, query: TaskQuery) -> list[TaskRecord]: ...

    @abc.abstractmethod
    async def apply(self, task_id: str, decide: Decision) -> TaskRecord:
        """Run ``decide`` on the current row and write its change and event atomically.

        Returns the task after the change (unchanged if ``decide`` returned ``None``). Raises
        :class:`NotFound`, or whatever ``decide`` raised, in which case nothing was written.
        """

    @abc.abstractmethod
    async def apply_many(self, decisions: Sequence[tuple[str, Decision]]) -> list[Outcome]:
        """Like :meth:`apply` for several tasks in one transaction; one outcome per decision."""

    @abc.abstractmethod
    async def claim(
        self, *, worker_id: str, specs: Sequence[ClaimSpec], limit: int, lease_s: float
    ) -> list[TaskRecord]:
        """Start up to ``limit`` ready tasks of the given types, by priority then age.

        Respects each spec's ``concurrency_per_owner``; every started task gets a new lease.
        """

    @abc.abstractmethod
    async def renew(self, leases: Mapping[str, str], lease_s: float) -> set[str]:
        """Extend the leases ``{task_id: lease_token}``; return the ids whose lease was lost."""

    @abc.abstractmethod
    async def next_ready_at(self, types: Sequence[str]) -> float | None:
        """When the earliest pending task of these types becomes claimable, if there is one."""

    # -- external providers -------------------------------------------------------------------

    @abc.abstractmethod
    async def find_external(self, types: Sequence[str], external_id: str) -> TaskRecord | None:
        """The task of one of these types whose provider job is ``external_id``."""

    @abc.abstractmethod
    async def set_poll_at(self, task_id: str, when: float) -> None:
        """When to poll a handed-off task next (bookkeeping, like a lease: no event)."""

    @abc.abstractmethod
    async def apply_webhook(
        self, delivery: Delivery, decide: Decision, *, job: tuple[Sequence[str], str] | None = None
    ) -> tuple[str, TaskRecord | None]:
        """In one transaction: refuse a delivery id seen before (``duplicate``), else remember it
        and apply ``decide`` to the task (``applied``, ``unchanged``, ``late`` when the state
        machine refuses it, ``unknown_task``); record the delivery with that outcome.

        The task is ``delivery.task_id``, or with ``job=(types, external_id)`` the task of one of
        these types whose provider job that is (``delivery.task_id`` is then filled in)."""

    @abc.abstractmethod
    async def record_delivery(self, delivery: Delivery) -> None:
        """Record a delivery that was refused before reaching a task."""

    @abc.abstractmethod
    async def deliveries(self, *, task_id: str | None, limit: int) -> list[Delivery]:
        """Recorded deliveries, newest first (one task's, or all)."""

    # -- the event log ------------------------------------------------------------------------

    @abc.abstractmethod
    async def events(self, task_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]: ...

    @abc.abstractmethod
    async def events_since(self, after: int, *, limit: int = 1000, snapshots: bool = True) -> list[Event]:
        """Committed events with ``seq > after``, in order, never skipping one that commits later.

        With ``snapshots=False`` the events carry no task snapshot (``task_json`` is empty): all
        a worker process needs to route them, for a fraction of the reading.
        """

    @abc.abstractmethod
    async def last_seq(self) -> int: ...

    @abc.abstractmethod
    async def owner_events(self, owner: str | None, *, after: int, until: int, limit: int) -> list[Event]:
        """An owner's events (everyone's for ``None``) with ``after < seq <= until``, in order."""

    @abc.abstractmethod
    async def horizon(self) -> int:
        """The highest seq whose event was purged; the log is complete only after it."""

    # -- sweeping -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def due(self, *, now: float, limit: int) -> DueTasks: ...

    @abc.abstractmethod
    async def purge(self, *, finished_before: float, tombstones_before: float, limit: int) -> int:
        """Delete finished tasks and their events, leaving tombstones; drop old tombstones."""

    @abc.abstractmethod
    async def stats(self, *, since: float, sample: int) -> StatsRows: ...

    # -- service state ------------------------------------------------------------------------

    @abc.abstractmethod
    async def meta_setdefault(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless one is there; return the stored value."""

    @abc.abstractmethod
    async def add_admin_key(self, key_hash: str) -> None: ...

    @abc.abstractmethod
    async def admin_key_hashes(self) -> set[str]: ...
