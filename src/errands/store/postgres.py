"""The distributed store: PostgreSQL through asyncpg, shared by any number of nodes and workers.

Writes go through a small writer, as on SQLite, so concurrent changes share transactions; a few
lanes (pooled connections) work in parallel. A transaction runs in two phases:

1. the changes: each decision locks and reads its row, decides, and buffers the new record;
   creates insert at once, so a concurrent duplicate is caught by the primary key;
2. one statement that writes every changed row, appends every event and notifies listeners,
   then ``COMMIT``.

**Seqs without gaps.** A PostgreSQL sequence hands out numbers in call order, not commit order,
so a reader following ``seq > last`` could pass a number whose transaction commits later. Here
an event's seq is ``(writing transaction's id) << 16 | (ordinal within it)``, and readers only
read below ``pg_snapshot_xmin``, the oldest transaction still running: everything below it has
finished, so nothing can appear there later. Transactions commit concurrently (PostgreSQL's group
commit works), and each event is delivered once the transactions older than it are done.

**A task's events in commit order.** For that, transactions writing the same task must have ids
in the order they commit. A transaction gets its id with its first lock or write; if it then
waited for a row held by a younger one, it would commit after it with a smaller id. So row locks
are taken with ``NOWAIT`` and a batch that meets a locked row is rolled back and run again, with
a new, younger id. Each statement of a batch sees what committed before it (READ COMMITTED),
so a batch that has its id may also read a row that a younger transaction wrote and committed
since: every row it locks to change is read with the batch's seq base, and a row whose latest
event is not older makes the batch run again, younger. A claim (``SKIP LOCKED``, never waiting)
always comes first in its transaction, so that takes its id as it locks what it claims.

**Plans that stay cheap.** The task table is a queue: rows are inserted, updated twice and
deleted, so its partial indexes (``status = 'pending'``) hold many entries of rows that have
moved on until ``VACUUM`` runs. An ordered index scan marks those entries dead as it passes
them, and the next scan skips them; a bitmap scan never does, so a claim planned as one reads
every dead entry, every time. Plans cached while the table was small (a new database, before
autovacuum's first ``ANALYZE``) scan the whole table for a single row. Write transactions
therefore begin with ``enable_seqscan`` and ``enable_bitmapscan`` off (``_BEGIN``): every row
they touch is reached through an index, and the claim walks ``errands_tasks_queue`` in order.

Other nodes learn of commits through ``LISTEN``/``NOTIFY`` (the payload is only the last seq; the
hub reads the log itself), with a dedicated connection that reconnects by itself; the hub catches
up from its last seq after every reconnect, so nothing is missed while it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from errands.clock import Clock
from errands.errors import (
    ConfigError,
    ErrandsError,
    IdConflict,
    InvalidTransition,
    LeaseLost,
    NotFound,
    StoreError,
    TooManyRequests,
)
from errands.model import Change, Event, EventType, Status, TaskRecord, mark_notified, start_attempt
from errands.store.base import (
    WORK_EVENTS,
    Attempt,
    AttemptResult,
    ClaimSpec,
    Decision,
    Delivery,
    DueTasks,
    Endpoint,
    Message,
    MessageQuery,
    NewTask,
    Outcome,
    StatsRows,
    Store,
    TaskQuery,
    Tombstone,
)
from errands.store.migrations import fresh_schema, migrations
from errands.store.rows import (
    ATTEMPT_COLUMNS,
    COLUMNS,
    ENDPOINT_COLUMNS,
    EVENT_COLUMNS,
    EVENT_HEADERS,
    MESSAGE_COLUMNS,
    MUTABLE,
    SELECT_LIST,
    attempt_values,
    endpoint_values,
    message_values,
    new_record,
    to_attempt,
    to_endpoint,
    to_message,
    to_record,
    values,
    with_seq,
)

log = logging.getLogger("errands.store")

T = TypeVar("T")
_MAX_BATCH = 256
_CHANNEL = "errands_events"
#: Ends a notification's payload (the commit's last seq) when the commit made a task claimable.
_WORK = "+"
_SWEEPER_LOCK = 0x6572_7261_6E64_73  # "errands": the advisory lock one sweeper holds at a time


class _YoungerWrite(Exception):
    """A row this transaction read was last written by a younger transaction (see the module
    docstring): run again, younger."""


#: The seq base of the transaction (assigning its id if it has none yet), read beside a row.
_BASE = "(pg_current_xact_id()::text::bigint << 16)"
_SEQ = COLUMNS.index("seq")


def _older(row: Any) -> Any:
    """``row`` (whose last column is ``_BASE``) if its task's latest event is older than this
    transaction, so that the event this transaction writes comes after it."""
    if row[_SEQ] >= row[-1]:
        raise _YoungerWrite()
    return row


_RETRYABLE = (
    asyncpg.LockNotAvailableError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    _YoungerWrite,
)
_ATTEMPTS = 12
#: Highest seq a reader may read: below the oldest transaction still running (see the docstring).
_SAFE = "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16)"
_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # "cannot switch to state …; another operation is in progress": a pooled connection whose
    # server went away in the middle of an operation (seen while PostgreSQL restarts).
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    ConnectionError,
    OSError,
    TimeoutError,
)

_PG_TYPES = {
    "id": "text",
    "type": "text",
    "owner": "text",
    "status": "text",
    "input": "text",
    "priority": "int4",
    "max_attempts": "int4",
    "timeout_s": "float8",
    "created_at": "float8",
    "updated_at": "float8",
    "expires_at": "float8",
    "fingerprint": "text",
    "result": "text",
    "error_code": "text",
    "error_message": "text",
    "progress": "int4",
    "message": "text",
    "attempt": "int4",
    "external_id": "text",
    "webhook_received": "bool",
    "notification_sent": "bool",
    "started_at": "float8",
    "finished_at": "float8",
    "seq": "int8",
    "run_after": "float8",
    "queued_at": "float8",
    "lease_token": "text",
    "lease_expires_at": "float8",
    "deadline_at": "float8",
    "worker_id": "text",
    "manual_retries": "int4",
    "poll_at": "float8",
    "callback_nonce": "text",
    "notify_url": "text",
}
_WRITTEN = tuple(c for c in MUTABLE if c != "seq")
_MESSAGE_TYPES = [
    "text",
    "int8",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "bytea",
    "bool",
    "text",
    "int4",
    "float8",
    "float8",
    "float8",
    "int4",
    "text",
    "text",
]
_MESSAGE_ARRAYS = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_MESSAGE_TYPES, start=1))
_INSERTED = tuple(c for c in COLUMNS if c != "seq")


def _commit_sql() -> str:
    """The second phase: write rows, append events, notify; one round trip."""
    n_rows = len(_WRITTEN) + 2  # id, ord, then the columns
    row_args = ", ".join(
        f"${i + 2}::{t}[]" for i, t in enumerate(["text", "int4"] + [_PG_TYPES[c] for c in _WRITTEN])
    )
    row_names = ", ".join(["id", "ord", *_WRITTEN])
    first_event = n_rows + 2
    event_types = ["int4", "text", "float8", "text", "text", "text", "text", "bytea"]
    event_args = ", ".join(f"${first_event + i}::{t}[]" for i, t in enumerate(event_types))
    sets = ", ".join(f"{c} = r.{c}" for c in _WRITTEN)
    return f"""
WITH s AS (
    SELECT (pg_current_xact_id()::text::bigint << 16) AS base
), written AS (
    UPDATE errands_tasks t SET {sets}, seq = s.base + r.ord
    FROM s, unnest({row_args}) AS r({row_names})
    WHERE t.id = r.id
), events AS (
    INSERT INTO errands_events ({EVENT_COLUMNS})
    SELECT s.base + e.ord, e.type, e.at, e.task_id, e.owner, e.task_type, e.status, e.task
    FROM s, unnest({event_args}) AS e(ord, type, at, task_id, owner, task_type, status, task)
)
SELECT base, pg_notify('{_CHANNEL}', (base + $1::int4)::text || ${first_event + len(event_types)}::text) FROM s
"""


_COMMIT = _commit_sql()


def _since_sql(columns: str) -> str:
    """Committed events after a seq, below the safe bound, and whether any event lies above it
    (one round trip, at least one row: the hubs of every process run it after every commit).
    ``max(seq)`` is one step down the primary key whatever the statistics say; a range probe
    gets planned as a sequential scan while the table grows faster than ANALYZE."""
    return f"""
WITH s AS MATERIALIZED (SELECT {_SAFE} AS safe)
SELECT e.*, (SELECT max(seq) FROM errands_events) >= s.safe
FROM s LEFT JOIN LATERAL (
    SELECT {columns} FROM errands_events WHERE seq > $1 AND seq < s.safe ORDER BY seq LIMIT $2
) e ON true
"""


_EVENTS_SINCE = _since_sql(EVENT_COLUMNS)
_HEADERS_SINCE = _since_sql(EVENT_HEADERS.replace("NULL", "NULL::bytea AS task"))
_SELECT_TASK = f"SELECT {SELECT_LIST} FROM errands_tasks WHERE id = $1"
_CLAIM = (
    f"SELECT {SELECT_LIST} FROM errands_tasks WHERE status = 'pending' AND type = ANY($1::text[]) "
    "AND run_after <= $2 ORDER BY priority DESC, created_at, id LIMIT $3 FOR UPDATE SKIP LOCKED"
)
_LOCK_TASKS = f"SELECT {SELECT_LIST}, {_BASE} FROM errands_tasks WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE NOWAIT"


#: Store a value unless the key has one; always answers the stored value. ``DO UPDATE`` rather
#: than ``DO NOTHING`` plus a read: under READ COMMITTED, a key inserted by a transaction that
#: committed while this statement waited for it is invisible to the statement's snapshot, but
#: ``ON CONFLICT DO UPDATE`` locks and returns the committed row (nodes starting at once).
META_SETDEFAULT = (
    "INSERT INTO errands_meta (key, value) VALUES ($1, $2) "
    "ON CONFLICT (key) DO UPDATE SET value = errands_meta.value RETURNING value"
)

#: How a write transaction begins, in one round trip (see "Plans that stay cheap" above).
_BEGIN = "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off"


@contextlib.asynccontextmanager
async def _indexed_transaction(conn: PoolConnectionProxy[asyncpg.Record]) -> AsyncIterator[None]:
    """A transaction whose statements reach rows only through indexes."""
    await conn.execute(_BEGIN)
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, *_CONNECTION_ERRORS):
                await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


def _insert_sql() -> str:
    """A create in one statement: the row with its final seq, its event, the notification."""
    n = len(_INSERTED)
    row = [f"${i + 1}::{_PG_TYPES[c]}" for i, c in enumerate(_INSERTED)]
    return f"""
WITH ins AS (
    INSERT INTO errands_tasks ({", ".join(_INSERTED)}, seq)
    SELECT {", ".join(row)}, (pg_current_xact_id()::text::bigint << 16) + ${n + 1}
    WHERE NOT EXISTS (SELECT 1 FROM errands_tombstones WHERE id = $1)
    ON CONFLICT (id) DO NOTHING
    RETURNING seq, id, owner, type, updated_at
), ev AS (
    INSERT INTO errands_events ({EVENT_COLUMNS})
    SELECT seq, 'task.created', updated_at, id, owner, type, 'pending', ${n + 2} FROM ins
)
SELECT seq, pg_notify('{_CHANNEL}', seq::text || '{_WORK}') FROM ins
"""


_INSERT_TASK = _insert_sql()


class _Tx:
    """One write transaction, as seen by the changes of a batch (see the module docstring)."""

    def __init__(self, conn: PoolConnectionProxy[asyncpg.Record]) -> None:
        self.conn = conn
        self.pending: list[tuple[TaskRecord, EventType]] = []
        self.overlay: dict[str, TaskRecord] = {}
        self.ordinal = 0  # events numbered so far in this transaction (the low bits of their seqs)
        self.written: list[Event] = []  # events already written (creates)
        self.deliveries: list[Delivery] = []  # inbound webhooks to record, with the batch
        self.created: dict[str, TaskRecord] = {}
        self.locked: dict[str, TaskRecord] = {}  # rows locked here, as they were read
        # Tasks this transaction started, per (type, owner): not yet written, so not counted by
        # a query, but they count against concurrency_per_owner for the next claim in the batch.
        self.started: dict[tuple[str, str], int] = {}

    def mark(self) -> int:
        return len(self.pending)

    def reset(self, mark: int) -> None:
        # Only buffered changes can be undone; a create that was written stays (ops that raise
        # do so before they write).
        del self.pending[mark:]
        self.overlay = {**self.created, **{record.id: record for record, _ in self.pending}}

    async def load(self, task_id: str) -> TaskRecord | None:
        if task_id in self.overlay:
            return self.overlay[task_id]
        await self.lock((task_id,))
        return self.locked.get(task_id)

    async def lock(self, task_ids: Iterable[str]) -> None:
        """Lock and read these rows in one statement, for the changes that will load them."""
        ids = sorted({i for i in task_ids if i not in self.overlay and i not in self.locked})
        if not ids:
            return
        for row in await self.conn.fetch(_LOCK_TASKS, ids):
            record = to_record(_older(row))
            self.locked[record.id] = record

    def write(self, change: Change) -> TaskRecord:
        self.pending.append((change.record, change.event))
        self.overlay[change.record.id] = change.record
        return change.record

    async def insert(self, record: TaskRecord) -> bool:
        """Insert a new task with its event; ``False`` if its id is taken (or was, by a purged
        task). Written at once, with its final seq, not in the second phase."""
        self.ordinal += 1
        snapshot = record.public_json()
        seq = await self.conn.fetchval(_INSERT_TASK, *values(record, _INSERTED), self.ordinal, snapshot)
        if seq is None:
            return False
        object.__setattr__(record, "seq", seq)  # a fresh record, not shared yet
        self.overlay[record.id] = self.created[record.id] = record
        self.written.append(
            Event(seq, EventType.CREATED, record.updated_at, record.id, record.owner, record.type,
                  record.status, with_seq(snapshot, seq))
        )  # fmt: skip
        return True

    async def apply(self, task_id: str, decide: Decision) -> TaskRecord:
        current = await self.load(task_id)
        if current is None:
            raise NotFound()
        change = decide(current)
        return current if change is None else self.write(change)

    async def commit_changes(self) -> list[Event]:
        """Phase 2: rows, events, notification. Sets each written record's seq."""
        if self.deliveries:
            await _insert_deliveries(self.conn, self.deliveries)
            self.deliveries = []
        if not self.pending:
            return self.written
        if self.ordinal + len(self.pending) >= 1 << 16:
            raise StoreError("Too many changes in one transaction.")
        first = self.ordinal + 1
        last_ord: dict[str, int] = {}
        for ord_, (record, _) in enumerate(self.pending, start=first):
            last_ord[record.id] = ord_
        finals = [self.pending[o - first][0] for o in last_ord.values()]
        row_arrays: list[list[Any]] = [[r.id for r in finals], list(last_ord.values())]
        written = [values(r, _WRITTEN) for r in finals]
        row_arrays.extend([row[i] for row in written] for i in range(len(_WRITTEN)))
        snapshots = [record.public_json() for record, _ in self.pending]
        event_arrays: list[list[Any]] = [
            list(range(first, first + len(self.pending))),
            [kind.value for _, kind in self.pending],
            [record.updated_at for record, _ in self.pending],
            [record.id for record, _ in self.pending],
            [record.owner for record, _ in self.pending],
            [record.type for record, _ in self.pending],
            [record.status.value for record, _ in self.pending],
            snapshots,
        ]
        work = _WORK if any(kind in WORK_EVENTS for _, kind in self.pending) else ""
        base = await self.conn.fetchval(
            _COMMIT, first + len(self.pending) - 1, *row_arrays, *event_arrays, work
        )
        events = list(self.written)
        for ord_, ((record, kind), snapshot) in enumerate(
            zip(self.pending, snapshots, strict=True), start=first
        ):
            seq = base + ord_
            if last_ord[record.id] == ord_:
                object.__setattr__(record, "seq", seq)  # fresh records, not shared yet
            events.append(
                Event(seq, kind, record.updated_at, record.id, record.owner, record.type, record.status,
                      with_seq(snapshot, seq))
            )  # fmt: skip
        return sorted(events, key=lambda e: e.seq)


_Op = Callable[[_Tx], Awaitable[Any]]
_Mode = Literal["batch", "alone", "first"]


class _Job(NamedTuple):
    """A change, its caller, and how it may run: ``mode`` "batch" (with whatever is queued),
    "alone" (one statement: in autocommit when nothing else is queued) or "first" (first in its
    transaction); ``task_id``, when known, is the task it will load (locked with the others')."""

    fn: _Op
    future: asyncio.Future[Any]
    mode: _Mode
    task_id: str | None = None


def _is_op_error(exc: BaseException) -> bool:
    """An error a change raised on its own (refused, not found…), as opposed to a database error."""
    return isinstance(exc, ErrandsError | ValueError) and not isinstance(exc, StoreError)


class _Writer:
    """Batches changes into transactions on a few lanes (connections) working in parallel."""

    def __init__(self, pool: asyncpg.Pool, on_commit: Callable[[Sequence[Event]], None], lanes: int) -> None:
        self._pool = pool
        self._on_commit = on_commit
        self._queue: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._lanes = [asyncio.create_task(self._lane(), name=f"errands-pg-writer-{i}") for i in range(lanes)]

    def alive(self) -> bool:
        return all(not lane.done() for lane in self._lanes)

    def submit(self, fn: _Op, *, mode: _Mode = "batch", task_id: str | None = None) -> asyncio.Future[Any]:
        """Queue a change (``mode``: see ``_Job``)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._stopping:
            future.set_exception(StoreError("The store is closed."))
            return future
        self._queue.append(_Job(fn, future, mode, task_id))
        self._wake.set()
        return future

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.gather(*self._lanes, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(StoreError("The store is closed."))

    async def _lane(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._queue.popleft()]
            while self._queue and len(batch) < _MAX_BATCH and self._queue[0].mode != "first":
                batch.append(self._queue.popleft())
            if self._queue:
                self._wake.set()  # let another lane take the rest
            try:
                await self._run(batch)
            except Exception as exc:  # never let a lane die; fail the batch instead
                log.exception("postgres write lane failed")
                self._settle(
                    [
                        (job.future, None, StoreError("The database could not save the change."))
                        for job in batch
                    ]
                )
                del exc

    async def _run(self, batch: list[_Job]) -> None:
        for attempt in range(_ATTEMPTS):
            try:
                results, events = await self._transaction(batch)
            except _RETRYABLE:
                # A row was locked (NOWAIT): run again, as a younger transaction, once it is free.
                if attempt == _ATTEMPTS - 1:
                    raise
                await asyncio.sleep(random.uniform(0.001, 0.004) * (attempt + 1))  # noqa: S311 - jitter
                continue
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                if len(batch) > 1 and not isinstance(exc, _CONNECTION_ERRORS):
                    for job in batch:  # find the change that broke it; the others still land
                        await self._run([job])
                    return
                log.error("postgres write failed: %s", exc)
                error = StoreError("The database could not save the change.")
                error.__cause__ = exc
                self._settle([(job.future, None, error) for job in batch])
                return
            if events:
                try:
                    self._on_commit(events)
                except Exception:
                    log.exception("a commit listener failed")
            self._settle(results)
            return

    async def _transaction(
        self, batch: list[_Job]
    ) -> tuple[list[tuple[asyncio.Future[Any], Any, BaseException | None]], list[Event]]:
        if len(batch) == 1 and batch[0].mode == "alone":
            fn, future = batch[0].fn, batch[0].future
            async with self._pool.acquire() as conn:
                tx = _Tx(conn)
                try:
                    result = await fn(tx)
                except Exception as exc:
                    if not _is_op_error(exc):
                        raise
                    return [(future, None, exc)], tx.written
                return [(future, result, None)], await tx.commit_changes()
        async with self._pool.acquire() as conn, _indexed_transaction(conn):
            tx = _Tx(conn)
            results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            # The rows the changes will load, locked in one statement rather than one each
            # (after a claim, which must take the transaction's id itself).
            keys = [job.task_id for job in batch if job.task_id is not None]
            for fn, future, mode, _ in batch:
                if len(keys) > 1 and mode != "first":
                    await tx.lock(keys)
                    keys = []
                mark = tx.mark()
                try:
                    result = await fn(tx)
                except Exception as exc:
                    if not _is_op_error(exc):
                        raise
                    tx.reset(mark)
                    results.append((future, None, exc))
                else:
                    results.append((future, result, None))
            events = await tx.commit_changes()
        return results, events

    @staticmethod
    def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        for future, result, error in results:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


class PostgresStore(Store):
    """A :class:`Store` on PostgreSQL (see the module docstring)."""

    dialect = "postgres"
    #: NOTIFY wakes the hub at once; this is only the safety net.
    log_poll_s = 1.0
    #: Every commit of every process notifies every hub; reading once per notification cost
    #: more than a query per task per process under load.
    log_read_gap_s = 0.003

    def __init__(self, url: str, clock: Clock, *, pool_size: int = 8, write_lanes: int = 3) -> None:
        super().__init__(clock)
        self.url = url
        self._pool_size = max(2, pool_size)
        self._lanes = max(1, min(write_lanes, self._pool_size - 1))
        self._pool: asyncpg.Pool | None = None
        self._writer: _Writer | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self.listening = asyncio.Event()
        self.behind = False

    # -- life cycle ---------------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(self.url, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ConfigError(f"Cannot connect to PostgreSQL at {_safe_url(self.url)}: {exc}.") from None

    async def open(self, *, migrate: bool = True) -> None:
        if migrate:
            await self.migrate()
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=30,
                timeout=10,
                reset=_keep_session,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ConfigError(f"Cannot connect to PostgreSQL at {_safe_url(self.url)}: {exc}.") from None
        if not migrate and await self._pending_migrations():
            raise ConfigError("The database schema is not up to date; run `errands migrate`.")
        self._writer = _Writer(self._pool, self._committed, self._lanes)
        self._listener = asyncio.create_task(self._listen(), name="errands-pg-listen")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        for conn in (self._listen_conn, self._lock_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
        self._listen_conn = self._lock_conn = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
            self._pool = None

    async def _listen(self) -> None:
        """Keep a LISTEN connection; on every (re)connect, tell the listeners to catch up."""
        delay = 0.2
        while True:
            try:
                conn = await asyncpg.connect(self.url, timeout=10)
                self._listen_conn = conn
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, gone=lost: gone.set())
                await conn.add_listener(
                    _CHANNEL, lambda _c, _p, _n, payload: self._remote_commit(work=payload.endswith(_WORK))
                )
                self.listening.set()
                delay = 0.2
                self._remote_commit()
                while not lost.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                    if not lost.is_set():
                        await conn.execute("SELECT 1")  # notice a silently dead connection
                log.warning("listening for events failed: the connection was lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listening for events failed (%s); reconnecting", type(exc).__name__)
            self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def migrate(self) -> list[int]:
        conn = await self._connect()
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SWEEPER_LOCK + 1)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS errands_schema_migrations "
                    "(version integer PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)"
                )
                applied = {r[0] for r in await conn.fetch("SELECT version FROM errands_schema_migrations")}
                known = migrations("postgres")
                if not applied:
                    await conn.execute(fresh_schema("postgres"))
                    todo = known
                else:
                    todo = [m for m in known if m[0] not in applied]
                    for _, _, sql in todo:
                        await conn.execute(sql)
                for version, name, _ in todo:
                    await conn.execute(
                        "INSERT INTO errands_schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                        version,
                        name,
                        self.clock.now(),
                    )
                return [v for v, _, _ in todo]
        except asyncpg.PostgresError as exc:
            raise StoreError(f"Migrating the PostgreSQL database failed: {exc}.") from exc
        finally:
            await conn.close()

    async def _pending_migrations(self) -> list[int]:
        try:
            applied = {r[0] for r in await self._fetch("SELECT version FROM errands_schema_migrations")}
        except StoreError:
            applied = set()
        return [v for v, _, _ in migrations("postgres") if v not in applied]

    async def ping(self) -> None:
        if self._writer is None or not self._writer.alive():
            raise StoreError("The PostgreSQL writer is not running.")
        await self._fetch("SELECT 1")

    async def hold_sweeper_lock(self) -> bool:
        """Whether this process is the one sweeper (a session advisory lock, lost with its node)."""
        try:
            if self._lock_conn is None or self._lock_conn.is_closed():
                self._lock_conn = await asyncpg.connect(self.url, timeout=10)
                self._lock_held = False
            if not getattr(self, "_lock_held", False):
                self._lock_held = bool(
                    await self._lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", _SWEEPER_LOCK)
                )
            else:
                await self._lock_conn.execute("SELECT 1")
            return self._lock_held
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
            self._lock_conn = None
            self._lock_held = False
            return False

    # -- plumbing -----------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if self._pool is None:
            raise StoreError("The store is closed.")
        try:
            return list(await self._pool.fetch(sql, *args))
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise StoreError("The database could not be read.") from exc

    async def _write(
        self, fn: Callable[[_Tx], Awaitable[T]], *, mode: _Mode = "batch", task_id: str | None = None
    ) -> T:
        if self._writer is None:
            raise StoreError("The store is closed.")
        result: T = await self._writer.submit(fn, mode=mode, task_id=task_id)
        return result

    # -- tasks --------------------------------------------------------------------------------

    async def create(
        self, new: NewTask, *, max_pending_per_owner: int | None = None
    ) -> tuple[TaskRecord, bool]:
        record = new_record(new, self.clock.now())

        async def op(tx: _Tx) -> tuple[TaskRecord, bool]:
            if max_pending_per_owner is not None:
                pending = await tx.conn.fetchval(
                    "SELECT count(*) FROM (SELECT 1 FROM errands_tasks WHERE owner = $1 AND status = 'pending' "
                    "LIMIT $2) p",
                    new.owner,
                    max_pending_per_owner,
                )
                if pending >= max_pending_per_owner:
                    raise TooManyRequests(
                        f"The owner already has {pending} pending tasks, the most allowed.",
                        code="too_many_pending",
                        retry_after_s=5,
                    )
            if await tx.insert(record):
                return record, True
            existing = await tx.load(new.id)
            if existing is None:
                raise IdConflict("This id belonged to a task that has been purged.")
            if existing.fingerprint != new.fingerprint:
                raise IdConflict()
            return existing, False

        # Alone, the insert is one atomic statement (row, event, notification): it needs no
        # transaction around it. The count for max_pending_per_owner is then a soft limit.
        return await self._write(op, mode="alone")

    async def get(self, task_id: str) -> TaskRecord | Tombstone | None:
        rows = await self._fetch(_SELECT_TASK, task_id)
        if rows:
            return to_record(rows[0])
        rows = await self._fetch("SELECT id, owner, purged_at FROM errands_tombstones WHERE id = $1", task_id)
        return Tombstone(*rows[0]) if rows else None

    async def list_tasks(self, query: TaskQuery) -> list[TaskRecord]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("owner", query.owner),
            ("id", query.task_id),
            ("status", query.status.value if query.status else None),
            ("type", query.type),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        if query.before is not None:
            args.extend(query.before)
            clauses.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        args.append(query.limit)
        sql = f"SELECT {SELECT_LIST} FROM errands_tasks {where} ORDER BY created_at DESC, id DESC LIMIT ${len(args)}"
        return [to_record(r) for r in await self._fetch(sql, *args)]

    async def apply(self, task_id: str, decide: Decision) -> TaskRecord:
        async def op(tx: _Tx) -> TaskRecord:
            return await tx.apply(task_id, decide)

        return await self._write(op, task_id=task_id)

    async def apply_many(self, decisions: Sequence[tuple[str, Decision]]) -> list[Outcome]:
        async def op(tx: _Tx) -> list[Outcome]:
            # All rows at once, NOWAIT like every lock here (see the module docstring).
            await tx.lock(task_id for task_id, _ in decisions)
            outcomes = []
            for task_id, decide in decisions:
                mark = tx.mark()
                try:
                    outcomes.append(Outcome(await tx.apply(task_id, decide), None))
                except Exception as exc:
                    if not _is_op_error(exc):
                        raise
                    tx.reset(mark)
                    outcomes.append(Outcome(None, exc))
            return outcomes

        return await self._write(op)

    async def claim(
        self, *, worker_id: str, specs: Sequence[ClaimSpec], limit: int, lease_s: float
    ) -> list[TaskRecord]:
        if limit <= 0 or not specs:
            return []
        by_type = {s.type: s for s in specs}
        limited = [s.type for s in specs if s.concurrency_per_owner is not None]
        window = limit * 4 + 32 if limited else limit

        async def op(tx: _Tx) -> list[TaskRecord]:
            now = self.clock.now()
            # No seq check here (see below), and none could be made without taking a
            # transaction id, which would make every empty claim a commit to flush.
            rows = await tx.conn.fetch(_CLAIM, list(by_type), now, window)
            running: dict[tuple[str, str], int] = {}
            locked: dict[tuple[str, str], bool] = {}
            claimed: list[TaskRecord] = []
            for row in rows:
                record = to_record(row)
                cap = by_type[record.type].concurrency_per_owner
                key = (record.type, record.owner)
                if cap is not None:
                    if key not in locked:
                        # One claimer per (type, owner) at a time, or two could each see room for one more.
                        locked[key] = bool(
                            await tx.conn.fetchval(
                                "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                                f"{record.type} {record.owner}",  # type names have no spaces
                            )
                        )
                        if locked[key]:
                            running[key] = tx.started.get(key, 0) + await tx.conn.fetchval(
                                "SELECT count(*) FROM errands_tasks WHERE status = 'processing' "
                                "AND type = $1 AND owner = $2",
                                record.type,
                                record.owner,
                            )
                    if not locked[key] or running[key] >= cap:
                        continue
                    running[key] += 1
                    tx.started[key] = tx.started.get(key, 0) + 1
                change = start_attempt(
                    record,
                    now=now,
                    worker_id=worker_id,
                    lease_token=secrets.token_hex(12),
                    lease_s=lease_s,
                    callback_nonce=secrets.token_urlsafe(12),
                )
                claimed.append(tx.write(change))
                if len(claimed) >= limit:
                    break
            return claimed

        # First in its transaction: it gets the transaction's id as it locks the rows it claims,
        # so every task it can see was last written by an older transaction (and a pending task
        # changed since by another one is no longer pending, so it is not claimed). After other
        # changes the transaction would have its id already, and could claim a task created
        # since by a younger one (whose task.created would then come after this
        # task.processing). Changes after it in the batch check what they lock, as always.
        return await self._write(op, mode="first")

    async def renew(self, leases: Mapping[str, str], lease_s: float) -> set[str]:
        if not leases:
            return set()
        rows = await self._fetch(
            "UPDATE errands_tasks t SET lease_expires_at = $1 FROM unnest($2::text[], $3::text[]) AS l(id, token) "
            "WHERE t.id = l.id AND t.status = 'processing' AND t.lease_token = l.token RETURNING t.id",
            self.clock.now() + lease_s,
            list(leases),
            list(leases.values()),
        )
        return set(leases) - {r[0] for r in rows}

    async def next_ready_at(self, types: Sequence[str], *, after: float) -> float | None:
        if not types:
            return None
        rows = await self._fetch(
            "SELECT min(run_after) FROM errands_tasks WHERE status = 'pending' AND run_after > created_at "
            "AND run_after > $2 AND type = ANY($1::text[])",
            list(types),
            after,
        )
        return rows[0][0] if rows else None

    # -- external providers -------------------------------------------------------------------

    async def find_external(self, types: Sequence[str], external_id: str) -> TaskRecord | None:
        rows = await self._fetch(
            f"SELECT {SELECT_LIST} FROM errands_tasks WHERE external_id = $1 AND type = ANY($2::text[]) "
            "ORDER BY created_at DESC LIMIT 1",
            external_id,
            list(types),
        )
        return to_record(rows[0]) if rows else None

    async def set_poll_at(self, task_id: str, when: float) -> None:
        await self._fetch(
            "UPDATE errands_tasks SET poll_at = $1 WHERE id = $2 AND status = 'processing' AND poll_at IS NOT NULL",
            when,
            task_id,
        )

    async def apply_webhook(
        self, delivery: Delivery, decide: Decision, *, job: tuple[Sequence[str], str] | None = None
    ) -> tuple[str, TaskRecord | None]:
        async def op(tx: _Tx) -> tuple[str, TaskRecord | None]:
            # One round trip: remember the delivery id, find the task, lock it (NOWAIT).
            key: list[Any]
            if job is None:
                where, key = "id = $4", [delivery.task_id or ""]
            else:
                where, key = "external_id = $4 AND type = ANY($5::text[])", [job[1], list(job[0])]
            row = await tx.conn.fetchrow(
                "WITH seen AS (INSERT INTO errands_webhook_ids (provider, delivery_id, received_at) "
                "SELECT $1, $2, $3 WHERE $2::text IS NOT NULL ON CONFLICT DO NOTHING RETURNING 1) "
                f"SELECT (SELECT count(*) FROM seen) AS fresh, {SELECT_LIST}, {_BASE} FROM errands_tasks "
                f"WHERE {where} ORDER BY created_at DESC LIMIT 1 FOR UPDATE NOWAIT",
                delivery.provider,
                delivery.delivery_id,
                delivery.received_at,
                *key,
            )
            if row is None:
                tx.deliveries.append(dataclasses.replace(delivery, outcome="unknown_task", status_code=404))
                return "unknown_task", None
            record = to_record(_older(list(row)[1:]))
            delivered = dataclasses.replace(delivery, task_id=record.id)
            if delivery.delivery_id is not None and row[0] == 0:
                tx.deliveries.append(dataclasses.replace(delivered, outcome="duplicate"))
                return "duplicate", None
            tx.overlay.setdefault(record.id, record)
            try:
                change = decide(tx.overlay[record.id])
            except (InvalidTransition, LeaseLost):
                tx.deliveries.append(dataclasses.replace(delivered, outcome="late"))
                return "late", None
            outcome = "unchanged" if change is None else "applied"
            written = tx.overlay[record.id] if change is None else tx.write(change)
            tx.deliveries.append(dataclasses.replace(delivered, outcome=outcome))
            return outcome, written

        return await self._write(op)

    async def record_delivery(self, delivery: Delivery) -> None:
        async def op(tx: _Tx) -> None:
            tx.deliveries.append(delivery)

        await self._write(op, mode="alone")

    async def deliveries(self, *, task_id: str | None, limit: int) -> list[Delivery]:
        columns = "provider, delivery_id, task_id, outcome, status_code, received_at, detail"
        if task_id is None:
            rows = await self._fetch(
                f"SELECT {columns} FROM errands_webhook_deliveries ORDER BY id DESC LIMIT $1", limit
            )
        else:
            rows = await self._fetch(
                f"SELECT {columns} FROM errands_webhook_deliveries WHERE task_id = $1 ORDER BY id DESC LIMIT $2",
                task_id,
                limit,
            )
        return [Delivery(*r) for r in rows]

    # -- the event log ------------------------------------------------------------------------

    async def events(self, task_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            task_id,
            after,
            limit,
        )
        return [_to_event(r) for r in rows]

    async def events_since(self, after: int, *, limit: int = 1000, snapshots: bool = True) -> list[Event]:
        rows = await self._fetch(_EVENTS_SINCE if snapshots else _HEADERS_SINCE, after, limit)
        # Events above the safe bound wait for older transactions: come back for them soon.
        self.behind = bool(rows[0][8])
        return [] if rows[0][0] is None else [_to_event(r) for r in rows]

    async def last_seq(self) -> int:
        rows = await self._fetch(f"SELECT {_SAFE} - 1")
        return int(rows[0][0])

    async def owner_events(self, owner: str | None, *, after: int, until: int, limit: int) -> list[Event]:
        if owner is None:
            rows = await self._fetch(
                f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                after,
                until,
                limit,
            )
        else:
            rows = await self._fetch(
                f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE owner = $1 AND seq > $2 AND seq <= $3 "
                "ORDER BY seq LIMIT $4",
                owner,
                after,
                until,
                limit,
            )
        return [_to_event(r) for r in rows]

    async def horizon(self) -> int:
        rows = await self._fetch("SELECT value FROM errands_meta WHERE key = 'horizon'")
        return int(rows[0][0]) if rows else 0

    # -- sweeping -----------------------------------------------------------------------------

    async def due(self, *, now: float, limit: int) -> DueTasks:
        leases = await self._fetch(
            "SELECT id FROM errands_tasks WHERE status = 'processing' AND lease_token IS NOT NULL "
            "AND lease_expires_at < $1 LIMIT $2",
            now,
            limit,
        )
        deadlines = await self._fetch(
            "SELECT id FROM errands_tasks WHERE status = 'processing' AND deadline_at < $1 LIMIT $2",
            now,
            limit,
        )
        polls = await self._fetch(
            "SELECT id FROM errands_tasks WHERE status = 'processing' AND poll_at IS NOT NULL AND poll_at <= $1 LIMIT $2",
            now,
            limit,
        )
        expired = await self._fetch(
            "SELECT id FROM errands_tasks WHERE status IN ('pending', 'processing') AND expires_at < $1 LIMIT $2",
            now,
            limit,
        )
        return DueTasks(
            [r[0] for r in leases], [r[0] for r in deadlines], [r[0] for r in expired], [r[0] for r in polls]
        )

    async def purge(self, *, finished_before: float, tombstones_before: float, limit: int) -> int:
        now = self.clock.now()

        async def op(tx: _Tx) -> int:
            rows = await tx.conn.fetch(
                "DELETE FROM errands_tasks WHERE id IN (SELECT id FROM errands_tasks WHERE finished_at IS NOT NULL "
                "AND finished_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, owner",
                finished_before,
                limit,
            )
            if rows:
                ids = [r[0] for r in rows]
                top = await tx.conn.fetchval(
                    "WITH gone AS (DELETE FROM errands_events WHERE task_id = ANY($1::text[]) RETURNING seq) "
                    "SELECT max(seq) FROM gone",
                    ids,
                )
                if top is not None:
                    await tx.conn.execute(
                        "UPDATE errands_meta SET value = GREATEST(value::bigint, $1)::text WHERE key = 'horizon'",
                        top,
                    )
                await tx.conn.execute(
                    "INSERT INTO errands_tombstones (id, owner, purged_at) SELECT i, o, $3 "
                    "FROM unnest($1::text[], $2::text[]) AS t(i, o) ON CONFLICT (id) DO UPDATE SET purged_at = $3",
                    ids,
                    [r[1] for r in rows],
                    now,
                )
            await tx.conn.execute("DELETE FROM errands_tombstones WHERE purged_at < $1", tombstones_before)
            await tx.conn.execute("DELETE FROM errands_webhook_ids WHERE received_at < $1", finished_before)
            await tx.conn.execute(
                "DELETE FROM errands_webhook_deliveries WHERE received_at < $1", finished_before
            )
            await tx.conn.execute(
                "DELETE FROM errands_messages WHERE state != 'pending' AND updated_at < $1", finished_before
            )
            await tx.conn.execute(
                "DELETE FROM errands_message_attempts WHERE attempted_at < $1", finished_before
            )
            return len(rows)

        return await self._write(op)

    async def stats(self, *, since: float, sample: int) -> StatsRows:
        counts = await self._fetch("SELECT status, type, count(*) FROM errands_tasks GROUP BY status, type")
        waits = await self._fetch(
            "SELECT started_at - queued_at FROM errands_tasks WHERE started_at >= $1 ORDER BY started_at DESC LIMIT $2",
            since,
            sample,
        )
        runs = await self._fetch(
            "SELECT finished_at - started_at FROM errands_tasks WHERE finished_at IS NOT NULL AND finished_at >= $1 "
            "AND started_at IS NOT NULL AND status != 'cancelled' ORDER BY finished_at DESC LIMIT $2",
            since,
            sample,
        )
        return StatsRows(
            counts=[(r[0], r[1], int(r[2])) for r in counts],
            waits_s=[max(0.0, r[0]) for r in waits],
            runs_s=[max(0.0, r[0]) for r in runs],
        )

    # -- notifications ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """A transaction of its own, outside the writer: for changes that touch no task."""
        if self._pool is None:
            raise StoreError("The store is closed.")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise StoreError("The database could not save the change.") from exc

    async def create_endpoint(self, endpoint: Endpoint) -> None:
        marks = ", ".join(f"${i}" for i in range(1, 16))
        async with self._transaction() as conn:
            await conn.execute(
                f"INSERT INTO errands_endpoints ({ENDPOINT_COLUMNS}) VALUES ({marks})",
                *endpoint_values(endpoint),
            )

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        rows = await self._fetch(
            f"SELECT {ENDPOINT_COLUMNS} FROM errands_endpoints WHERE id = $1", endpoint_id
        )
        return to_endpoint(rows[0]) if rows else None

    async def list_endpoints(self) -> list[Endpoint]:
        rows = await self._fetch(f"SELECT {ENDPOINT_COLUMNS} FROM errands_endpoints ORDER BY id")
        return [to_endpoint(r) for r in rows]

    async def update_endpoint(self, endpoint_id: str, change: Callable[[Endpoint], Endpoint]) -> Endpoint:
        columns = ENDPOINT_COLUMNS.split(", ")
        assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns[1:], start=2))
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"SELECT {ENDPOINT_COLUMNS} FROM errands_endpoints WHERE id = $1 FOR UPDATE", endpoint_id
            )
            if row is None:
                raise NotFound("No such endpoint.")
            old = to_endpoint(row)
            new = change(old)
            await conn.execute(
                f"UPDATE errands_endpoints SET {assignments} WHERE id = $1",
                endpoint_id,
                *endpoint_values(new)[1:],
            )
            if old.enabled and not new.enabled:
                await _fail_pending(conn, endpoint_id, "the endpoint was disabled", new.updated_at)
            return new

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        async with self._transaction() as conn:
            gone = await conn.fetchval("DELETE FROM errands_endpoints WHERE id = $1 RETURNING 1", endpoint_id)
            if gone is None:
                return False
            await _fail_pending(conn, endpoint_id, "the endpoint was deleted", self.clock.now())
            return True

    async def notify_cursor(self) -> int:
        rows = await self._fetch("SELECT value FROM errands_meta WHERE key = 'notify_cursor'")
        return int(rows[0][0]) if rows else 0

    async def notify_urls_after(self, seq: int) -> bool:
        rows = await self._fetch(
            "SELECT 1 FROM errands_tasks WHERE notify_url IS NOT NULL AND seq > $1 LIMIT 1", seq
        )
        return bool(rows)

    async def add_messages(self, after: int, upto: int, messages: Sequence[Message]) -> bool:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO errands_meta (key, value) VALUES ('notify_cursor', '0') ON CONFLICT DO NOTHING"
            )
            moved = await conn.fetchval(
                "UPDATE errands_meta SET value = $1 WHERE key = 'notify_cursor' AND value = $2 RETURNING 1",
                str(upto),
                str(after),
            )
            if moved is None:
                return False
            if messages:
                rows = [message_values(m) for m in messages]
                await conn.execute(
                    f"INSERT INTO errands_messages ({MESSAGE_COLUMNS}) SELECT * FROM unnest({_MESSAGE_ARRAYS}) "
                    "ON CONFLICT DO NOTHING",
                    *([row[i] for row in rows] for i in range(len(_MESSAGE_TYPES))),
                )
            return True

    async def claim_messages(
        self, *, now: float, limit: int, lease_s: float, channels: Sequence[str], hooks: Sequence[str]
    ) -> list[tuple[Message, Endpoint | None]]:
        if limit <= 0 or not (channels or hooks):
            return []
        m_columns = ", ".join(f"m.{c}" for c in MESSAGE_COLUMNS.split(", "))
        async with self._transaction() as conn:
            rows = await conn.fetch(
                "WITH due AS (SELECT m.id FROM errands_messages m "
                "LEFT JOIN errands_endpoints e ON m.channel = 'endpoint' AND e.id = m.target "
                "WHERE m.state = 'pending' AND m.next_at <= $1 "
                "AND (m.channel = ANY($3::text[]) OR (m.channel = 'hook' AND m.target = ANY($4::text[]))) "
                "AND (m.channel != 'endpoint' OR (e.enabled AND coalesce(e.throttled_until, 0) <= $1)) "
                "AND NOT EXISTS (SELECT 1 FROM errands_messages p WHERE p.state = 'pending' "
                "AND p.task_id = m.task_id AND p.channel = m.channel AND p.target = m.target AND p.seq < m.seq) "
                "ORDER BY m.next_at LIMIT $2 FOR UPDATE OF m SKIP LOCKED) "
                "UPDATE errands_messages m SET attempts = m.attempts + 1, next_at = $1 + $5, updated_at = $1, "
                "lease_token = md5(random()::text || clock_timestamp()::text || m.id) "
                f"FROM due WHERE m.id = due.id RETURNING {m_columns}",
                now,
                limit,
                list(channels),
                list(hooks),
                lease_s,
            )
            messages = [to_message(r) for r in rows]
            ids = sorted({m.target for m in messages if m.channel == "endpoint"})
            endpoints = {}
            if ids:
                found = await conn.fetch(
                    f"SELECT {ENDPOINT_COLUMNS} FROM errands_endpoints WHERE id = ANY($1::text[])", ids
                )
                endpoints = {e.id: e for e in map(to_endpoint, found)}
        messages.sort(key=lambda m: m.next_at)
        return [(m, endpoints.get(m.target) if m.channel == "endpoint" else None) for m in messages]

    async def finish_message(self, result: AttemptResult) -> None:
        attempt = result.attempt
        now = attempt.attempted_at

        async def op(tx: _Tx) -> None:
            found = await tx.conn.fetchrow(
                "SELECT task_id, seq, final FROM errands_messages WHERE id = $1", attempt.message_id
            )
            if found is None:
                return
            task_id, seq, final = found
            ends = result.state == "delivered" and final and attempt.channel != "hook"
            if ends:
                # Lock the task first: two last messages finishing at once must not both see the
                # other still pending (a locked row makes this transaction retry, younger).
                await tx.load(task_id)
            await tx.conn.execute(
                f"INSERT INTO errands_message_attempts ({ATTEMPT_COLUMNS}) VALUES "
                f"({', '.join(f'${i}' for i in range(1, 12))})",
                *attempt_values(attempt),
            )
            moved = await tx.conn.fetchval(
                "UPDATE errands_messages SET state = $1, next_at = $2, last_status = $3, last_error = $4, "
                "updated_at = $5, lease_token = NULL WHERE id = $6 AND lease_token = $7 RETURNING 1",
                result.state,
                result.next_at,
                attempt.status_code,
                attempt.error,
                now,
                attempt.message_id,
                result.lease_token,
            )
            if moved is None:
                return  # the lease ran out and another sender took over: only the log keeps this
            if attempt.channel == "endpoint" and result.endpoint_ok is not None:
                await _endpoint_outcome(tx.conn, attempt.target, result, now)
            if ends:
                left = await tx.conn.fetchval(
                    "SELECT count(*) FROM errands_messages WHERE task_id = $1 AND seq = $2 AND final "
                    "AND channel != 'hook' AND state != 'delivered'",
                    task_id,
                    seq,
                )
                if left == 0:
                    with contextlib.suppress(NotFound):
                        await tx.apply(task_id, lambda r: mark_notified(r, now=now, seq=seq))

        await self._write(op)

    async def next_message_at(self, *, channels: Sequence[str], hooks: Sequence[str]) -> float | None:
        if not (channels or hooks):
            return None
        rows = await self._fetch(
            "SELECT min(next_at) FROM errands_messages WHERE state = 'pending' "
            "AND (channel = ANY($1::text[]) OR (channel = 'hook' AND target = ANY($2::text[])))",
            list(channels),
            list(hooks),
        )
        return rows[0][0] if rows else None

    async def get_message(self, message_id: str) -> Message | None:
        rows = await self._fetch(f"SELECT {MESSAGE_COLUMNS} FROM errands_messages WHERE id = $1", message_id)
        return to_message(rows[0]) if rows else None

    async def list_messages(self, query: MessageQuery) -> list[Message]:
        rows = await self._fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM errands_messages WHERE ($1::text IS NULL OR task_id = $1) "
            "AND ($2::text IS NULL OR target = $2) AND ($3::text IS NULL OR state = $3) "
            "ORDER BY created_at DESC, id DESC LIMIT $4",
            query.task_id,
            query.endpoint_id,
            query.state,
            query.limit,
        )
        return [to_message(r) for r in rows]

    async def attempts(
        self,
        *,
        target: str | None = None,
        message_id: str | None = None,
        succeeded: bool | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Attempt]:
        rows = await self._fetch(
            f"SELECT {ATTEMPT_COLUMNS}, id FROM errands_message_attempts WHERE ($1::text IS NULL OR target = $1) "
            "AND ($2::text IS NULL OR message_id = $2) AND ($3::bool IS NULL OR succeeded = $3) "
            "AND ($4::int8 IS NULL OR id < $4) ORDER BY id DESC LIMIT $5",
            target,
            message_id,
            succeeded,
            before,
            limit,
        )
        return [to_attempt(r) for r in rows]

    async def resend_message(self, message_id: str, *, now: float) -> Message:
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE errands_messages SET state = 'pending', attempts = 0, next_at = $1, lease_token = NULL, "
                f"updated_at = $1 WHERE id = $2 RETURNING {MESSAGE_COLUMNS}",
                now,
                message_id,
            )
        if row is None:
            raise NotFound("No such message.")
        return to_message(row)

    async def recover_endpoint(self, endpoint_id: str, *, since: float, now: float) -> int:
        async with self._transaction() as conn:
            rows = await conn.fetch(
                "UPDATE errands_messages SET state = 'pending', attempts = 0, next_at = $1, lease_token = NULL, "
                "updated_at = $1 WHERE channel = 'endpoint' AND target = $2 AND state = 'failed' "
                "AND created_at >= $3 RETURNING 1",
                now,
                endpoint_id,
                since,
            )
        return len(rows)

    # -- service state ------------------------------------------------------------------------

    async def meta_setdefault(self, key: str, value: str) -> str:
        rows = await self._fetch(META_SETDEFAULT, key, value)
        return str(rows[0][0])

    async def add_admin_key(self, key_hash: str) -> None:
        await self._fetch(
            "INSERT INTO errands_admin_keys (hash, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            key_hash,
            self.clock.now(),
        )

    async def admin_key_hashes(self) -> set[str]:
        return {r[0] for r in await self._fetch("SELECT hash FROM errands_admin_keys")}


async def _insert_deliveries(conn: PoolConnectionProxy[asyncpg.Record], rows: Sequence[Delivery]) -> None:
    await conn.execute(
        "INSERT INTO errands_webhook_deliveries (provider, delivery_id, task_id, outcome, status_code, received_at, "
        "detail) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::float8[], "
        "$7::text[])",
        [d.provider for d in rows],
        [d.delivery_id for d in rows],
        [d.task_id for d in rows],
        [d.outcome for d in rows],
        [d.status_code for d in rows],
        [d.received_at for d in rows],
        [d.detail for d in rows],
    )


async def _fail_pending(
    conn: PoolConnectionProxy[asyncpg.Record], endpoint_id: str, why: str, now: float
) -> None:
    await conn.execute(
        "UPDATE errands_messages SET state = 'failed', last_error = $1, lease_token = NULL, updated_at = $2 "
        "WHERE channel = 'endpoint' AND target = $3 AND state = 'pending'",
        why,
        now,
        endpoint_id,
    )


async def _endpoint_outcome(
    conn: PoolConnectionProxy[asyncpg.Record], endpoint_id: str, result: AttemptResult, now: float
) -> None:
    """An endpoint's health after an attempt: failing since when, throttled until when, disabled."""
    disabled = await conn.fetchval(
        "UPDATE errands_endpoints SET "
        "failing_since = CASE WHEN $2 THEN NULL ELSE coalesce(failing_since, $3) END, "
        "throttled_until = CASE WHEN $4::float8 IS NULL THEN throttled_until "
        "ELSE greatest(coalesce(throttled_until, 0), $4) END, "
        "enabled = enabled AND $5::text IS NULL, "
        "disabled_reason = CASE WHEN enabled AND $5::text IS NOT NULL THEN $5 ELSE disabled_reason END, "
        "updated_at = CASE WHEN enabled AND $5::text IS NOT NULL THEN $3 ELSE updated_at END "
        "WHERE id = $1 RETURNING (disabled_reason = $5)",
        endpoint_id,
        bool(result.endpoint_ok),
        now,
        result.throttled_until,
        result.disable_reason,
    )
    if disabled:
        await _fail_pending(conn, endpoint_id, "the endpoint was disabled", now)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset between uses of a pooled connection: errands leaves no session state on them
    (no LISTEN, no session locks, no cursors), and asyncpg's reset costs a round trip each time."""


def _to_event(row: Any) -> Event:
    """An event from the log; its snapshot was written before its seq was known."""
    return Event(
        seq=row[0],
        type=EventType(row[1]),
        at=row[2],
        task_id=row[3],
        owner=row[4],
        task_type=row[5],
        status=Status(row[6]),
        task_json=b"" if row[7] is None else with_seq(bytes(row[7]), row[0]),
    )


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, credentials = head.partition("://")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{tail}"
