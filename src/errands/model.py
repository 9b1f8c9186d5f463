"""Tasks, their states, their events and the rules that move them. No I/O.

Every change of a task is decided here by a pure function that takes the current
:class:`TaskRecord` and returns a :class:`Change` (the record after the change and the event
it produces) or raises. The stores apply a change and append its event in one transaction;
because the decision sees the row the store just read under its write lock, every transition is
a compare-and-set on the status and on the lease that proves who is speaking.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from errands.clock import iso
from errands.errors import Conflict, InvalidTransition, LeaseLost


class Status(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.TIMEOUT, Status.CANCELLED})


class EventType(enum.StrEnum):
    CREATED = "task.created"
    PROCESSING = "task.processing"
    PROGRESS = "task.progress"
    RETRYING = "task.retrying"
    COMPLETED = "task.completed"
    FAILED = "task.failed"
    TIMEOUT = "task.timeout"
    CANCELLED = "task.cancelled"
    #: The task's notifications (webhooks, WeChat messages) about its end were all delivered.
    NOTIFIED = "task.notified"


#: Every allowed move. ``processing → processing`` is a progress report; ``processing → pending``
#: an automatic retry (or a release at shutdown); ``failed|timeout → pending`` a manual retry.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.PROCESSING, Status.CANCELLED, Status.TIMEOUT}),
    Status.PROCESSING: frozenset(
        {
            Status.PROCESSING,
            Status.PENDING,
            Status.COMPLETED,
            Status.FAILED,
            Status.TIMEOUT,
            Status.CANCELLED,
        }
    ),
    Status.FAILED: frozenset({Status.PENDING}),
    Status.TIMEOUT: frozenset({Status.PENDING}),
    Status.COMPLETED: frozenset(),
    Status.CANCELLED: frozenset(),
}

_TERMINAL_EVENT = {
    Status.COMPLETED: EventType.COMPLETED,
    Status.FAILED: EventType.FAILED,
    Status.TIMEOUT: EventType.TIMEOUT,
    Status.CANCELLED: EventType.CANCELLED,
}


def can_move(current: Status, new: Status) -> bool:
    return new in TRANSITIONS[current]


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why a task (or its last attempt) failed: a stable code and a message safe to show."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as stored: the public fields and the bookkeeping the service needs.

    Times are seconds since the epoch. ``input`` and ``result`` are parsed JSON values.
    """

    id: str
    type: str
    owner: str
    status: Status
    input: Any
    priority: int
    max_attempts: int
    timeout_s: float
    created_at: float
    updated_at: float
    expires_at: float
    fingerprint: str
    result: Any = None
    error: TaskError | None = None
    progress: int = 0
    message: str | None = None
    attempt: int = 0
    external_id: str | None = None
    webhook_received: bool = False
    notification_sent: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    seq: int = 0
    run_after: float = 0.0
    queued_at: float = 0.0
    lease_token: str | None = None
    lease_expires_at: float | None = None
    deadline_at: float | None = None
    worker_id: str | None = None
    manual_retries: int = 0
    poll_at: float | None = None  # when to ask the provider next (external tasks)
    callback_nonce: str | None = None  # makes this attempt's capability URL unguessable
    notify_url: str | None = None  # told of the task's end, signed with the default secret

    def public(self) -> dict[str, Any]:
        """The task object of the API, in its documented field order."""
        return {
            "id": self.id,
            "type": self.type,
            "owner": self.owner,
            "status": self.status.value,
            "input": self.input,
            "result": self.result,
            "error": None if self.error is None else {"code": self.error.code, "message": self.error.message},
            "progress": self.progress,
            "message": self.message,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "external_id": self.external_id,
            "webhook_received": self.webhook_received,
            "notification_sent": self.notification_sent,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "expires_at": iso(self.expires_at),
            "notify_url": self.notify_url,
            "seq": self.seq,
        }

    def public_json(self) -> bytes:
        return orjson.dumps(self.public())

    def evolve(self, **changes: Any) -> TaskRecord:
        """A copy with ``changes`` applied, like ``dataclasses.replace`` at half its cost."""
        return _evolve(self, changes)

    def to_task(self) -> Task:
        """The public :class:`Task` (what ``app.submit`` returns)."""
        data = self.public()
        for key in ("created_at", "updated_at", "started_at", "finished_at", "expires_at"):
            ts = getattr(self, key)
            data[key] = None if ts is None else datetime.fromtimestamp(ts, tz=UTC)
        data["status"] = self.status
        data["error"] = self.error
        return Task.model_construct(**data)


def _make_evolve() -> Callable[[TaskRecord, dict[str, Any]], TaskRecord]:
    """Build ``evolve`` as straight-line code, one line per field, the way ``dataclasses``
    builds ``__init__``: every change of a task makes a record, so a loop over the fields
    showed up in profiles."""
    lines = ["def evolve(self, changes):", "    new = _new(TaskRecord)", "    get = changes.get"]
    for field in dataclasses.fields(TaskRecord):
        lines.append(f"    _set(new, {field.name!r}, get({field.name!r}, self.{field.name}))")
    lines.append("    return new")
    scope: dict[str, Any] = {"_new": object.__new__, "_set": object.__setattr__, "TaskRecord": TaskRecord}
    exec("\n".join(lines), scope)  # noqa: S102 - the code is built from the dataclass's own field names
    evolve: Callable[[TaskRecord, dict[str, Any]], TaskRecord] = scope["evolve"]
    return evolve


_evolve = _make_evolve()


@dataclass(frozen=True, slots=True)
class Change:
    """A decided change: the record after it and the event it appends."""

    record: TaskRecord
    event: EventType


@dataclass(frozen=True, slots=True)
class Event:
    """One committed change of one task, numbered by ``seq`` (unique and increasing).

    ``task_json`` is the task after the change, serialised once when the change was written; its
    ``seq`` field equals the event's.
    """

    seq: int
    type: EventType
    at: float
    task_id: str
    owner: str
    task_type: str
    status: Status
    task_json: bytes
    _json: list[bytes] = dataclasses.field(default_factory=list, compare=False, repr=False)

    def to_json(self) -> bytes:
        """The event as the API shows it: ``{seq, type, at, task}`` (rendered once, then shared
        by every watcher it is sent to)."""
        if not self._json:
            self._json.append(
                b'{"seq":%d,"type":"%s","at":"%s","task":%s}'
                % (self.seq, self.type.value.encode(), (iso(self.at) or "").encode(), self.task_json)
            )
        return self._json[0]

    def sse(self) -> bytes:
        """The event as one Server-Sent Events frame, its ``seq`` as the frame id."""
        if len(self._json) < 2:
            self.to_json()
            self._json.append(
                b"id: %d\nevent: %s\ndata: %s\n\n" % (self.seq, self.type.value.encode(), self._json[0])
            )
        return self._json[1]


class Task(BaseModel):
    """A task as the API, the SDK and ``app.submit`` return it."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: str
    owner: str
    status: Status
    input: Any = None
    result: Any = None
    error: TaskError | None = None
    progress: int = 0
    message: str | None = None
    attempt: int = 0
    max_attempts: int = 1
    priority: int = 0
    external_id: str | None = None
    webhook_received: bool = False
    notification_sent: bool = False
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    notify_url: str | None = None
    seq: int = 0

    @property
    def done(self) -> bool:
        return self.status.terminal


# ---------------------------------------------------------------------------------------------
# Decisions. Each takes the current record and returns the change, or raises without side effect.
# ---------------------------------------------------------------------------------------------


def _move(record: TaskRecord, status: Status, now: float, **fields: Any) -> TaskRecord:
    if not can_move(record.status, status):
        raise InvalidTransition(f"A {record.status.value} task cannot become {status.value}.")
    return record.evolve(status=status, updated_at=now, **fields)


def _require_lease(record: TaskRecord, lease_token: str) -> None:
    if record.status is not Status.PROCESSING or record.lease_token != lease_token:
        raise LeaseLost()


_NO_LEASE: dict[str, Any] = {
    "lease_token": None,
    "lease_expires_at": None,
    "deadline_at": None,
    "worker_id": None,
    "poll_at": None,
}


def start_attempt(
    record: TaskRecord,
    *,
    now: float,
    worker_id: str,
    lease_token: str,
    lease_s: float,
    callback_nonce: str | None = None,
) -> Change:
    """pending → processing under a new lease; the attempt counter goes up by one."""
    if record.status is not Status.PENDING or record.run_after > now:
        raise InvalidTransition("The task is not ready to run.")
    new = _move(
        record,
        Status.PROCESSING,
        now,
        attempt=record.attempt + 1,
        started_at=now,
        progress=0,
        message=None,
        error=None,
        lease_token=lease_token,
        lease_expires_at=now + lease_s,
        deadline_at=now + record.timeout_s,
        worker_id=worker_id,
        external_id=None,
        poll_at=None,
        callback_nonce=callback_nonce,
    )
    return Change(new, EventType.PROCESSING)


def report_progress(
    record: TaskRecord, *, now: float, lease_token: str, progress: int | None, message: str | None
) -> Change | None:
    """A progress report from the worker holding the lease; ``None`` when nothing changes.

    Progress never goes backwards within an attempt: a lower value keeps the higher one.
    """
    _require_lease(record, lease_token)
    new_progress = record.progress if progress is None else max(record.progress, progress)
    new_message = record.message if message is None else message
    if new_progress == record.progress and new_message == record.message:
        return None
    return Change(
        _move(record, Status.PROCESSING, now, progress=new_progress, message=new_message),
        EventType.PROGRESS,
    )


def complete(
    record: TaskRecord, *, now: float, lease_token: str | None, result: Any, message: str | None = None
) -> Change:
    """processing → completed. ``lease_token=None`` is for external tasks, which hold no lease."""
    if lease_token is not None:
        _require_lease(record, lease_token)
    new = _move(
        record,
        Status.COMPLETED,
        now,
        result=result,
        error=None,
        progress=100,
        message=record.message if message is None else message,
        finished_at=now,
        **_NO_LEASE,
    )
    return Change(new, EventType.COMPLETED)


def fail_attempt(
    record: TaskRecord,
    *,
    now: float,
    lease_token: str | None,
    error: TaskError,
    retry: bool,
    retry_delay_s: float,
    final_status: Status = Status.FAILED,
    progress: int | None = None,
    message: str | None = None,
) -> Change:
    """End an attempt that did not succeed.

    While attempts remain and ``retry`` is true the task goes back to ``pending`` and becomes
    claimable after ``retry_delay_s``; otherwise it ends in ``final_status`` (``failed`` or
    ``timeout``) with ``error``.
    """
    if lease_token is not None:
        _require_lease(record, lease_token)
    elif record.status is not Status.PROCESSING:
        raise InvalidTransition(f"A {record.status.value} task has no attempt to end.")
    kept = {
        "progress": record.progress if progress is None else max(record.progress, progress),
        "message": record.message if message is None else message,
    }
    if retry and record.attempt < record.max_attempts:
        run_after = now + max(0.0, retry_delay_s)
        new = _move(
            record,
            Status.PENDING,
            now,
            error=error,
            run_after=run_after,
            queued_at=run_after,
            **kept,
            **_NO_LEASE,
        )
        return Change(new, EventType.RETRYING)
    if final_status not in (Status.FAILED, Status.TIMEOUT):
        raise ValueError("an attempt can only end failed or timeout")
    new = _move(record, final_status, now, error=error, finished_at=now, **kept, **_NO_LEASE)
    return Change(new, _TERMINAL_EVENT[final_status])


def hand_off(record: TaskRecord, *, now: float, lease_token: str, external_id: str, poll_at: float) -> Change:
    """A provider accepted the task: it stays processing, now without a lease, until the
    provider reports back (or is polled at ``poll_at``). The attempt's deadline still holds."""
    _require_lease(record, lease_token)
    new = _move(
        record,
        Status.PROCESSING,
        now,
        external_id=external_id,
        message=record.message or "submitted to the provider",
        lease_token=None,
        lease_expires_at=None,
        worker_id=None,
        poll_at=poll_at,
    )
    return Change(new, EventType.PROGRESS)


def external_report(
    record: TaskRecord,
    *,
    now: float,
    external_id: str | None,
    status: str,
    progress: int | None = None,
    message: str | None = None,
    result: Any = None,
    error: TaskError | None = None,
    by_webhook: bool = False,
) -> Change | None:
    """A provider's report (``status``: running, completed or failed) on the job of a task.

    Only a processing task moves, and only for its current job (``external_id``, when given):
    a late report (after the task ended) or one for an older job raises and changes nothing.
    ``None`` when a running report brings nothing new.
    """
    if record.status is not Status.PROCESSING:
        raise InvalidTransition(f"The task is already {record.status.value}.")
    if external_id is not None and record.external_id != external_id:
        raise InvalidTransition("The report is about another job than the task's current one.")
    flag = {"webhook_received": True} if by_webhook and not record.webhook_received else {}
    if status == "running":
        new_progress = record.progress if progress is None else max(record.progress, progress)
        new_message = record.message if message is None else message
        if new_progress == record.progress and new_message == record.message and not flag:
            return None
        new = _move(record, Status.PROCESSING, now, progress=new_progress, message=new_message, **flag)
        return Change(new, EventType.PROGRESS)
    if status == "completed":
        change = complete(record, now=now, lease_token=None, result=result, message=message)
    elif status == "failed":
        failure = error or TaskError("provider_failed", "The provider reported a failure.")
        change = fail_attempt(record, now=now, lease_token=None, error=failure, retry=False, retry_delay_s=0)
    else:
        raise ValueError(f"unknown report status {status!r}")
    return Change(change.record.evolve(**flag), change.event) if flag else change


def release(record: TaskRecord, *, now: float, lease_token: str) -> Change:
    """Give a task back unfinished (worker shutting down): pending again, the attempt not counted."""
    _require_lease(record, lease_token)
    new = _move(
        record,
        Status.PENDING,
        now,
        attempt=max(0, record.attempt - 1),
        run_after=now,
        queued_at=now,
        **_NO_LEASE,
    )
    return Change(new, EventType.RETRYING)


def cancel(record: TaskRecord, *, now: float) -> Change:
    """pending|processing → cancelled. A worker still running it loses its lease with this."""
    if record.status.terminal:
        raise InvalidTransition(f"The task is already {record.status.value}.")
    new = _move(
        record,
        Status.CANCELLED,
        now,
        error=TaskError("cancelled", "The task was cancelled."),
        finished_at=now,
        **_NO_LEASE,
    )
    return Change(new, EventType.CANCELLED)


def manual_retry(record: TaskRecord, *, now: float, max_manual_retries: int) -> Change:
    """failed|timeout → pending, at most ``max_manual_retries`` times; grants one more attempt."""
    if record.status not in (Status.FAILED, Status.TIMEOUT):
        raise InvalidTransition(
            f"Only a failed or timed-out task can be retried; this one is {record.status}."
        )
    if record.manual_retries >= max_manual_retries:
        raise Conflict(
            f"The task was already retried {record.manual_retries} times, the most allowed.",
            code="retry_limit",
        )
    new = _move(
        record,
        Status.PENDING,
        now,
        manual_retries=record.manual_retries + 1,
        max_attempts=max(record.max_attempts, record.attempt + 1),
        notification_sent=False,
        run_after=now,
        queued_at=now,
        finished_at=None,
        **_NO_LEASE,
    )
    return Change(new, EventType.RETRYING)


def mark_notified(record: TaskRecord, *, now: float, seq: int) -> Change | None:
    """Every notification of the end whose event is ``seq`` was delivered: ``notification_sent``.

    ``None`` when there is nothing to mark: already marked, or the task moved on since that end
    (a manual retry), whose own end will be notified in turn.
    """
    if record.notification_sent or not record.status.terminal or record.seq != seq:
        return None
    return Change(record.evolve(notification_sent=True, updated_at=now), EventType.NOTIFIED)


def expire(record: TaskRecord, *, now: float) -> Change:
    """An unfinished task past ``expires_at`` ends ``timeout``."""
    if record.status.terminal or record.expires_at > now:
        raise InvalidTransition("The task has not expired.")
    new = _move(
        record,
        Status.TIMEOUT,
        now,
        error=TaskError("expired", "The task did not finish before it expired."),
        finished_at=now,
        **_NO_LEASE,
    )
    return Change(new, EventType.TIMEOUT)


def backoff_s(attempt: int, *, base_s: float, cap_s: float, jitter: float) -> float:
    """Exponential backoff for the retry after ``attempt`` (1-based), with ``jitter`` in [0, 1).

    The delay is ``base · 2^(attempt-1)`` capped at ``cap_s``, then spread over its upper half so
    retries of tasks that failed together do not arrive together.
    """
    ceiling = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return float(ceiling * (0.5 + 0.5 * jitter))
