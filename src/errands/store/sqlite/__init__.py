"""The embedded store: one SQLite file in WAL mode.

SQLite has one writer, so this store has one write path (:mod:`.writer`): a coroutine that owns
the write connection and commits whatever queued up in one transaction. Futures resolve only
after the commit (durable before acknowledged), right after the batch's events were handed to
the subscriber.

Everything runs on the event loop's thread: a thread hop per change costs more than the SQLite
calls themselves (and, under the GIL, up to a switch interval). The slow parts stay off the loop:
waiting for another process's write lock is an async retry, and checkpoints run in a thread.

Reads use a second connection: in WAL mode they never wait for the writer and each statement
sees a committed snapshot. Several processes may share one file; the write lock serialises them
and ``seq`` is taken under it, so the log's order is the commit order. One of them sweeps: the
one holding an exclusive lock (``flock``) on ``<file>-sweeper``, which the system releases when
its process ends, however it ends (the next pass of another process takes it over).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from errands.clock import Clock
from errands.errors import ConfigError, StoreError
from errands.model import Event, TaskRecord
from errands.store.base import CommitSubscriber
from errands.store.migrations import fresh_schema, migrations
from errands.store.shared import Mode, Tx
from errands.store.shared.credits import CreditOps
from errands.store.shared.log import LogOps
from errands.store.shared.meta import MetaOps
from errands.store.shared.outbox import OutboxOps
from errands.store.shared.reports import ReportOps
from errands.store.shared.schedules import ScheduleOps
from errands.store.shared.tasks import TaskOps
from errands.store.sqlite.lock import FileLock
from errands.store.sqlite.sql import STATEMENTS
from errands.store.sqlite.writer import SqliteTx, Writer, bind

T = TypeVar("T")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _sweeper_lock(path: str) -> FileLock:
    """The sweeper's lock of the database at ``path``: by the file's real path (SQLite follows
    links), made with the database's permissions."""
    real = os.path.realpath(path)
    return FileLock(f"{real}-sweeper", os.stat(real).st_mode & 0o666)


def statements_of(script: str) -> list[str]:
    """The statements of a migration script, one by one."""
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


class SqliteStore(TaskOps, LogOps, ReportOps, OutboxOps, ScheduleOps, MetaOps, CreditOps):
    """A :class:`~errands.store.base.Store` on one SQLite file (see the module docstring)."""

    dialect = "sqlite"
    schedules_table = "schedules"
    sql = STATEMENTS
    #: Other processes sharing the file are only seen by reading the log, so read it often.
    log_poll_s = 0.05
    log_read_gap_s = 0.0

    def __init__(
        self, path: str, clock: Clock, *, synchronous: str = "NORMAL", busy_timeout_s: float = 10.0
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigError(f"ERRANDS_SQLITE_SYNCHRONOUS must be one of {', '.join(_SYNCHRONOUS)}.")
        self.clock = clock
        self.path = path
        self._synchronous = synchronous.upper()
        self._busy_timeout_s = busy_timeout_s
        self._reader: sqlite3.Connection | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._writer: Writer | None = None
        self._subscriber: CommitSubscriber | None = None
        self._sweeper_lock: FileLock | None = None  # while open

    # -- life cycle ---------------------------------------------------------------------------

    def subscribe(self, subscriber: CommitSubscriber) -> None:
        self._subscriber = subscriber

    def _committed(self, events: Sequence[Event]) -> None:
        if self._subscriber is not None and events:
            # Seqs are handed out in commit order (one writer at a time, across processes):
            # whatever precedes the first has committed.
            self._subscriber.committed(events, events[0].seq - 1)

    async def hold_sweeper_lock(self) -> bool:
        return self._sweeper_lock is not None and self._sweeper_lock.take()

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
        self._writer = Writer(
            conn, self._committed, lock_timeout_s=self._busy_timeout_s, checkpoint=self._checkpoint
        )
        self._writer_conn = conn
        self._sweeper_lock = await asyncio.to_thread(_sweeper_lock, self.path)

    async def close(self) -> None:
        lock, self._sweeper_lock = self._sweeper_lock, None
        try:
            if self._writer is not None:
                await self._writer.stop()
                self._writer = None
            for conn in (self._writer_conn, self._reader, self._checkpointer):
                if conn is not None:
                    conn.close()
            self._writer_conn = self._reader = self._checkpointer = None
        finally:
            if lock is not None:
                lock.release()  # another process's next pass takes over

    async def migrate(self) -> list[int]:
        return await asyncio.to_thread(self._migrate_sync)

    async def _pending_migrations(self) -> list[int]:
        applied = set()
        with contextlib.suppress(StoreError):
            applied = {r[0] for r in await self._fetch("SELECT version FROM schema_migrations")}
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
                for statement in statements_of(fresh_schema("sqlite")):
                    conn.execute(statement)
            else:
                todo = [m for m in known if m[0] not in applied]
                for _, _, script in todo:
                    for statement in statements_of(script):
                        conn.execute(statement)
            for version, name, _ in todo:
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, self.clock.now()),
                )
            conn.execute("COMMIT")
            return [version for version, _, _ in todo]
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"Migrating the SQLite database failed: {exc}.") from exc
        finally:
            conn.close()

    async def ping(self) -> None:
        if self._writer is None or not self._writer.alive():
            raise StoreError("The SQLite writer is not running.")
        await self._fetch("SELECT 1")

    # -- what the shared operations need ------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if self._reader is None:
            raise StoreError("The store is closed.")
        try:
            return self._reader.execute(sql, bind(args)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError("The database could not be read.") from exc

    async def _fetch_heavy(self, sql: str, *args: Any) -> list[Any]:
        """On a connection of its own, in a thread: a scan must not hold the loop."""

        def query() -> list[Any]:
            conn = self._connect()
            try:
                return conn.execute(sql, bind(args)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError("The database could not be read.") from exc
            finally:
                conn.close()

        return await asyncio.to_thread(query)

    async def _write(
        self,
        op: Callable[[Tx], Awaitable[T]],
        *,
        mode: Mode = "batch",
        task_id: str | None = None,
        creates: TaskRecord | None = None,
        seen: TaskRecord | None = None,
    ) -> T:
        # One writer: every change shares its batch, holds the one lock, and reads its row
        # in-process (as cheap as taking it as seen).
        del mode, task_id, creates, seen
        if self._writer is None:
            raise StoreError("The store is closed.")
        run: Callable[[SqliteTx], Awaitable[T]] = op  # an SqliteTx is a Tx
        return await self._writer.submit(run)
