"""The distributed store: PostgreSQL through asyncpg, shared by any number of nodes and workers.

Writes go through a small writer (:mod:`.writer`), as on SQLite, so concurrent changes share
transactions; a few lanes (pooled connections) work in parallel. Other nodes learn of commits
through ``LISTEN``/``NOTIFY`` (the payload: the last seq and the commit's hints, and where they
fit its events, see :mod:`.notices`; the hub reads the log for what it cannot take from there),
with a dedicated connection that reconnects by itself; the hub catches up from its last seq
after every reconnect, so nothing is missed while it was away.

**errands' own sessions.** Every connection is named ``errands`` (``application_name``): the log
is read below the oldest transaction still running in a session of that name (migration 0007),
so nobody else's transaction holds it back. In return errands bounds its own: the server ends a
session of errands' that sits idle in a transaction for ``stall_s`` (a process frozen in the
middle of a write, by SIGSTOP or a frozen VM), and the sweeper's and the listener's sessions when
they stop talking, so a frozen node holds the others back for seconds, not for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from errands.clock import Clock
from errands.errors import ConfigError, StoreError
from errands.model import Event, TaskRecord
from errands.store.base import CommitSubscriber, Hint, Work
from errands.store.columns import to_event, to_record
from errands.store.migrations import fresh_schema, migrations
from errands.store.postgres.notices import ANY_WORK, CHANNEL, listened, notification_events, notification_hint
from errands.store.postgres.sql import CLAIM_AS_READ, STATEMENTS
from errands.store.postgres.tx import PgTx
from errands.store.postgres.writer import CONNECTION_ERRORS, Writer
from errands.store.records import Claimed, ClaimSpec, LogRead
from errands.store.shared import Mode, Tx, op_error
from errands.store.shared.credits import CreditOps
from errands.store.shared.log import LogOps
from errands.store.shared.meta import MetaOps
from errands.store.shared.outbox import OutboxOps
from errands.store.shared.reports import ReportOps
from errands.store.shared.schedules import ScheduleOps
from errands.store.shared.tasks import TaskOps, start_claimed
from errands.waits import within

log = logging.getLogger("errands.store")

T = TypeVar("T")
_SWEEPER_LOCK = 0x6572_7261_6E64_73  # "errands": the advisory lock one sweeper holds at a time
#: The name of every session of errands' (see the module docstring and migration 0007).
APPLICATION_NAME = "errands"
#: How long the listener's session may stay silent (it checks its connection every 5 s).
_LISTEN_IDLE_S = 60.0
#: The sessions of errands' own role on this database (see PostgresStore._peers), read at most
#: this often on behalf of notifications from others.
_PEERS = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND usename = current_user"
_PEERS_EVERY_S = 0.05


def session_settings(
    *, idle_in_transaction_s: float | None = None, idle_s: float | None = None, writes: bool = False
) -> dict[str, str]:
    """The settings every session of errands' starts with (they override the URL's); with
    ``writes``, a session of the write path's, whose statements reach rows only through indexes
    (see the writer's "Plans that stay cheap")."""
    settings = {
        "application_name": APPLICATION_NAME,
        # The log's bound relies on a fresh snapshot per statement (migration 0007), and the
        # write path on reading what committed before each statement.
        "default_transaction_isolation": "read committed",
    }
    if writes:
        settings["enable_seqscan"] = settings["enable_bitmapscan"] = "off"
        # A plan that must still take a disabled path costs more than any threshold of the JIT
        # compiler, which would then compile it on every execution (tens of milliseconds):
        # short statements never gain from it.
        settings["jit"] = "off"
        # Every statement of the write path plans alike whatever its arguments (indexes only):
        # planning again at each call (a custom plan, which PostgreSQL picks for the statements
        # that pass rows as arrays) costs more than running most of them.
        settings["plan_cache_mode"] = "force_generic_plan"
    if idle_in_transaction_s is not None:
        ms = str(max(1, round(idle_in_transaction_s * 1000)))
        settings["idle_in_transaction_session_timeout"] = ms
        # The same bound when the client stops reading what the server sends it.
        settings["tcp_user_timeout"] = ms
    if idle_s is not None:
        settings["idle_session_timeout"] = str(max(1, round(idle_s * 1000)))
    return settings


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, credentials = head.partition("://")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{tail}"


async def _either(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset between uses of a pooled connection: errands leaves no session state on them
    (no LISTEN, no session locks, no cursors), and asyncpg's reset costs a round trip each time.
    (What a session has learnt of other applications' transactions, ``errands.foreign``, see
    migration 0018, is worth keeping; a reset would only make it learn again.)"""


class PostgresStore(TaskOps, LogOps, ReportOps, OutboxOps, ScheduleOps, MetaOps, CreditOps):
    """A :class:`~errands.store.base.Store` on PostgreSQL (see the module docstring)."""

    dialect = "postgres"
    schedules_table = "errands_schedules"
    sql = STATEMENTS
    snapshots_have_seq = False  # a snapshot is written before its seq is known
    #: NOTIFY wakes the hub at once; this is only the safety net.
    log_poll_s = 1.0
    #: Every commit of every process notifies every hub; reading once per notification cost
    #: more than a query per task per process under load.
    log_read_gap_s = 0.003

    def __init__(
        self,
        url: str,
        clock: Clock,
        *,
        pool_size: int = 8,
        write_lanes: int = 3,
        stall_s: float = 5.0,
        sweep_every_s: float = 5.0,
    ) -> None:
        """``stall_s``: how long a session of errands' may sit idle in a transaction before the
        server ends it; ``sweep_every_s``: how often the sweeper renews its lock (its session
        is ended after a few times that without a word)."""
        self.clock = clock
        self.url = url
        self._stall_s = stall_s
        self._lock_idle_s = max(_LISTEN_IDLE_S, 4 * sweep_every_s)
        self._pool_size = max(2, pool_size)
        self._lanes = max(1, min(write_lanes, self._pool_size - 1))
        self._pool: asyncpg.Pool | None = None  # reads
        self._write_pool: asyncpg.Pool | None = None  # the writer's lanes, and transactions of their own
        self._writer: Writer | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._lock_held = False
        self._subscriber: CommitSubscriber | None = None
        self._channels_changed = asyncio.Event()
        self._own_pids: set[int] = set()  # the server processes of the pool's connections
        # The server processes of sessions of errands' own role on this database: only their
        # notifications' events are taken (any role that may connect may notify; one that is
        # errands' own may write the log anyway). Read by the listener every few seconds, and
        # soon after a notification with events comes from another process.
        self._peers: set[int] = set()
        self._stranger = asyncio.Event()
        self._peers_at = -1e9
        self.listening = asyncio.Event()
        #: The channels it listens to now (what the subscriber wants, once LISTEN took it).
        self.channels: list[str] = []

    # -- life cycle ---------------------------------------------------------------------------

    def subscribe(self, subscriber: CommitSubscriber) -> None:
        self._subscriber = subscriber
        self._channels_changed.set()  # the listener listens to what it wants now

    def _channels(self) -> list[str]:
        return listened(Hint.ALL if self._subscriber is None else self._subscriber.wanted)

    def _committed(self, events: Sequence[Event], after: int | None) -> None:
        if self._subscriber is not None:
            self._subscriber.committed(events, after)

    def _remote(
        self,
        hint: Hint,
        seq: int | None = None,
        work: Work = ANY_WORK,
        events: Sequence[Event] = (),
        after: int | None = None,
    ) -> None:
        if self._subscriber is not None:
            try:
                self._subscriber.remote_commit(hint, seq, work, events, after)
            except Exception:
                log.exception("the commit subscriber failed")

    def _notified(self, _conn: object, pid: int, channel: str, payload: object) -> None:
        # This process's own commits reach the subscriber right after them (committed()):
        # their notifications, which may come first, would only make it read the log twice.
        if pid not in self._own_pids:
            text = str(payload)
            after, events = notification_events(text) if channel == CHANNEL else (None, [])
            if events and pid not in self._peers:
                after, events = None, []  # read from the log instead
                self._stranger.set()  # perhaps a new process of errands': look again
            self._remote(*notification_hint(text), events, after)

    async def _own_session(self, conn: asyncpg.Connection) -> None:
        pid = conn.get_server_pid()
        self._own_pids.add(pid)
        conn.add_termination_listener(lambda _conn: self._own_pids.discard(pid))

    async def _session(self, *, idle_s: float | None = None) -> asyncpg.Connection:
        """A connection of its own (not pooled), named as errands' (see the module docstring)."""
        return await asyncpg.connect(self.url, timeout=10, server_settings=session_settings(idle_s=idle_s))

    async def _connect(self) -> asyncpg.Connection:
        try:
            return await self._session()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ConfigError(f"Cannot connect to PostgreSQL at {safe_url(self.url)}: {exc}.") from None

    async def open(self, *, migrate: bool = True) -> None:
        if migrate:
            await self.migrate()
        # Of the connections, one per lane and one for transactions of their own write; the
        # rest read.
        writes = min(self._lanes + 1, self._pool_size - 1)
        try:
            self._pool = await self._create_pool(self._pool_size - writes, writes=False)
            self._write_pool = await self._create_pool(writes, writes=True)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            await self.close()
            raise ConfigError(f"Cannot connect to PostgreSQL at {safe_url(self.url)}: {exc}.") from None
        if not migrate and await self._pending_migrations():
            raise ConfigError("The database schema is not up to date; run `errands migrate`.")
        self._writer = Writer(self._write_pool, self._committed, self._lanes)
        self._listener = asyncio.create_task(self._listen(), name="errands-pg-listen")

    async def _create_pool(self, size: int, *, writes: bool) -> asyncpg.Pool:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=size,
            command_timeout=30,
            timeout=10,
            reset=_keep_session,
            init=self._own_session,
            server_settings=session_settings(idle_in_transaction_s=self._stall_s, writes=writes),
        )
        return pool

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
        for pool in (self._pool, self._write_pool):
            if pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 5)
        self._pool = self._write_pool = None

    async def _listen(self) -> None:
        """Keep a LISTEN connection on the channels the subscriber wants (none, while it is
        deaf); on every (re)connect and change of channels that adds one, tell the subscriber
        to catch up."""
        delay = 0.2
        while True:
            try:
                conn = await self._session(idle_s=_LISTEN_IDLE_S)
                self._listen_conn = conn
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, gone=lost: gone.set())
                channels: list[str] = []
                self._channels_changed.set()
                while not lost.is_set() and not conn.is_closed():
                    if self._channels_changed.is_set():
                        self._channels_changed.clear()
                        wanted = self._channels()
                        added = [c for c in wanted if c not in channels]
                        for channel in added:  # new ones first
                            await conn.add_listener(channel, self._notified)
                        for channel in (c for c in channels if c not in wanted):
                            await conn.remove_listener(channel, self._notified)
                        channels = self.channels = wanted
                        self.listening.set()
                        delay = 0.2
                        if added:
                            self._remote(Hint.ALL)  # whatever was committed while not listening
                    if not lost.is_set() and not self._channels_changed.is_set():
                        # (Which also notices a silently dead connection.)
                        await asyncio.sleep(max(0.0, self._peers_at + _PEERS_EVERY_S - time.monotonic()))
                        self._stranger.clear()
                        self._peers_at = time.monotonic()
                        self._peers = {r[0] for r in await conn.fetch(_PEERS)}
                    await within(_either(lost, self._channels_changed, self._stranger), 5)
                log.warning("listening for events failed: the connection was lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listening for events failed (%s); reconnecting", type(exc).__name__)
            self.listening.clear()
            self.channels = []
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
                    for _, _, script in todo:
                        await conn.execute(script)
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
                self._lock_conn = await self._session(idle_s=self._lock_idle_s)
                self._lock_held = False
            if not self._lock_held:
                self._lock_held = bool(
                    await self._lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", _SWEEPER_LOCK)
                )
            else:
                await self._lock_conn.execute("SELECT 1")
            return self._lock_held
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            self._lock_conn = None
            self._lock_held = False
            return False

    # -- a claim alone ------------------------------------------------------------------------

    async def claim(
        self, *, worker_id: str, specs: Sequence[ClaimSpec], limit: int, lease_s: float, alone: bool = False
    ) -> Claimed:
        """A claim ``alone`` (a worker that takes its tasks one at a time, and that nobody else
        claims, see :mod:`errands.worker.pace`) of types without limits reads its tasks without
        locking them and writes each in one statement, only where the task is still as read
        (:meth:`.writer.Writer.as_read`): two round trips, not the four of a transaction that
        locks them. Tasks it finds taken meanwhile (by others claiming the same tasks, or one
        locked) are made up for by a claim as usual, which skips locked tasks. The queue is
        short then, so the read's plan costs little whichever index it walks (it is planned
        outside the claim's transaction, which plans without sorts)."""
        if not alone or limit <= 0 or not specs or any(s.bounds for s in specs):
            return await super().claim(worker_id=worker_id, specs=specs, limit=limit, lease_s=lease_s)
        if self._writer is None:
            raise StoreError("The store is closed.")
        types = [s.type for s in specs]

        async def read(tx: PgTx) -> list[TaskRecord]:
            now = self.clock.now()
            records = [to_record(r) for r in await tx.fetch(CLAIM_AS_READ, types, now, limit)]
            tx.seen = {r.id: r for r in records}
            return [
                tx.write(start_claimed(r, now=now, worker_id=worker_id, lease_s=lease_s), r) for r in records
            ]

        chosen, changed = await self._writer.as_read(read)
        claimed = Claimed(r for r in chosen if r.id not in changed)
        if changed:
            left = limit - len(claimed)
            claimed.extend(await super().claim(worker_id=worker_id, specs=specs, limit=left, lease_s=lease_s))
        return claimed

    # -- the log of a few tasks (a worker process's, see TaskLog) ------------------------------

    async def read_tasks_log(self, tasks: Mapping[str, int], *, limit: int = 1000) -> LogRead:
        rows = await self._fetch(
            "SELECT * FROM errands_task_log($1::text[], $2::int8[], $3)",
            list(tasks),
            list(tasks.values()),
            limit,
        )
        behind = bool(rows and rows[0][8])
        return LogRead([to_event(r, seq_in_snapshot=False) for r in rows if r[0] is not None], behind)

    # -- what the shared operations need ------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if self._pool is None:
            raise StoreError("The store is closed.")
        try:
            return list(await self._pool.fetch(sql, *args))
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise StoreError("The database could not be read.") from exc

    async def _write(
        self,
        op: Callable[[Tx], Awaitable[T]],
        *,
        mode: Mode = "batch",
        task_id: str | None = None,
        creates: TaskRecord | None = None,
        seen: TaskRecord | None = None,
    ) -> T:
        if mode == "own":
            return await self._own(op)
        if self._writer is None:
            raise StoreError("The store is closed.")
        result: T = await self._writer.submit(op, mode=mode, task_id=task_id, creates=creates, seen=seen)
        return result

    async def _own(self, op: Callable[[PgTx], Awaitable[T]]) -> T:
        """A transaction of its own, outside the writer: for changes that touch no task."""
        if self._write_pool is None:
            raise StoreError("The store is closed.")
        try:
            async with self._write_pool.acquire() as conn, conn.transaction():
                tx = PgTx(conn)
                result = await op(tx)
                await tx.commit_changes()
                return result
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            raise StoreError("The database could not save the change.") from exc
        except Exception as exc:
            if op_error(exc):
                raise
            raise StoreError("The database could not save the change.") from exc
