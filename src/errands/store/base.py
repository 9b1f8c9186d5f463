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
from errands.model import Change, Event, EventType, Status, TaskRecord

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
    notify_url: str | None = None


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
class Endpoint:
    """Where an admin asked task events to be sent (outbound webhooks)."""

    id: str
    url: str
    description: str | None
    events: tuple[str, ...]  # event types, or patterns: ``task.*``
    types: tuple[str, ...] | None  # only tasks of these types (None: every type)
    owners: tuple[str, ...] | None  # only tasks of these owners (None: every owner)
    secret: str
    previous_secret: str | None  # still signed with, until ``previous_secret_until``
    previous_secret_until: float | None
    enabled: bool
    disabled_reason: str | None
    failing_since: float | None  # the first failure since the last success
    throttled_until: float | None  # the receiver asked to be left alone until then
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Message:
    """One notification of one event to one destination, delivered at least once.

    ``channel`` says how (``endpoint``, ``url``: a task's own ``notify_url``, ``hook``: app code,
    ``wechat``) and ``target`` to whom (the endpoint id, the URL, the hook's or template's name).
    ``id`` is the ``webhook-id``: the same on every attempt. ``state`` is ``pending`` (waiting for
    ``next_at``, or being sent under ``lease_token`` until then), ``delivered`` or ``failed``.
    """

    id: str
    seq: int
    event_type: str
    task_id: str
    owner: str
    task_type: str
    channel: str
    target: str
    payload: bytes
    final: bool  # about the task's end: counts for ``notification_sent``
    state: str
    attempts: int
    next_at: float
    created_at: float
    updated_at: float
    last_status: int | None = None
    last_error: str | None = None
    lease_token: str | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at delivering a message, as the delivery log keeps it."""

    message_id: str
    channel: str
    target: str
    task_id: str
    event_type: str
    attempted_at: float
    succeeded: bool
    status_code: int | None
    latency_ms: float
    response: str | None = None  # the start of the receiver's answer
    error: str | None = None  # why it failed, when not an HTTP status
    id: int = 0


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What an attempt leads to, decided by :mod:`errands.notify.policy`, written at once.

    ``lease_token`` fences the write: a sender that lost its claim only adds to the log.
    ``endpoint_*`` apply to the message's endpoint, if it has one.
    """

    attempt: Attempt
    lease_token: str
    state: str  # pending (retry at next_at), delivered, failed
    next_at: float
    endpoint_ok: bool | None = None  # True: it answered 2xx, False: it failed
    throttled_until: float | None = None
    disable_reason: str | None = None


@dataclass(frozen=True, slots=True)
class MessageQuery:
    task_id: str | None = None
    endpoint_id: str | None = None
    state: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class StatsRows:
    counts: Sequence[tuple[str, str, int]]  # (status, type, count)
    waits_s: Sequence[float]
    runs_s: Sequence[float]


#: Events that make a task claimable.
WORK_EVENTS = frozenset({EventType.CREATED, EventType.RETRYING})


class Store(abc.ABC):
    """Persistence for tasks, events and the service's own small state."""

    #: How often the hub reads the log for other processes' events when nothing woke it.
    log_poll_s: float = 1.0
    #: The shortest time between two reads of the log by a hub that serves watches (see
    #: :class:`~errands.hub.Hub`).
    log_read_gap_s: float = 0.0
    #: Set by :meth:`events_since` when committed events exist that it could not hand out yet
    #: (they wait for an older transaction to finish): the hub then reads again soon.
    behind: bool = False

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._listeners: list[CommitListener] = []
        self._remote: list[Callable[[], None]] = []
        self._work: list[Callable[[], None]] = []

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

    def add_work_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs when a commit may have made a task claimable (a task created or
        sent back to the queue), here or, where the store can tell, in another process: a
        worker tries to claim at once instead of waiting for the hub's next read of the log."""
        self._work.append(callback)

    def _remote_commit(self, *, work: bool = True) -> None:
        for callback in [*self._remote, *(self._work if work else ())]:
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
        if self._work and any(e.type in WORK_EVENTS for e in events):
            for callback in self._work:
                callback()

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
    async def next_ready_at(self, types: Sequence[str], *, after: float) -> float | None:
        """When the next pending task of these types waiting out a backoff becomes claimable,
        if one becomes claimable later than ``after``."""

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

    # -- notifications ------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_endpoint(self, endpoint: Endpoint) -> None: ...

    @abc.abstractmethod
    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None: ...

    @abc.abstractmethod
    async def list_endpoints(self) -> list[Endpoint]: ...

    @abc.abstractmethod
    async def update_endpoint(self, endpoint_id: str, change: Callable[[Endpoint], Endpoint]) -> Endpoint:
        """Apply ``change`` to the endpoint under the write lock (:class:`NotFound` if it is gone).

        Disabling it fails its pending messages (``recover`` sends them again later)."""

    @abc.abstractmethod
    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete the endpoint and fail its pending messages; ``False`` if there was none."""

    @abc.abstractmethod
    async def notify_cursor(self) -> int:
        """The seq up to which events were turned into messages."""

    @abc.abstractmethod
    async def notify_urls_after(self, seq: int) -> bool:
        """Whether a task with a ``notify_url`` has an event after ``seq`` (so the fan-out can
        skip reading the log when nothing else wants events)."""

    @abc.abstractmethod
    async def add_messages(self, after: int, upto: int, messages: Sequence[Message]) -> bool:
        """Move the cursor from ``after`` to ``upto`` and store ``messages``, in one transaction;
        ``False`` (nothing stored) if another process moved the cursor first. A message for an
        event and destination that already has one is skipped."""

    @abc.abstractmethod
    async def claim_messages(
        self, *, now: float, limit: int, lease_s: float, channels: Sequence[str], hooks: Sequence[str]
    ) -> list[tuple[Message, Endpoint | None]]:
        """Take up to ``limit`` due messages of these channels (hook messages only of these
        hooks): each gets a new lease token, one more attempt and ``next_at = now + lease_s``.

        A message waits while an earlier message of the same task to the same destination is
        pending (order per task), and while its endpoint is disabled or throttled."""

    @abc.abstractmethod
    async def finish_message(self, result: AttemptResult) -> None:
        """Log the attempt and, if the lease still holds, apply its result to the message and its
        endpoint; when the last notification of a task's end is delivered, mark the task
        (``notification_sent``, event ``task.notified``), all in one transaction."""

    @abc.abstractmethod
    async def next_message_at(self, *, channels: Sequence[str], hooks: Sequence[str]) -> float | None:
        """When the earliest pending message of these channels is due."""

    @abc.abstractmethod
    async def get_message(self, message_id: str) -> Message | None: ...

    @abc.abstractmethod
    async def list_messages(self, query: MessageQuery) -> list[Message]:
        """Messages, newest first."""

    @abc.abstractmethod
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

    @abc.abstractmethod
    async def resend_message(self, message_id: str, *, now: float) -> Message:
        """Send a message again now, with a fresh retry schedule (:class:`NotFound` if unknown)."""

    @abc.abstractmethod
    async def recover_endpoint(self, endpoint_id: str, *, since: float, now: float) -> int:
        """Send again every failed message of the endpoint created since ``since``; the count."""

    # -- service state ------------------------------------------------------------------------

    @abc.abstractmethod
    async def meta_setdefault(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless one is there; return the stored value."""

    @abc.abstractmethod
    async def add_admin_key(self, key_hash: str) -> None: ...

    @abc.abstractmethod
    async def admin_key_hashes(self) -> set[str]: ...
