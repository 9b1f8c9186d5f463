"""SQLite's one write path: a coroutine that owns the write connection and commits batches.

Changes queued during one turn of the event loop are committed together by the next turn
(group commit), each in its own savepoint so a refused change never undoes another. The batch
runs on the loop: SQLite calls take microseconds, in WAL mode a commit only appends to the log,
and the operations never wait on anything else (their awaits complete at once). Waiting for
another process's write lock, the one slow thing, is done asynchronously (``BEGIN IMMEDIATE``
without a busy timeout, retried with backoff); checkpoints (the fsyncs) run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from errands.errors import StoreError
from errands.model import Change, Event, EventType, TaskRecord
from errands.store.columns import COLUMNS, SELECT_LIST, changed_columns, to_record, values, with_seq
from errands.store.records import Receipt
from errands.store.shared import Settlement, TxBase, settle
from errands.store.sqlite.sql import LAST_SEQ, STATEMENTS

log = logging.getLogger("errands.store")

T = TypeVar("T")

_INSERT_NEW_TASK = (
    f"INSERT INTO tasks ({SELECT_LIST}) SELECT {', '.join('?' * len(COLUMNS))} "
    "WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE id = ?) ON CONFLICT (id) DO NOTHING"
)
_INSERT_TASK = f"INSERT INTO tasks ({SELECT_LIST}) VALUES ({', '.join('?' * len(COLUMNS))})"
#: Inserts of new tasks naming only some columns, by the indexes of those columns.
_INSERTS: dict[tuple[int, ...], str] = {}
_TAKEN_IDS = (
    "SELECT id FROM tasks WHERE id IN (SELECT value FROM json_each(?1)) "
    "UNION SELECT id FROM tombstones WHERE id IN (SELECT value FROM json_each(?2))"
)
_UPDATES: dict[tuple[str, ...], str] = {}
_INSERT_EVENT = "INSERT INTO events (seq, type, at, task_id, owner, task_type, status, task) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT_TASK = f"SELECT {SELECT_LIST} FROM tasks WHERE id = ?"
_INSERT_RECEIPT = (
    "INSERT INTO webhook_deliveries (provider, delivery_id, task_id, outcome, status_code, received_at, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_MAX_BATCH = 512
_CHECKPOINT_EVERY = 200  # commits; the WAL is copied back into the database from a thread


def bind(args: Sequence[Any]) -> list[Any]:
    """Parameters as SQLite takes them: lists (of ids, of types…) as JSON for ``json_each``."""
    return [orjson.dumps(a).decode() if isinstance(a, list | tuple) else a for a in args]


def _set_seq(record: TaskRecord, seq: int) -> None:
    # The record was just made by a decision (or for an insert) and nobody else holds it yet, so
    # setting its seq in place is safe and saves a copy per change.
    object.__setattr__(record, "seq", seq)


@dataclass(frozen=True, slots=True)
class _Mark:
    """A savepoint, and the transaction's own state at it."""

    name: int
    seq: int
    events: int


class SqliteTx(TxBase):
    """The write transaction a batch runs in, as one operation sees it."""

    sql = STATEMENTS

    def __init__(self, conn: sqlite3.Connection, seq: int) -> None:
        self.conn = conn
        self.seq = seq
        self.events: list[Event] = []
        self.savepoints = 0

    # -- statements ---------------------------------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self.conn.execute(sql, bind(args)).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return self.conn.execute(sql, bind(args)).fetchone()

    async def execute(self, sql: str, *args: Any) -> int:
        return int(self.conn.execute(sql, bind(args)).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, [bind(r) for r in rows])

    # -- tasks and their events ---------------------------------------------------------------

    async def load(self, task_id: str) -> TaskRecord | None:
        row = self.conn.execute(_SELECT_TASK, (task_id,)).fetchone()
        return None if row is None else to_record(row)

    async def lock(self, task_ids: Iterable[str]) -> None:
        """Nothing to do: the transaction holds the database's one write lock."""

    async def insert(self, record: TaskRecord) -> bool:
        _set_seq(record, self.seq + 1)
        if self.conn.execute(_INSERT_NEW_TASK, [*values(record), record.id]).rowcount == 0:
            return False
        self.seq += 1
        self._event(record, EventType.CREATED)
        return True

    async def insert_many(self, records: Sequence[TaskRecord]) -> list[bool]:
        """The ids taken (by a task, or a purged one's tombstone) found in one query, then the
        rest written with one ``executemany`` for the rows and one for their events: this
        transaction holds the database's only write lock, so no id can be taken in between."""
        if len(records) < 8:
            return [await self.insert(r) for r in records]
        ids = orjson.dumps([r.id for r in records]).decode()
        taken = {row[0] for row in self.conn.execute(_TAKEN_IDS, (ids, ids))}
        fresh: list[TaskRecord] = []
        done: list[bool] = []
        for record in records:
            ok = record.id not in taken
            done.append(ok)
            if ok:
                taken.add(record.id)  # a later record with the same id finds it taken
                self.seq += 1
                _set_seq(record, self.seq)
                fresh.append(record)
        if not fresh:
            return done
        rows = [values(r) for r in fresh]
        # Only the columns some new task sets: those all leave NULL are left to the table.
        kept = tuple(i for i, column in enumerate(zip(*rows, strict=True)) if column.count(None) < len(rows))
        if len(kept) < len(COLUMNS):
            sql = _INSERTS.get(kept)
            if sql is None:
                names = ", ".join(COLUMNS[i] for i in kept)
                sql = _INSERTS[kept] = f"INSERT INTO tasks ({names}) VALUES ({', '.join('?' * len(kept))})"
            self.conn.executemany(sql, map(operator.itemgetter(*kept), rows))
        else:
            self.conn.executemany(_INSERT_TASK, rows)
        self._events([Event(r.seq, EventType.CREATED, r.updated_at, r.id, r.owner, r.type, r.status,
                            r.public_json(), r.waits, r) for r in fresh])  # fmt: skip
        return done

    def write(self, change: Change, before: TaskRecord) -> TaskRecord:
        """Only the columns the change changed, so indexes on the others are left alone."""
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
        self._event(record, change.event, change.payload)
        return record

    def _event(self, record: TaskRecord, kind: EventType, payload: bytes | None = None) -> None:
        task_json = record.public_json() if payload is None else with_seq(payload, record.seq)
        self._events([Event(record.seq, kind, record.updated_at, record.id, record.owner, record.type,
                            record.status, task_json, record.waits, record)])  # fmt: skip

    def _events(self, events: list[Event]) -> None:
        """Append events to the log, and to what the commit will announce."""
        rows = [(e.seq, e.type.value, e.at, e.task_id, e.owner, e.task_type, e.status.value, e.task_json)
                for e in events]  # fmt: skip
        if len(rows) == 1:  # every change of a task: the plain call is the cheaper one
            self.conn.execute(_INSERT_EVENT, rows[0])
        else:
            self.conn.executemany(_INSERT_EVENT, rows)
        self.events.extend(events)

    # -- undoing one change -------------------------------------------------------------------

    async def mark(self) -> object:
        self.savepoints += 1
        self.conn.execute(f"SAVEPOINT s{self.savepoints}")
        return _Mark(self.savepoints, self.seq, len(self.events))

    async def reset(self, mark: object) -> None:
        assert isinstance(mark, _Mark)
        self.conn.execute(f"ROLLBACK TO s{mark.name}")
        self.conn.execute(f"RELEASE s{mark.name}")
        self.seq = mark.seq
        del self.events[mark.events :]

    async def release(self, mark: object) -> None:
        assert isinstance(mark, _Mark)
        self.conn.execute(f"RELEASE s{mark.name}")

    def recoverable(self, exc: Exception) -> bool:
        return True  # a savepoint undoes any change, a database error included

    # -- what only some operations need -------------------------------------------------------

    async def add_receipt(self, receipt: Receipt) -> None:
        r = receipt
        self.conn.execute(
            _INSERT_RECEIPT,
            (r.provider, r.delivery_id, r.task_id, str(r.outcome), r.status_code, r.received_at, r.detail),
        )

    async def lock_scopes(self, scopes: Sequence[str]) -> set[str]:
        """All of them: the one write lock already keeps every other claim out."""
        return set(scopes)

    async def lock_keys(self, keys: Sequence[str]) -> None:
        """Nothing to take: the one write lock already keeps every other writer out."""

    def started(self, records: Sequence[TaskRecord]) -> None:
        """Nothing to keep: their rows are written at once, and counted by the next query."""

    def own_starts(self) -> list[tuple[str, str, str | None, int]]:
        return []

    async def report_target(
        self, receipt: Receipt, job: tuple[Sequence[str], str] | None
    ) -> tuple[bool, TaskRecord | None]:
        if job is None:
            record = await self.load(receipt.task_id or "")
        else:
            row = self.conn.execute(
                f"SELECT {SELECT_LIST} FROM tasks WHERE external_id = ? AND type IN (SELECT value FROM json_each(?)) "
                "ORDER BY created_at DESC LIMIT 1",
                bind([job[1], list(job[0])]),
            ).fetchone()
            record = None if row is None else to_record(row)
        if record is None or receipt.delivery_id is None:
            return True, record
        seen = self.conn.execute(
            "INSERT OR IGNORE INTO webhook_ids (provider, delivery_id, received_at) VALUES (?, ?, ?)",
            (receipt.provider, receipt.delivery_id, receipt.received_at),
        )
        return seen.rowcount > 0, record


_Job = tuple[Callable[[SqliteTx], Awaitable[Any]], "asyncio.Future[Any]"]


class Writer:
    """The one write path; see the module docstring."""

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

    def submit(self, fn: Callable[[SqliteTx], Awaitable[T]]) -> asyncio.Future[T]:
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
                await self._run_batch(batch)
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

    async def _run_batch(self, batch: list[_Job]) -> None:
        conn = self._conn
        results: list[Settlement] = []
        events: list[Event] = []
        try:
            (seq,) = conn.execute(LAST_SEQ).fetchone()
            tx = SqliteTx(conn, seq)
            # Each change of a batch runs in a savepoint, so a refused one undoes only itself;
            # a change alone in its batch needs none (the whole transaction is its savepoint).
            alone = len(batch) == 1
            for fn, future in batch:
                mark = None if alone else await tx.mark()
                try:
                    result = await fn(tx)
                except Exception as exc:
                    if mark is None:
                        conn.execute("ROLLBACK")
                    else:
                        await tx.reset(mark)
                    results.append((future, None, _translate(exc)))
                else:
                    if mark is not None:
                        await tx.release(mark)
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
        settle(results)

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
