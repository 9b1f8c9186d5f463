"""The columns of every table errands keeps, the same for both stores: one table per record.

:data:`TASK_COLUMNS` is the one place a task field meets the database: its column, its
PostgreSQL type, whether it changes after creation, and how it is encoded and decoded. The
row mapping (:func:`to_record`, :func:`values`), the column lists of every statement and the
PostgreSQL store's array types are all made from it. Adding a task field is a field of
:class:`~errands.model.TaskRecord`, a line here and a migration per dialect.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from errands.model import Event, EventType, Status, TaskError, TaskRecord
from errands.store.records import Attempt, Endpoint, Message, Receipt


def dump_json(value: Any) -> str:
    return orjson.dumps(value).decode()


def load_json(text: str | bytes | None) -> Any:
    return None if text is None else orjson.loads(text)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the task table. ``encode`` is the expression that turns a record ``r``
    into the value to bind, ``decode`` the one that turns a row's value into the field's value
    (both as source text: the mapping functions are compiled from them, see below)."""

    name: str
    pg_type: str
    mutable: bool = True
    field: str | None = None  # the record field (default: the column's name)
    encode: str | None = None  # default: r.<field>
    decode: str | None = None  # ``{}`` stands for the row's value; default: the value itself

    @property
    def attribute(self) -> str:
        return self.field or self.name


TASK_COLUMNS: tuple[Column, ...] = (
    Column("id", "text", mutable=False),
    Column("type", "text", mutable=False),
    Column("owner", "text", mutable=False),
    Column("status", "text", encode="r.status.value", decode="Status({})"),
    Column("input", "text", mutable=False, encode="dump_json(r.input)", decode="load_json({})"),
    Column("priority", "int4"),
    Column("max_attempts", "int4"),
    Column("timeout_s", "float8"),
    Column("created_at", "float8", mutable=False),
    Column("updated_at", "float8"),
    Column("expires_at", "float8"),
    Column("fingerprint", "text", mutable=False),
    Column(
        "result", "text", encode="None if r.result is None else dump_json(r.result)", decode="load_json({})"
    ),
    # ``error`` is two columns: its code and its message (decoded together, see _compile).
    Column("error_code", "text", field="error", encode="None if r.error is None else r.error.code"),
    Column("error_message", "text", field="error", encode="None if r.error is None else r.error.message"),
    Column("progress", "int4"),
    Column("message", "text"),
    Column("attempt", "int4"),
    Column("external_id", "text"),
    Column("webhook_received", "bool", decode="bool({})"),
    Column("notification_sent", "bool", decode="bool({})"),
    Column("started_at", "float8"),
    Column("finished_at", "float8"),
    Column("seq", "int8"),
    Column("run_after", "float8"),
    Column("queued_at", "float8"),
    Column("lease_token", "text"),
    Column("lease_expires_at", "float8"),
    Column("deadline_at", "float8"),
    Column("worker_id", "text"),
    Column("manual_retries", "int4"),
    Column("poll_at", "float8"),
    Column("callback_nonce", "text"),
    Column("notify_url", "text", mutable=False),
    Column(
        "stream_positions",
        "text",
        encode="None if r.stream_positions is None else dump_json(r.stream_positions)",
        decode="load_json({})",
    ),
    Column("start_by", "float8"),  # a manual retry drops it
    Column("limit_key", "text", mutable=False, field="key"),
    Column("debounce_key", "text", mutable=False),
    Column("cost", "int8", mutable=False),
)

#: Column order of every ``SELECT`` of a task row.
COLUMNS = tuple(c.name for c in TASK_COLUMNS)
SELECT_LIST = ", ".join(COLUMNS)
PG_TYPES = {c.name: c.pg_type for c in TASK_COLUMNS}
#: Columns an update may change.
MUTABLE = tuple(c.name for c in TASK_COLUMNS if c.mutable)

_MUTABLE_FIELDS = tuple(dict.fromkeys(c.attribute for c in TASK_COLUMNS if c.mutable))
_get_mutable = operator.attrgetter(*_MUTABLE_FIELDS)
_FIELD_COLUMNS = {
    f: tuple(c.name for c in TASK_COLUMNS if c.mutable and c.attribute == f) for f in _MUTABLE_FIELDS
}


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


def _compile() -> tuple[Callable[[Any], TaskRecord], dict[str, Callable[[TaskRecord], Any]]]:
    """``to_record`` and one value getter per column, compiled from the table as straight-line
    code (they run for every row read and written; a loop over the columns showed in profiles)."""
    scope: dict[str, Any] = {
        "TaskRecord": TaskRecord, "TaskError": TaskError, "Status": Status,
        "dump_json": dump_json, "load_json": load_json,
    }  # fmt: skip
    arguments = []
    for i, c in enumerate(TASK_COLUMNS):
        if c.name == "error_code":
            arguments.append(f"error=None if v[{i}] is None else TaskError(v[{i}], v[{i + 1}] or '')")
        elif c.name != "error_message":
            arguments.append(f"{c.attribute}={(c.decode or '{}').format(f'v[{i}]')}")
    source = "def to_record(v):\n    return TaskRecord(" + ", ".join(arguments) + ")\n"
    exec(source, scope)  # noqa: S102 - the code is built from the column table above
    return scope["to_record"], scope


to_record, _SCOPE = _compile()
to_record.__doc__ = "A record from a row of ``COLUMNS`` (a tuple from SQLite, an ``asyncpg.Record``)."
_VALUE = {c.name: c.encode or f"r.{c.attribute}" for c in TASK_COLUMNS}
_ROWS: dict[Sequence[str], Callable[[TaskRecord], list[Any]]] = {}


def values(r: TaskRecord, columns: Sequence[str] = COLUMNS) -> list[Any]:
    """The values of ``columns`` for a record, ready to bind (one function per column list,
    compiled the first time: every row written runs it)."""
    row = _ROWS.get(columns)
    if row is None:
        source = f"def row(r):\n    return [{', '.join(_VALUE[c] for c in columns)}]\n"
        scope = dict(_SCOPE)  # its own: two threads may compile two column lists at once
        exec(source, scope)  # noqa: S102 - the code is built from the column table
        row = _ROWS[columns] = scope["row"]
    return row(r)


# -- the event log ----------------------------------------------------------------------------

EVENT_COLUMNS = "seq, type, at, task_id, owner, task_type, status, task"
#: The same without the task snapshot, for readers that only route events (worker processes).
EVENT_HEADERS = "seq, type, at, task_id, owner, task_type, status, NULL"


def with_seq(task_json: bytes, seq: int) -> bytes:
    """A serialised task with its ``seq`` field (always the last one) set to ``seq``."""
    head, sep, _ = task_json.rpartition(b',"seq":')
    if not sep:
        raise ValueError("a task snapshot without a seq field")
    return b'%s,"seq":%d}' % (head, seq)


def to_event(v: Any, *, seq_in_snapshot: bool = True) -> Event:
    """An event from ``EVENT_COLUMNS`` values. ``seq_in_snapshot=False``: the snapshot was
    written before its seq was known (PostgreSQL), and gets it now."""
    task = v[7]
    if task is None:
        snapshot = b""
    else:
        snapshot = (
            task if isinstance(task, bytes) else bytes(task) if not isinstance(task, str) else task.encode()
        )
        if not seq_in_snapshot:
            snapshot = with_seq(snapshot, v[0])
    return Event(
        seq=v[0],
        type=EventType(v[1]),
        at=v[2],
        task_id=v[3],
        owner=v[4],
        task_type=v[5],
        status=Status(v[6]),
        task_json=snapshot,
    )


# -- the other records ------------------------------------------------------------------------


def _names(value: tuple[str, ...] | None) -> str | None:
    return None if value is None else dump_json(list(value))


def _load_names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(load_json(text))


def _events(value: tuple[str, ...]) -> str:
    return dump_json(list(value))


def _load_events(text: str) -> tuple[str, ...]:
    return tuple(load_json(text))


@dataclass(frozen=True, slots=True)
class Table:
    """The columns of a record other than a task, in order, with their PostgreSQL types, and how
    the record's fields are stored: the field of the same name, through ``encode`` and ``decode``
    where its stored form differs."""

    record: type[Any]
    columns: tuple[tuple[str, str], ...]
    encode: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    decode: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def select(self) -> str:
        return ", ".join(self.names)

    @property
    def pg_types(self) -> tuple[str, ...]:
        return tuple(kind for _, kind in self.columns)

    def values(self, record: Any) -> list[Any]:
        """The record's values, ready to bind, in column order."""
        out = []
        for name in self.names:
            value = getattr(record, name)
            convert = self.encode.get(name)
            out.append(value if convert is None else convert(value))
        return out

    def load(self, row: Any, *extra: str) -> Any:
        """A record from a row of these columns (followed by the ``extra`` fields, as they are)."""
        fields = {}
        for i, name in enumerate((*self.names, *extra)):
            convert = self.decode.get(name)
            fields[name] = row[i] if convert is None else convert(row[i])
        return self.record(**fields)


ENDPOINTS = Table(
    Endpoint,
    (
        ("id", "text"), ("url", "text"), ("description", "text"), ("events", "text"), ("types", "text"),
        ("owners", "text"), ("secret", "text"), ("previous_secret", "text"), ("previous_secret_until", "float8"),
        ("enabled", "bool"), ("disabled_reason", "text"), ("failing_since", "float8"),
        ("throttled_until", "float8"), ("created_at", "float8"), ("updated_at", "float8"),
    ),
    encode={"events": _events, "types": _names, "owners": _names},
    decode={"events": _load_events, "types": _load_names, "owners": _load_names, "enabled": bool},
)  # fmt: skip
MESSAGES = Table(
    Message,
    (
        ("id", "text"), ("seq", "int8"), ("event_type", "text"), ("task_id", "text"), ("owner", "text"),
        ("task_type", "text"), ("channel", "text"), ("target", "text"), ("payload", "bytea"), ("final", "bool"),
        ("state", "text"), ("attempts", "int4"), ("next_at", "float8"), ("created_at", "float8"),
        ("updated_at", "float8"), ("last_status", "int4"), ("last_error", "text"), ("lease_token", "text"),
    ),
    encode={"channel": str, "state": str},
    decode={"payload": bytes, "final": bool},
)  # fmt: skip
ATTEMPTS = Table(
    Attempt,
    (
        ("message_id", "text"), ("channel", "text"), ("target", "text"), ("task_id", "text"),
        ("event_type", "text"), ("attempted_at", "float8"), ("succeeded", "bool"), ("status_code", "int4"),
        ("latency_ms", "float8"), ("response", "text"), ("error", "text"),
    ),
    encode={"channel": str},
    decode={"succeeded": bool},
)  # fmt: skip
RECEIPTS = Table(
    Receipt,
    (
        ("provider", "text"), ("delivery_id", "text"), ("task_id", "text"), ("outcome", "text"),
        ("status_code", "int4"), ("received_at", "float8"), ("detail", "text"),
    ),
    encode={"outcome": str},
)  # fmt: skip


def endpoint_values(e: Endpoint) -> list[Any]:
    return ENDPOINTS.values(e)


def to_endpoint(row: Any) -> Endpoint:
    endpoint: Endpoint = ENDPOINTS.load(row)
    return endpoint


def message_values(m: Message) -> list[Any]:
    return MESSAGES.values(m)


def to_message(row: Any) -> Message:
    message: Message = MESSAGES.load(row)
    return message


def attempt_values(a: Attempt) -> list[Any]:
    return ATTEMPTS.values(a)


def to_attempt(row: Any) -> Attempt:
    """An attempt from ``ATTEMPTS`` followed by ``id``."""
    attempt: Attempt = ATTEMPTS.load(row, "id")
    return attempt
