"""A task as stored and as shown, its states, its events and the moves allowed between them."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from errands.clock import iso

if TYPE_CHECKING:
    from dataclasses import dataclass as record_class
else:

    def record_class(*, frozen: bool, slots: bool) -> Callable[[type], type]:
        """``@dataclass(frozen=True, slots=True)`` to the type checker, which refuses any
        assignment to a field; at run time without ``frozen``. A frozen dataclass sets each field
        through ``object.__setattr__``, and the records below are made by the thousand a second
        (a batch of 1,000 submits makes three of them per task; every change makes one): that
        cost a tenth of a batch's time. The few places that set a field of a fresh record (its
        ``seq``, its cached JSON) say so with ``object.__setattr__``."""
        assert frozen
        assert slots
        return dataclass(slots=True, unsafe_hash=True)  # hashed by its fields, as if frozen


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
    #: Output of the running attempt: chunks appended to one of its named streams.
    STREAM = "task.stream"


#: Every event type, by name.
EVENT_TYPES = frozenset(e.value for e in EventType)
#: Patterns match every event type but these: one is about notifications themselves, the other
#: is output (many per task), which goes only where it is asked for by name.
_NOT_BY_PATTERN = frozenset({EventType.NOTIFIED.value, EventType.STREAM.value})


def valid_pattern(pattern: str) -> bool:
    """Whether ``pattern`` names event types: one (``task.failed``), or all (``task.*``, ``*``)."""
    return pattern in EVENT_TYPES or pattern in ("*", "task.*")


def matches(patterns: Sequence[str], event_type: str) -> bool:
    """Whether an event type is one of ``patterns`` (exact types, or ``task.*`` / ``*`` for all
    but ``task.notified`` and ``task.stream``, which only an exact subscription receives)."""
    for pattern in patterns:
        if pattern == event_type:
            return True
        if pattern in ("*", "task.*") and event_type not in _NOT_BY_PATTERN:
            return True
    return False


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

#: What ``TaskRecord.public_json`` holds when the task has a ``notify_url`` (compact JSON): the
#: fan-out looks for it in end events (``errands.notify.policy``, and PostgreSQL's log index).
NOTIFY_URL_MARK = b'"notify_url":"'

TERMINAL_EVENT = {
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


@record_class(frozen=True, slots=True)
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
    #: When it may first run: ``run_at`` (epoch seconds) if given, else ``delay_s`` after it is
    #: created. A time already past means at once.
    run_at: float | None = None
    delay_s: float = 0.0
    #: Not started within this long of that time, it ends ``timeout`` (code ``not_started``).
    start_within_s: float | None = None
    #: Whose share of the type's or provider's limits it uses (``per="key"``), if not its owner's.
    key: str | None = None
    #: A newer task of the owner and type with the same key replaces this one while it is pending.
    debounce_key: str | None = None
    #: Credits it reserves of its owner's balance (see :mod:`errands.model.credits`).
    cost: int = 0


@record_class(frozen=True, slots=True)
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
    #: Where the current attempt's output streams stand: each name's next position, and
    #: ``"#bytes"``, what they hold in all (see :func:`errands.model.stream_output`).
    stream_positions: Mapping[str, int] | None = None
    #: Never started by then (``start_within_s`` after it was due), it ends ``timeout``.
    start_by: float | None = None
    #: The flow-control key given at submit (see :mod:`errands.model.flow`).
    key: str | None = None
    #: Submitted again with this key (same owner and type), the pending task is replaced.
    debounce_key: str | None = None
    #: Credits it holds of its owner's (see :mod:`errands.model.credits`).
    cost: int = 0
    #: Why a pending task does not run yet, as a read found it (not stored; see
    #: :func:`errands.model.flow.waiting_for`): ``None`` in events and writes.
    waiting_for: str | None = None
    #: ``public_json()`` as last made, with the ``seq`` it was made at (the writers set a fresh
    #: record's seq in place); never copied by :meth:`evolve`, never compared.
    _json: tuple[int, bytes] | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    @property
    def scheduled_for(self) -> float | None:
        """When a pending task becomes claimable, where that is later than its creation (a
        delayed submit, a retry's backoff); ``None`` otherwise."""
        if self.status is Status.PENDING and self.run_after > self.created_at:
            return self.run_after
        return None

    @property
    def waits(self) -> bool:
        """Whether the task is pending but not claimable until after its last change."""
        return self.status is Status.PENDING and self.run_after > self.updated_at

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
            "scheduled_for": iso(self.scheduled_for),
            "waiting_for": self.waiting_for,
            "start_by": iso(self.start_by),
            "key": self.key,
            "debounce_key": self.debounce_key,
            "notify_url": self.notify_url,
            "cost": self.cost,
            "seq": self.seq,
        }

    def public_json(self) -> bytes:
        """``public()`` serialised, made once per record and seq (an event and the answer to
        the request that made it share it)."""
        cached = self._json
        if cached is not None and cached[0] == self.seq:
            return cached[1]
        data = orjson.dumps(self.public())
        object.__setattr__(self, "_json", (self.seq, data))
        return data

    def evolve(self, **changes: Any) -> TaskRecord:
        """A copy with ``changes`` applied, like ``dataclasses.replace`` at half its cost."""
        return _evolve(self, changes)

    def to_task(self) -> Task:
        """The public :class:`Task` (what ``app.submit`` returns)."""
        data = self.public()
        for key in _TIMES:
            ts = getattr(self, key)
            data[key] = None if ts is None else datetime.fromtimestamp(ts, tz=UTC)
        data["status"] = self.status
        data["error"] = self.error
        return Task.model_construct(**data)


_TIMES = ("created_at", "updated_at", "started_at", "finished_at", "expires_at", "scheduled_for", "start_by")


def _make_evolve() -> Callable[[TaskRecord, dict[str, Any]], TaskRecord]:
    """Build ``evolve`` as straight-line code, one line per field, the way ``dataclasses``
    builds ``__init__``: every change of a task makes a record, so a loop over the fields
    showed up in profiles."""
    lines = ["def evolve(self, changes):", "    new = _new(TaskRecord)", "    get = changes.get"]
    for field in dataclasses.fields(TaskRecord):
        if field.name == "_json":
            continue  # what the copy serialises to is made when asked
        lines.append(f"    new.{field.name} = get({field.name!r}, self.{field.name})")
    lines.append("    new._json = None")
    lines.append("    return new")
    scope: dict[str, Any] = {"_new": object.__new__, "TaskRecord": TaskRecord}
    exec("\n".join(lines), scope)  # noqa: S102 - the code is built from the dataclass's own field names
    evolve: Callable[[TaskRecord, dict[str, Any]], TaskRecord] = scope["evolve"]
    return evolve


_evolve = _make_evolve()


@dataclass(frozen=True, slots=True)
class Change:
    """A decided change: the record after it and the event it appends. The event carries the
    task after the change, or ``payload`` when given (a serialised object whose last field is
    ``"seq"``, as a task's is: the stores set it)."""

    record: TaskRecord
    event: EventType
    payload: bytes | None = None

    def snapshot(self) -> bytes:
        """What the event carries, serialised."""
        return self.record.public_json() if self.payload is None else self.payload


def event_json(seq: int, kind: EventType, at: float, task_json: bytes) -> bytes:
    """An event as the API shows it, ``{seq, type, at, task}``, with ``task_json`` as its task."""
    return b'{"seq":%d,"type":"%s","at":"%s","task":%s}' % (
        seq,
        kind.value.encode(),
        (iso(at) or "").encode(),
        task_json,
    )


@record_class(frozen=True, slots=True)
class Event:
    """One committed change of one task, numbered by ``seq`` (unique and increasing).

    ``task_json`` is the task after the change, serialised once when the change was written; its
    ``seq`` field equals the event's. A ``task.stream`` event carries its chunks instead
    (``{name, attempt, index, chunks, seq}``), not the task.
    """

    seq: int
    type: EventType
    at: float
    task_id: str
    owner: str
    task_type: str
    status: Status
    task_json: bytes
    #: The change left the task waiting to be due (known to the process that wrote it).
    waits: bool = dataclasses.field(default=False, compare=False)
    #: The task after the change, where the process that wrote it hands the event over (its
    #: metrics read times from it); ``None`` for events read from the log.
    record: TaskRecord | None = dataclasses.field(default=None, compare=False, repr=False)
    _json: list[bytes] = dataclasses.field(default_factory=list, compare=False, repr=False)

    def to_json(self) -> bytes:
        """The event as the API shows it: ``{seq, type, at, task}`` (rendered once, then shared
        by every watcher it is sent to)."""
        if not self._json:
            at = (iso(self.at) or "").encode()
            if self.type is EventType.STREAM:
                self._json.append(
                    b'{"seq":%d,"type":"task.stream","at":"%s","task_id":%s,"stream":%s}'
                    % (self.seq, at, orjson.dumps(self.task_id), self.task_json)
                )
            else:
                self._json.append(event_json(self.seq, self.type, self.at, self.task_json))
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
    scheduled_for: datetime | None = None
    waiting_for: Literal["schedule", "provider", "concurrency", "rate"] | None = None
    start_by: datetime | None = None
    key: str | None = None
    debounce_key: str | None = None
    notify_url: str | None = None
    cost: int = 0
    seq: int = 0

    @property
    def done(self) -> bool:
        return self.status.terminal
