"""How a :class:`TaskRecord` maps to a row, the same for every store."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from errands.model import Event, EventType, Status, TaskError, TaskRecord
from errands.store.base import Attempt, Endpoint, Message, NewTask

#: Column order of every ``SELECT`` of a task row.
COLUMNS = (
    "id",
    "type",
    "owner",
    "status",
    "input",
    "priority",
    "max_attempts",
    "timeout_s",
    "created_at",
    "updated_at",
    "expires_at",
    "fingerprint",
    "result",
    "error_code",
    "error_message",
    "progress",
    "message",
    "attempt",
    "external_id",
    "webhook_received",
    "notification_sent",
    "started_at",
    "finished_at",
    "seq",
    "run_after",
    "queued_at",
    "lease_token",
    "lease_expires_at",
    "deadline_at",
    "worker_id",
    "manual_retries",
    "poll_at",
    "callback_nonce",
    "notify_url",
)
SELECT_LIST = ", ".join(COLUMNS)

#: Columns an update may change (``id``, ``type``, ``owner``, ``input``, ``created_at``,
#: ``fingerprint`` and ``notify_url`` never change after creation).
MUTABLE = tuple(
    c for c in COLUMNS if c not in {"id", "type", "owner", "input", "created_at", "fingerprint", "notify_url"}
)

#: The record field behind each mutable column (``error`` is stored as two columns).
_MUTABLE_FIELDS = tuple(dict.fromkeys("error" if c.startswith("error_") else c for c in MUTABLE))
_get_mutable = operator.attrgetter(*_MUTABLE_FIELDS)
_FIELD_COLUMNS = {f: ("error_code", "error_message") if f == "error" else (f,) for f in _MUTABLE_FIELDS}


def changed_columns(before: TaskRecord, after: TaskRecord) -> tuple[str, ...]:
    """The mutable columns whose values differ between two versions of a record.

    Identity is enough: a decision builds the new record from the old one, so a field it did
    not change holds the very same object (a field set to an equal value is written again,
    which is harmless).
    """
    return tuple(
        column
        for name, old, new in zip(_MUTABLE_FIELDS, _get_mutable(before), _get_mutable(after), strict=True)
        if old is not new
        for column in _FIELD_COLUMNS[name]
    )


EVENT_COLUMNS = "seq, type, at, task_id, owner, task_type, status, task"
#: The same without the task snapshot, for readers that only route events (worker processes).
EVENT_HEADERS = "seq, type, at, task_id, owner, task_type, status, NULL"


def dump_json(value: Any) -> str:
    return orjson.dumps(value).decode()


def load_json(text: str | bytes | None) -> Any:
    return None if text is None else orjson.loads(text)


def to_record(v: Any) -> TaskRecord:
    """A record from a row of ``COLUMNS`` (a tuple from SQLite, an ``asyncpg.Record``)."""
    code, message = v[13], v[14]
    return TaskRecord(
        id=v[0],
        type=v[1],
        owner=v[2],
        status=Status(v[3]),
        input=load_json(v[4]),
        priority=v[5],
        max_attempts=v[6],
        timeout_s=v[7],
        created_at=v[8],
        updated_at=v[9],
        expires_at=v[10],
        fingerprint=v[11],
        result=load_json(v[12]),
        error=None if code is None else TaskError(code, message or ""),
        progress=v[15],
        message=v[16],
        attempt=v[17],
        external_id=v[18],
        webhook_received=bool(v[19]),
        notification_sent=bool(v[20]),
        started_at=v[21],
        finished_at=v[22],
        seq=v[23],
        run_after=v[24],
        queued_at=v[25],
        lease_token=v[26],
        lease_expires_at=v[27],
        deadline_at=v[28],
        worker_id=v[29],
        manual_retries=v[30],
        poll_at=v[31],
        callback_nonce=v[32],
        notify_url=v[33],
    )


def _getter(column: str) -> Callable[[TaskRecord], Any]:
    if column == "input":
        return lambda r: dump_json(r.input)
    if column == "result":
        return lambda r: None if r.result is None else dump_json(r.result)
    if column == "error_code":
        return lambda r: None if r.error is None else r.error.code
    if column == "error_message":
        return lambda r: None if r.error is None else r.error.message
    if column == "status":
        return lambda r: r.status.value
    return operator.attrgetter(column)


_GETTERS: dict[Sequence[str], tuple[Callable[[TaskRecord], Any], ...]] = {}


def values(r: TaskRecord, columns: Sequence[str] = COLUMNS) -> list[Any]:
    """The values of ``columns`` for a record, ready to bind (called for every row written, so
    the accessors of each column list are built once)."""
    getters = _GETTERS.get(columns)
    if getters is None:
        getters = _GETTERS[columns] = tuple(_getter(c) for c in columns)
    return [get(r) for get in getters]


def to_event(v: Any) -> Event:
    """An event from ``EVENT_COLUMNS`` values."""
    task = v[7] if v[7] is not None else b""
    return Event(
        seq=v[0],
        type=EventType(v[1]),
        at=v[2],
        task_id=v[3],
        owner=v[4],
        task_type=v[5],
        status=Status(v[6]),
        task_json=task if isinstance(task, bytes) else task.encode(),
    )


def new_record(new: NewTask, now: float) -> TaskRecord:
    """The record of a task as it is created (``seq`` is set when its event is written)."""
    return TaskRecord(
        id=new.id,
        type=new.type,
        owner=new.owner,
        status=Status.PENDING,
        input=new.input,
        priority=new.priority,
        max_attempts=new.max_attempts,
        timeout_s=new.timeout_s,
        created_at=now,
        updated_at=now,
        expires_at=now + new.expires_in_s,
        fingerprint=new.fingerprint,
        run_after=now,
        queued_at=now,
        notify_url=new.notify_url,
    )


def with_seq(task_json: bytes, seq: int) -> bytes:
    """A serialised task with its ``seq`` field (always the last one) set to ``seq``."""
    head, sep, _ = task_json.rpartition(b',"seq":')
    if not sep:
        raise ValueError("a task snapshot without a seq field")
    return b'%s,"seq":%d}' % (head, seq)


# -- notifications ----------------------------------------------------------------------------

ENDPOINT_COLUMNS = (
    "id, url, description, events, types, owners, secret, previous_secret, previous_secret_until, "
    "enabled, disabled_reason, failing_since, throttled_until, created_at, updated_at"
)
MESSAGE_COLUMNS = (
    "id, seq, event_type, task_id, owner, task_type, channel, target, payload, final, state, "
    "attempts, next_at, created_at, updated_at, last_status, last_error, lease_token"
)
ATTEMPT_COLUMNS = (
    "message_id, channel, target, task_id, event_type, attempted_at, succeeded, status_code, "
    "latency_ms, response, error"
)


def _names(value: tuple[str, ...] | None) -> str | None:
    return None if value is None else dump_json(list(value))


def _load_names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(load_json(text))


def endpoint_values(e: Endpoint) -> list[Any]:
    return [
        e.id, e.url, e.description, dump_json(list(e.events)), _names(e.types), _names(e.owners),
        e.secret, e.previous_secret, e.previous_secret_until, e.enabled, e.disabled_reason,
        e.failing_since, e.throttled_until, e.created_at, e.updated_at,
    ]  # fmt: skip


def to_endpoint(v: Any) -> Endpoint:
    return Endpoint(
        id=v[0],
        url=v[1],
        description=v[2],
        events=tuple(load_json(v[3])),
        types=_load_names(v[4]),
        owners=_load_names(v[5]),
        secret=v[6],
        previous_secret=v[7],
        previous_secret_until=v[8],
        enabled=bool(v[9]),
        disabled_reason=v[10],
        failing_since=v[11],
        throttled_until=v[12],
        created_at=v[13],
        updated_at=v[14],
    )


def message_values(m: Message) -> list[Any]:
    return [
        m.id, m.seq, m.event_type, m.task_id, m.owner, m.task_type, m.channel, m.target, m.payload,
        m.final, m.state, m.attempts, m.next_at, m.created_at, m.updated_at, m.last_status,
        m.last_error, m.lease_token,
    ]  # fmt: skip


def to_message(v: Any) -> Message:
    return Message(
        id=v[0],
        seq=v[1],
        event_type=v[2],
        task_id=v[3],
        owner=v[4],
        task_type=v[5],
        channel=v[6],
        target=v[7],
        payload=bytes(v[8]),
        final=bool(v[9]),
        state=v[10],
        attempts=v[11],
        next_at=v[12],
        created_at=v[13],
        updated_at=v[14],
        last_status=v[15],
        last_error=v[16],
        lease_token=v[17],
    )


def attempt_values(a: Attempt) -> list[Any]:
    return [
        a.message_id, a.channel, a.target, a.task_id, a.event_type, a.attempted_at, a.succeeded,
        a.status_code, a.latency_ms, a.response, a.error,
    ]  # fmt: skip


def to_attempt(v: Any) -> Attempt:
    """An attempt from ``ATTEMPT_COLUMNS`` followed by ``id``."""
    return Attempt(
        message_id=v[0],
        channel=v[1],
        target=v[2],
        task_id=v[3],
        event_type=v[4],
        attempted_at=v[5],
        succeeded=bool(v[6]),
        status_code=v[7],
        latency_ms=v[8],
        response=v[9],
        error=v[10],
        id=v[11],
    )
