"""The embedded store: one SQLite file in WAL mode.

SQLite has one writer, so this store has one write path: a coroutine that owns the write
connection, takes every change from a queue and commits whatever queued up in one transaction
(group commit), each change in its own savepoint so one refused change never undoes another.
Futures resolve only after the commit (durable before acknowledged), right after the batch's
events were handed to the commit listeners.

Everything runs on the event loop's thread: a thread hop per change costs more than the SQLite
calls themselves (and, under the GIL, up to a switch interval). The slow parts stay off the loop:
waiting for another process's write lock is an async retry, and checkpoints run in a thread.

Reads use a second connection: in WAL mode they never wait for the writer and each statement
sees a committed snapshot. Several processes may share one file; the write lock serialises them
and ``seq`` is taken under it, so the log's order is the commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import sqlite3
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from errands.clock import Clock
from errands.errors import (
    ConfigError,
    IdConflict,
    InvalidTransition,
    LeaseLost,
    NotFound,
    StoreError,
    TooManyRequests,
)
from errands.model import Change, Event, EventType, TaskRecord, mark_notified, start_attempt
from errands.store.base import (
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
    SELECT_LIST,
    attempt_values,
    changed_columns,
    endpoint_values,
    message_values,
    new_record,
    to_attempt,
    to_endpoint,
    to_event,
    to_message,
    to_record,
    values,
)

log = logging.getLogger("errands.store")

T = TypeVar("T")

_INSERT_NEW_TASK = (
    f"INSERT INTO tasks ({SELECT_LIST}) SELECT {', '.join('?' * len(COLUMNS))} "
    "WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE id = ?) ON CONFLICT (id) DO NOTHING"
)
_UPDATES: dict[tuple[str, ...], str] = {}
_INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT_TASK = f"SELECT {SELECT_LIST} FROM tasks WHERE id = ?"
#: The seq of the latest event ever written. Events are only deleted by a purge, which first
#: raises the horizon to the highest seq it deletes, so the newest event left or the horizon
#: holds it; no counter is written per commit (it would cost one more page per commit). The
#: 'seq' counter that errands 0.1.0 wrote per commit stays a floor, for databases it wrote.
_LAST_SEQ = (
    "SELECT max(coalesce((SELECT max(seq) FROM events), 0), "
    "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'horizon'), "
    "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'seq'))"
)
_MAX_BATCH = 512
_CHECKPOINT_EVERY = 200  # commits; the WAL is copied back into the database from a thread
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _statements(script: str) -> list[str]:
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in current.splitlines()
    ):
        raise ConfigError("A migration ends with an incomplete statement.")
    return out


def _set_seq(record: TaskRecord, seq: int) -> None:
    # The record was just made by a decision (or for an insert) and nobody else holds it yet, so
    # setting its seq in place is safe and saves a copy per change.
    object.__setattr__(record, "seq", seq)


class _Tx:
    """The write transaction a batch runs in, as seen by one change."""

    def __init__(self, conn: sqlite3.Connection, seq: int) -> None:
        self.conn = conn
        self.seq = seq
        self.events: list[Event] = []

    def mark(self) -> tuple[int, int]:
        return self.seq, len(self.events)

    def reset(self, mark: tuple[int, int]) -> None:
        self.seq = mark[0]
        del self.events[mark[1] :]

    def load(self, task_id: str) -> TaskRecord | None:
        row = self.conn.execute(_SELECT_TASK, (task_id,)).fetchone()
        return None if row is None else to_record(row)

    def insert(self, record: TaskRecord) -> bool:
        """Insert a new task with its event; ``False`` (and nothing written) if its id is taken,
        or was taken by a task since purged. One statement for the common case of a new id."""
        _set_seq(record, self.seq + 1)
        if self.conn.execute(_INSERT_NEW_TASK, [*values(record), record.id]).rowcount == 0:
            return False
        self.seq += 1
        self._event(record, EventType.CREATED)
        return True

    def write(self, change: Change, before: TaskRecord) -> TaskRecord:
        """Write a decided change of ``before`` (the row as read in this transaction): only
        the columns it changed, so indexes on the others are left alone."""
        self.seq += 1
        record = change.record
        _set_seq(record, self.seq)
        columns = changed_columns(before, record)
        sql = _UPDATES.get(columns)
        if sql is None:
            sql = _UPDATES[columns] = (
                f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?"
            )
        self.conn.execute(sql, [*values(record, columns), record.id])
        self._event(record, change.event)
        return record

    def _event(self, record: TaskRecord, kind: EventType) -> None:
        task_json = record.public_json()
        self.conn.execute(
            _INSERT_EVENT,
            (record.seq, kind.value, record.updated_at, record.id, record.owner, record.type,
             record.status.value, task_json),
        )  # fmt: skip
        self.events.append(
            Event(record.seq, kind, record.updated_at, record.id, record.owner, record.type,
                  record.status, task_json)
        )  # fmt: skip

    def apply(self, task_id: str, decide: Decision) -> TaskRecord:
        current = self.load(task_id)
        if current is None:
            raise NotFound()
        change = decide(current)
        return current if change is None else self.write(change, current)


_Job = tuple[Callable[[_Tx], Any], "asyncio.Future[Any]"]


class _Writer:
    """The one write path; see the module docstring.

    Changes queued during one turn of the event loop are committed together by the next turn
    (group commit). The batch runs synchronously on the loop: SQLite calls take microseconds and
    in WAL mode a commit only appends to the log. Waiting for another process's write lock, the
    one slow thing, is done asynchronously (``BEGIN IMMEDIATE`` without a busy timeout, retried
    with backoff) so the loop never blocks on it; checkpoints (the fsyncs) run in a thread.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        on_commit: Callable[[Sequence[Event]], None],
        *,
        lock_timeout_s: float,
        checkpoint: Callable[[], None],
    ) -> None:
        self._conn = conn
        self._on_commit = on_commit
        self._lock_timeout_s = lock_timeout_s
        self._checkpoint = checkpoint
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._commits_since_checkpoint = 0
        self._checkpointing: asyncio.Task[None] | None = None
        self._task = self._loop.create_task(self._run(), name="errands-sqlite-writer")

    def alive(self) -> bool:
        return not self._task.done()

    def submit(self, fn: Callable[[_Tx], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self._loop.create_future()
        if self._task.done():
            future.set_exception(StoreError("The store is closed."))
        else:
            self._queue.append((fn, future))
            self._drained.clear()
            self._wake.set()
        return future

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        self._wake.set()
        if self._queue and not self._task.done():
            await self._drained.wait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._checkpointing is not None:
            await self._checkpointing
        for _, future in self._queue:
            if not future.done():
                future.set_exception(StoreError("The store is closed."))
        self._queue.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(_MAX_BATCH, len(self._queue)))]
                try:
                    await self._begin()
                except StoreError as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self._run_batch(batch)
            self._drained.set()

    async def _begin(self) -> None:
        delay, waited = 0.0005, 0.0
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreError("The database could not save the change.") from exc
                if waited >= self._lock_timeout_s:
                    raise StoreError("The database stayed locked by another process.") from exc
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.02)

    def _run_batch(self, batch: list[_Job]) -> None:
        conn = self._conn
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        events: list[Event] = []
        try:
            (seq,) = conn.execute(_LAST_SEQ).fetchone()
            tx = _Tx(conn, seq)
            # Each change of a batch runs in a savepoint, so a refused one undoes only itself;
            # a change alone in its batch needs none (the whole transaction is its savepoint).
            alone = len(batch) == 1
            for fn, future in batch:
                mark = tx.mark()
                if not alone:
                    conn.execute("SAVEPOINT change")
                try:
                    result = fn(tx)
                except Exception as exc:
                    conn.execute("ROLLBACK" if alone else "ROLLBACK TO change")
                    if not alone:
                        conn.execute("RELEASE change")
                    tx.reset(mark)
                    results.append((future, None, _translate(exc)))
                else:
                    if not alone:
                        conn.execute("RELEASE change")
                    results.append((future, result, None))
            if conn.in_transaction:
                conn.execute("COMMIT")
                events = tx.events
        except sqlite3.Error as exc:
            log.error("sqlite write failed: %s", exc)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            failure = StoreError("The database could not save the change.")
            failure.__cause__ = exc
            results = [(future, None, failure) for _, future in batch]
        if events:
            try:
                self._on_commit(events)
            except Exception:
                log.exception("a commit listener failed")
            self._commits_since_checkpoint += 1
            if self._commits_since_checkpoint >= _CHECKPOINT_EVERY and self._checkpointing is None:
                self._commits_since_checkpoint = 0
                self._checkpointing = asyncio.get_running_loop().create_task(self._run_checkpoint())
        for future, result, error in results:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    async def _run_checkpoint(self) -> None:
        try:
            await asyncio.to_thread(self._checkpoint)
        except sqlite3.Error as exc:
            log.warning("sqlite checkpoint failed: %s", exc)
        finally:
            self._checkpointing = None


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        error = StoreError("The database could not save the change.")
        error.__cause__ = exc
        return error
    return exc


class SqliteStore(Store):
    """A :class:`Store` on one SQLite file (see the module docstring)."""

    dialect = "sqlite"
    #: Other processes sharing the file are only seen by reading the log, so read it often.
    log_poll_s = 0.05

    def __init__(
        self, path: str, clock: Clock, *, synchronous: str = "NORMAL", busy_timeout_s: float = 10.0
    ) -> None:
        super().__init__(clock)
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigError(f"ERRANDS_SQLITE_SYNCHRONOUS must be one of {', '.join(_SYNCHRONOUS)}.")
        self.path = path
        self._synchronous = synchronous.upper()
        self._busy_timeout_s = busy_timeout_s
        self._reader: sqlite3.Connection | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._writer: _Writer | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def _connect(self, *, busy_timeout_s: float | None = None) -> sqlite3.Connection:
        timeout = self._busy_timeout_s if busy_timeout_s is None else busy_timeout_s
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=timeout, check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"The SQLite database at {self.path} cannot use WAL mode.")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA cache_size = -65536")
        except sqlite3.Error as exc:
            raise ConfigError(f"Cannot open the SQLite database at {self.path}: {exc}.") from exc
        return conn

    def _checkpoint(self) -> None:
        """Copy the WAL back into the database file (runs in a thread: this is where fsyncs are)."""
        if self._checkpointer is None:
            self._checkpointer = self._connect()
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def open(self, *, migrate: bool = True) -> None:
        self._reader = await asyncio.to_thread(self._connect)
        if migrate:
            await self.migrate()
        elif await self._pending_migrations():
            raise ConfigError("The database schema is not up to date; run `errands migrate`.")
        # No busy timeout on the write connection: the writer waits for the lock asynchronously.
        conn = await asyncio.to_thread(self._connect, busy_timeout_s=0)
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._writer = _Writer(
            conn, self._committed, lock_timeout_s=self._busy_timeout_s, checkpoint=self._checkpoint
        )
        self._writer_conn = conn

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        for conn in (self._writer_conn, self._reader, self._checkpointer):
            if conn is not None:
                conn.close()
        self._writer_conn = self._reader = self._checkpointer = None

    async def migrate(self) -> list[int]:
        return await asyncio.to_thread(self._migrate_sync)

    async def _pending_migrations(self) -> list[int]:
        applied = set()
        with contextlib.suppress(sqlite3.Error):
            applied = {r[0] for r in self._read("SELECT version FROM schema_migrations")}
        return [v for v, _, _ in migrations("sqlite") if v not in applied]

    def _migrate_sync(self) -> list[int]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            known = migrations("sqlite")
            if not applied:  # a new database gets the current schema in one go
                todo = known
                for statement in _statements(fresh_schema("sqlite")):
                    conn.execute(statement)
            else:
                todo = [m for m in known if m[0] not in applied]
                for _, _, sql in todo:
                    for statement in _statements(sql):
                        conn.execute(statement)
            done = []
            for version, name, _ in todo:
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, self.clock.now()),
                )
                done.append(version)
            conn.execute("COMMIT")
            return done
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"Migrating the SQLite database failed: {exc}.") from exc
        finally:
            conn.close()

    async def ping(self) -> None:
        if self._writer is None or not self._writer.alive():
            raise StoreError("The SQLite writer is not running.")
        self._read("SELECT 1")

    # -- plumbing -----------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader is None:
            raise StoreError("The store is closed.")
        try:
            return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError("The database could not be read.") from exc

    async def _write(self, fn: Callable[[_Tx], T]) -> T:
        if self._writer is None:
            raise StoreError("The store is closed.")
        return await self._writer.submit(fn)

    # -- tasks --------------------------------------------------------------------------------

    async def create(
        self, new: NewTask, *, max_pending_per_owner: int | None = None
    ) -> tuple[TaskRecord, bool]:
        now = self.clock.now()

        def same_request(existing: TaskRecord) -> tuple[TaskRecord, bool]:
            if existing.fingerprint != new.fingerprint:
                raise IdConflict()
            return existing, False

        def op(tx: _Tx) -> tuple[TaskRecord, bool]:
            if max_pending_per_owner is not None:
                # A repeated request is answered before the limit is checked: it adds nothing.
                existing = tx.load(new.id)
                if existing is not None:
                    return same_request(existing)
                (pending,) = tx.conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE owner = ? AND status = 'pending' "
                    "LIMIT ?)",
                    (new.owner, max_pending_per_owner),
                ).fetchone()
                if pending >= max_pending_per_owner:
                    raise TooManyRequests(
                        f"The owner already has {pending} pending tasks, the most allowed.",
                        code="too_many_pending",
                        retry_after_s=5,
                    )
            record = new_record(new, now)
            if tx.insert(record):
                return record, True
            existing = tx.load(new.id)
            if existing is None:
                raise IdConflict("This id belonged to a task that has been purged.")
            return same_request(existing)

        return await self._write(op)

    async def get(self, task_id: str) -> TaskRecord | Tombstone | None:
        rows = self._read(_SELECT_TASK, (task_id,))
        if rows:
            return to_record(rows[0])
        rows = self._read("SELECT id, owner, purged_at FROM tombstones WHERE id = ?", (task_id,))
        return Tombstone(*rows[0]) if rows else None

    async def list_tasks(self, query: TaskQuery) -> list[TaskRecord]:
        where, params = _list_filter(query)
        sql = f"SELECT {SELECT_LIST} FROM tasks {where} ORDER BY created_at DESC, id DESC LIMIT ?"
        return [to_record(r) for r in self._read(sql, [*params, query.limit])]

    async def apply(self, task_id: str, decide: Decision) -> TaskRecord:
        return await self._write(lambda tx: tx.apply(task_id, decide))

    async def apply_many(self, decisions: Sequence[tuple[str, Decision]]) -> list[Outcome]:
        def op(tx: _Tx) -> list[Outcome]:
            outcomes = []
            for task_id, decide in decisions:
                mark = tx.mark()
                tx.conn.execute("SAVEPOINT item")
                try:
                    record = tx.apply(task_id, decide)
                except Exception as exc:
                    tx.conn.execute("ROLLBACK TO item")
                    tx.reset(mark)
                    outcomes.append(Outcome(None, _translate(exc)))
                else:
                    outcomes.append(Outcome(record, None))
                tx.conn.execute("RELEASE item")
            return outcomes

        return await self._write(op)

    async def claim(
        self, *, worker_id: str, specs: Sequence[ClaimSpec], limit: int, lease_s: float
    ) -> list[TaskRecord]:
        if limit <= 0 or not specs:
            return []
        by_type = {s.type: s for s in specs}
        limited = [s.type for s in specs if s.concurrency_per_owner is not None]
        marks = ", ".join("?" * len(by_type))
        # Fair share may skip tasks at the head of the queue, so look further than `limit` then.
        window = limit * 4 + 32 if limited else limit

        def op(tx: _Tx) -> list[TaskRecord]:
            now = self.clock.now()
            rows = tx.conn.execute(
                f"SELECT {SELECT_LIST} FROM tasks WHERE status = 'pending' AND type IN ({marks}) "
                "AND run_after <= ? ORDER BY priority DESC, created_at, id LIMIT ?",
                [*by_type, now, window],
            ).fetchall()
            running: dict[tuple[str, str], int] = {}
            if limited:
                lmarks = ", ".join("?" * len(limited))
                for task_type, owner, n in tx.conn.execute(
                    f"SELECT type, owner, count(*) FROM tasks WHERE status = 'processing' "
                    f"AND type IN ({lmarks}) GROUP BY type, owner",
                    limited,
                ):
                    running[(task_type, owner)] = n
            claimed: list[TaskRecord] = []
            for row in rows:
                record = to_record(row)
                cap = by_type[record.type].concurrency_per_owner
                key = (record.type, record.owner)
                if cap is not None:
                    if running.get(key, 0) >= cap:
                        continue
                    running[key] = running.get(key, 0) + 1
                change = start_attempt(
                    record,
                    now=now,
                    worker_id=worker_id,
                    lease_token=_lease_token(),
                    lease_s=lease_s,
                    callback_nonce=secrets.token_urlsafe(12),
                )
                claimed.append(tx.write(change, record))
                if len(claimed) >= limit:
                    break
            return claimed

        return await self._write(op)

    async def renew(self, leases: Mapping[str, str], lease_s: float) -> set[str]:
        if not leases:
            return set()

        def op(tx: _Tx) -> set[str]:
            until = self.clock.now() + lease_s
            lost = set()
            for task_id, token in leases.items():
                cur = tx.conn.execute(
                    "UPDATE tasks SET lease_expires_at = ? "
                    "WHERE id = ? AND status = 'processing' AND lease_token = ?",
                    (until, task_id, token),
                )
                if cur.rowcount == 0:
                    lost.add(task_id)
            return lost

        return await self._write(op)

    async def next_ready_at(self, types: Sequence[str], *, after: float) -> float | None:
        if not types:
            return None
        marks = ", ".join("?" * len(types))
        rows = self._read(
            "SELECT min(run_after) FROM tasks WHERE status = 'pending' AND run_after > created_at "
            f"AND run_after > ? AND type IN ({marks})",
            [after, *types],
        )
        return rows[0][0] if rows else None

    # -- external providers -------------------------------------------------------------------

    async def find_external(self, types: Sequence[str], external_id: str) -> TaskRecord | None:
        if not types:
            return None
        marks = ", ".join("?" * len(types))
        rows = self._read(
            f"SELECT {SELECT_LIST} FROM tasks WHERE external_id = ? AND type IN ({marks}) "
            "ORDER BY created_at DESC LIMIT 1",
            [external_id, *types],
        )
        return to_record(rows[0]) if rows else None

    async def set_poll_at(self, task_id: str, when: float) -> None:
        def op(tx: _Tx) -> None:
            tx.conn.execute(
                "UPDATE tasks SET poll_at = ? WHERE id = ? AND status = 'processing' AND poll_at IS NOT NULL",
                (when, task_id),
            )

        await self._write(op)

    async def apply_webhook(
        self, delivery: Delivery, decide: Decision, *, job: tuple[Sequence[str], str] | None = None
    ) -> tuple[str, TaskRecord | None]:
        def op(tx: _Tx) -> tuple[str, TaskRecord | None]:
            nonlocal delivery
            if job is not None:
                types, external_id = job
                marks = ", ".join("?" * len(types))
                row = tx.conn.execute(
                    f"SELECT id FROM tasks WHERE external_id = ? AND type IN ({marks}) ORDER BY created_at DESC LIMIT 1",
                    [external_id, *types],
                ).fetchone()
                if row is None:
                    _insert_delivery(
                        tx.conn, dataclasses.replace(delivery, outcome="unknown_task", status_code=404)
                    )
                    return "unknown_task", None
                delivery = dataclasses.replace(delivery, task_id=row[0])
            if delivery.delivery_id is not None:
                seen = tx.conn.execute(
                    "INSERT OR IGNORE INTO webhook_ids (provider, delivery_id, received_at) VALUES (?, ?, ?)",
                    (delivery.provider, delivery.delivery_id, delivery.received_at),
                )
                if seen.rowcount == 0:
                    _insert_delivery(tx.conn, dataclasses.replace(delivery, outcome="duplicate"))
                    return "duplicate", None
            changed = False

            def decide_and_note(record: TaskRecord) -> Change | None:
                nonlocal changed
                change = decide(record)
                changed = change is not None
                return change

            try:
                record: TaskRecord | None = tx.apply(delivery.task_id or "", decide_and_note)
                outcome = "applied" if changed else "unchanged"
            except (InvalidTransition, LeaseLost):
                record, outcome = None, "late"
            except NotFound:
                record, outcome = None, "unknown_task"
            _insert_delivery(tx.conn, dataclasses.replace(delivery, outcome=outcome))
            return outcome, record

        return await self._write(op)

    async def record_delivery(self, delivery: Delivery) -> None:
        await self._write(lambda tx: _insert_delivery(tx.conn, delivery))

    async def deliveries(self, *, task_id: str | None, limit: int) -> list[Delivery]:
        columns = "provider, delivery_id, task_id, outcome, status_code, received_at, detail"
        if task_id is None:
            rows = self._read(f"SELECT {columns} FROM webhook_deliveries ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._read(
                f"SELECT {columns} FROM webhook_deliveries WHERE task_id = ? ORDER BY id DESC LIMIT ?",
                (task_id, limit),
            )
        return [Delivery(*r) for r in rows]

    # -- the event log ------------------------------------------------------------------------

    async def events(self, task_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        rows = self._read(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (task_id, after, limit),
        )
        return [to_event(r) for r in rows]

    async def events_since(self, after: int, *, limit: int = 1000, snapshots: bool = True) -> list[Event]:
        rows = self._read(
            f"SELECT {EVENT_COLUMNS if snapshots else EVENT_HEADERS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [to_event(r) for r in rows]

    async def last_seq(self) -> int:
        return int(self._read(_LAST_SEQ)[0][0])

    async def owner_events(self, owner: str | None, *, after: int, until: int, limit: int) -> list[Event]:
        if owner is None:
            sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
            rows = self._read(sql, (after, until, limit))
        else:
            sql = (
                f"SELECT {EVENT_COLUMNS} FROM events WHERE owner = ? AND seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?"
            )
            rows = self._read(sql, (owner, after, until, limit))
        return [to_event(r) for r in rows]

    async def horizon(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key = 'horizon'")[0][0])

    # -- sweeping -----------------------------------------------------------------------------

    async def due(self, *, now: float, limit: int) -> DueTasks:
        leases = self._read(
            "SELECT id FROM tasks WHERE status = 'processing' AND lease_token IS NOT NULL "
            "AND lease_expires_at < ? LIMIT ?",
            (now, limit),
        )
        deadlines = self._read(
            "SELECT id FROM tasks WHERE status = 'processing' AND deadline_at < ? LIMIT ?",
            (now, limit),
        )
        polls = self._read(
            "SELECT id FROM tasks WHERE status = 'processing' AND poll_at IS NOT NULL AND poll_at <= ? LIMIT ?",
            (now, limit),
        )
        expired = self._read(
            "SELECT id FROM tasks WHERE status IN ('pending', 'processing') AND expires_at < ? LIMIT ?",
            (now, limit),
        )
        return DueTasks(
            lease_expired=[r[0] for r in leases],
            past_deadline=[r[0] for r in deadlines],
            expired=[r[0] for r in expired],
            to_poll=[r[0] for r in polls],
        )

    async def purge(self, *, finished_before: float, tombstones_before: float, limit: int) -> int:
        now = self.clock.now()

        def op(tx: _Tx) -> int:
            rows = tx.conn.execute(
                "SELECT id, owner FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?",
                (finished_before, limit),
            ).fetchall()
            for task_id, owner in rows:
                (top,) = tx.conn.execute(
                    "SELECT max(seq) FROM events WHERE task_id = ?", (task_id,)
                ).fetchone()
                if top is not None:
                    tx.conn.execute(
                        "UPDATE meta SET value = ? WHERE key = 'horizon' AND CAST(value AS INTEGER) < ?",
                        (str(top), top),
                    )
                tx.conn.execute("DELETE FROM events WHERE task_id = ?", (task_id,))
                tx.conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
                tx.conn.execute(
                    "INSERT OR REPLACE INTO tombstones (id, owner, purged_at) VALUES (?, ?, ?)",
                    (task_id, owner, now),
                )
            tx.conn.execute("DELETE FROM tombstones WHERE purged_at < ?", (tombstones_before,))
            tx.conn.execute("DELETE FROM webhook_ids WHERE received_at < ?", (finished_before,))
            tx.conn.execute("DELETE FROM webhook_deliveries WHERE received_at < ?", (finished_before,))
            tx.conn.execute(
                "DELETE FROM messages WHERE state != 'pending' AND updated_at < ?", (finished_before,)
            )
            tx.conn.execute("DELETE FROM message_attempts WHERE attempted_at < ?", (finished_before,))
            return len(rows)

        return await self._write(op)

    async def stats(self, *, since: float, sample: int) -> StatsRows:
        def query() -> StatsRows:
            conn = self._connect()
            try:
                counts = conn.execute(
                    "SELECT status, type, count(*) FROM tasks GROUP BY status, type"
                ).fetchall()
                waits = conn.execute(
                    "SELECT started_at - queued_at FROM tasks WHERE started_at >= ? "
                    "ORDER BY started_at DESC LIMIT ?",
                    (since, sample),
                ).fetchall()
                runs = conn.execute(
                    "SELECT finished_at - started_at FROM tasks WHERE finished_at IS NOT NULL "
                    "AND finished_at >= ? AND started_at IS NOT NULL AND status != 'cancelled' "
                    "ORDER BY finished_at DESC LIMIT ?",
                    (since, sample),
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError("The database could not be read.") from exc
            finally:
                conn.close()
            return StatsRows(
                counts=[(s, t, n) for s, t, n in counts],
                waits_s=[max(0.0, w) for (w,) in waits],
                runs_s=[max(0.0, r) for (r,) in runs],
            )

        return await asyncio.to_thread(query)

    # -- notifications ------------------------------------------------------------------------

    async def create_endpoint(self, endpoint: Endpoint) -> None:
        marks = ", ".join("?" * 15)
        await self._write(
            lambda tx: tx.conn.execute(
                f"INSERT INTO endpoints ({ENDPOINT_COLUMNS}) VALUES ({marks})", endpoint_values(endpoint)
            )
        )

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        rows = self._read(f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ?", (endpoint_id,))
        return to_endpoint(rows[0]) if rows else None

    async def list_endpoints(self) -> list[Endpoint]:
        return [to_endpoint(r) for r in self._read(f"SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY id")]

    async def update_endpoint(self, endpoint_id: str, change: Callable[[Endpoint], Endpoint]) -> Endpoint:
        def op(tx: _Tx) -> Endpoint:
            row = tx.conn.execute(
                f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ?", (endpoint_id,)
            ).fetchone()
            if row is None:
                raise NotFound("No such endpoint.")
            old = to_endpoint(row)
            new = change(old)
            columns = ENDPOINT_COLUMNS.split(", ")
            tx.conn.execute(
                f"UPDATE endpoints SET {', '.join(f'{c} = ?' for c in columns[1:])} WHERE id = ?",
                [*endpoint_values(new)[1:], endpoint_id],
            )
            if old.enabled and not new.enabled:
                _fail_pending(tx.conn, endpoint_id, "the endpoint was disabled", new.updated_at)
            return new

        return await self._write(op)

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        now = self.clock.now()

        def op(tx: _Tx) -> bool:
            if tx.conn.execute("DELETE FROM endpoints WHERE id = ?", (endpoint_id,)).rowcount == 0:
                return False
            _fail_pending(tx.conn, endpoint_id, "the endpoint was deleted", now)
            return True

        return await self._write(op)

    async def notify_cursor(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE key = 'notify_cursor'")
        return int(rows[0][0]) if rows else 0

    async def notify_urls_after(self, seq: int) -> bool:
        return bool(
            self._read("SELECT 1 FROM tasks WHERE notify_url IS NOT NULL AND seq > ? LIMIT 1", (seq,))
        )

    async def add_messages(self, after: int, upto: int, messages: Sequence[Message]) -> bool:
        marks = ", ".join("?" * 18)

        def op(tx: _Tx) -> bool:
            tx.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('notify_cursor', '0')")
            moved = tx.conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'notify_cursor' AND value = ?", (str(upto), str(after))
            )
            if moved.rowcount == 0:
                return False
            tx.conn.executemany(
                f"INSERT OR IGNORE INTO messages ({MESSAGE_COLUMNS}) VALUES ({marks})",
                [message_values(m) for m in messages],
            )
            return True

        return await self._write(op)

    async def claim_messages(
        self, *, now: float, limit: int, lease_s: float, channels: Sequence[str], hooks: Sequence[str]
    ) -> list[tuple[Message, Endpoint | None]]:
        if limit <= 0 or not (channels or hooks):
            return []
        which, params = _channel_filter(channels, hooks)
        m_columns = ", ".join(f"m.{c}" for c in MESSAGE_COLUMNS.split(", "))
        e_columns = ", ".join(f"e.{c}" for c in ENDPOINT_COLUMNS.split(", "))
        sql = (
            f"SELECT {m_columns}, {e_columns} FROM messages m "
            "LEFT JOIN endpoints e ON m.channel = 'endpoint' AND e.id = m.target "
            f"WHERE m.state = 'pending' AND m.next_at <= ? AND {which} "
            "AND (m.channel != 'endpoint' OR (e.enabled = 1 AND coalesce(e.throttled_until, 0) <= ?)) "
            "AND NOT EXISTS (SELECT 1 FROM messages p WHERE p.state = 'pending' AND p.task_id = m.task_id "
            "AND p.channel = m.channel AND p.target = m.target AND p.seq < m.seq) "
            "ORDER BY m.next_at LIMIT ?"
        )

        def op(tx: _Tx) -> list[tuple[Message, Endpoint | None]]:
            claimed = []
            for row in tx.conn.execute(sql, [now, *params, now, limit]).fetchall():
                message = to_message(row[:18])
                token = _lease_token()
                message = dataclasses.replace(
                    message,
                    attempts=message.attempts + 1,
                    next_at=now + lease_s,
                    lease_token=token,
                    updated_at=now,
                )
                tx.conn.execute(
                    "UPDATE messages SET attempts = ?, next_at = ?, lease_token = ?, updated_at = ? WHERE id = ?",
                    (message.attempts, message.next_at, token, now, message.id),
                )
                claimed.append((message, to_endpoint(row[18:]) if row[18] is not None else None))
            return claimed

        return await self._write(op)

    async def finish_message(self, result: AttemptResult) -> None:
        attempt = result.attempt
        now = attempt.attempted_at

        def op(tx: _Tx) -> None:
            tx.conn.execute(
                f"INSERT INTO message_attempts ({ATTEMPT_COLUMNS}) VALUES ({', '.join('?' * 11)})",
                attempt_values(attempt),
            )
            moved = tx.conn.execute(
                "UPDATE messages SET state = ?, next_at = ?, last_status = ?, last_error = ?, updated_at = ?, "
                "lease_token = NULL WHERE id = ? AND lease_token = ?",
                (result.state, result.next_at, attempt.status_code, attempt.error, now, attempt.message_id,
                 result.lease_token),
            )  # fmt: skip
            if moved.rowcount == 0:
                return  # the lease ran out and another sender took over: only the log keeps this
            if attempt.channel == "endpoint" and result.endpoint_ok is not None:
                _endpoint_outcome(tx.conn, attempt.target, result, now)
            if result.state == "delivered" and attempt.channel != "hook":
                task_id, seq, final = tx.conn.execute(
                    "SELECT task_id, seq, final FROM messages WHERE id = ?", (attempt.message_id,)
                ).fetchone()
                left = tx.conn.execute(
                    "SELECT 1 FROM messages WHERE task_id = ? AND seq = ? AND final = 1 "
                    "AND channel != 'hook' AND state != 'delivered' LIMIT 1",
                    (task_id, seq),
                ).fetchone()
                if final and left is None:
                    with contextlib.suppress(NotFound):
                        tx.apply(task_id, lambda r: mark_notified(r, now=now, seq=seq))

        await self._write(op)

    async def next_message_at(self, *, channels: Sequence[str], hooks: Sequence[str]) -> float | None:
        if not (channels or hooks):
            return None
        which, params = _channel_filter(channels, hooks)
        rows = self._read(
            f"SELECT min(m.next_at) FROM messages m WHERE m.state = 'pending' AND {which}", params
        )
        return rows[0][0] if rows else None

    async def get_message(self, message_id: str) -> Message | None:
        rows = self._read(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,))
        return to_message(rows[0]) if rows else None

    async def list_messages(self, query: MessageQuery) -> list[Message]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("task_id", query.task_id),
            ("target", query.endpoint_id),
            ("state", query.state),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(
            f"SELECT {MESSAGE_COLUMNS} FROM messages {where} ORDER BY created_at DESC, id DESC LIMIT ?",
            [*params, query.limit],
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
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("target", target), ("message_id", message_id), ("succeeded", succeeded)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if before is not None:
            clauses.append("id < ?")
            params.append(before)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(
            f"SELECT {ATTEMPT_COLUMNS}, id FROM message_attempts {where} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        return [to_attempt(r) for r in rows]

    async def resend_message(self, message_id: str, *, now: float) -> Message:
        def op(tx: _Tx) -> Message:
            tx.conn.execute(
                "UPDATE messages SET state = 'pending', attempts = 0, next_at = ?, lease_token = NULL, "
                "updated_at = ? WHERE id = ?",
                (now, now, message_id),
            )
            row = tx.conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                raise NotFound("No such message.")
            return to_message(row)

        return await self._write(op)

    async def recover_endpoint(self, endpoint_id: str, *, since: float, now: float) -> int:
        def op(tx: _Tx) -> int:
            cur = tx.conn.execute(
                "UPDATE messages SET state = 'pending', attempts = 0, next_at = ?, lease_token = NULL, "
                "updated_at = ? WHERE channel = 'endpoint' AND target = ? AND state = 'failed' AND created_at >= ?",
                (now, now, endpoint_id, since),
            )
            return int(cur.rowcount)

        return await self._write(op)

    # -- service state ------------------------------------------------------------------------

    async def meta_setdefault(self, key: str, value: str) -> str:
        def op(tx: _Tx) -> str:
            tx.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            return str(tx.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

        return await self._write(op)

    async def add_admin_key(self, key_hash: str) -> None:
        now = self.clock.now()

        def op(tx: _Tx) -> None:
            tx.conn.execute(
                "INSERT OR IGNORE INTO admin_keys (hash, created_at) VALUES (?, ?)", (key_hash, now)
            )

        await self._write(op)

    async def admin_key_hashes(self) -> set[str]:
        return {r[0] for r in self._read("SELECT hash FROM admin_keys")}


def _insert_delivery(conn: sqlite3.Connection, d: Delivery) -> None:
    conn.execute(
        "INSERT INTO webhook_deliveries (provider, delivery_id, task_id, outcome, status_code, received_at, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (d.provider, d.delivery_id, d.task_id, d.outcome, d.status_code, d.received_at, d.detail),
    )


def _fail_pending(conn: sqlite3.Connection, endpoint_id: str, why: str, now: float) -> None:
    conn.execute(
        "UPDATE messages SET state = 'failed', last_error = ?, lease_token = NULL, updated_at = ? "
        "WHERE channel = 'endpoint' AND target = ? AND state = 'pending'",
        (why, now, endpoint_id),
    )


def _endpoint_outcome(conn: sqlite3.Connection, endpoint_id: str, result: AttemptResult, now: float) -> None:
    """An endpoint's health after an attempt: failing since when, throttled until when, disabled."""
    if result.endpoint_ok:
        conn.execute("UPDATE endpoints SET failing_since = NULL WHERE id = ?", (endpoint_id,))
    else:
        conn.execute(
            "UPDATE endpoints SET failing_since = coalesce(failing_since, ?) WHERE id = ?", (now, endpoint_id)
        )
    if result.throttled_until is not None:
        conn.execute(
            "UPDATE endpoints SET throttled_until = max(coalesce(throttled_until, 0), ?) WHERE id = ?",
            (result.throttled_until, endpoint_id),
        )
    if result.disable_reason is not None:
        disabled = conn.execute(
            "UPDATE endpoints SET enabled = 0, disabled_reason = ?, updated_at = ? WHERE id = ? AND enabled = 1",
            (result.disable_reason, now, endpoint_id),
        )
        if disabled.rowcount:
            _fail_pending(conn, endpoint_id, "the endpoint was disabled", now)


def _channel_filter(channels: Sequence[str], hooks: Sequence[str]) -> tuple[str, list[Any]]:
    """SQL for "a message of one of these channels, or of one of these hooks"."""
    parts: list[str] = []
    params: list[Any] = []
    if channels:
        parts.append(f"m.channel IN ({', '.join('?' * len(channels))})")
        params.extend(channels)
    if hooks:
        parts.append(f"(m.channel = 'hook' AND m.target IN ({', '.join('?' * len(hooks))}))")
        params.extend(hooks)
    return "(" + " OR ".join(parts) + ")", params


def _lease_token() -> str:
    return secrets.token_hex(12)


def _list_filter(query: TaskQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.owner is not None:
        clauses.append("owner = ?")
        params.append(query.owner)
    if query.task_id is not None:
        clauses.append("id = ?")
        params.append(query.task_id)
    if query.status is not None:
        clauses.append("status = ?")
        params.append(query.status.value)
    if query.type is not None:
        clauses.append("type = ?")
        params.append(query.type)
    if query.before is not None:
        clauses.append("(created_at, id) < (?, ?)")
        params.extend(query.before)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params
