"""PostgreSQL's write path: changes batched into transactions on a few lanes (connections).

A transaction runs in two phases:

1. the changes: each decision locks and reads its row, decides, and buffers the new record;
   creates insert at once, so a concurrent duplicate is caught by the primary key;
2. one statement that writes every changed row, appends every event and notifies listeners
   (:data:`.sql.COMMIT`), then ``COMMIT``.

**Seqs without gaps.** A sequence hands out numbers in call order, not commit order, so a reader
following ``seq > last`` could pass a number whose transaction commits later. Here an event's seq
is ``(writing transaction's id) << 16 | (ordinal within it)``, and readers only read below the
oldest transaction still running in a session of errands' (``errands_log_bound()``, migration
0007): everything below it has ended. Other applications' transactions do not count; errands'
own are kept short by the server (``idle_in_transaction_session_timeout``, see the store).

**A task's events in commit order.** For that, transactions writing the same task must have ids
in the order they commit. A transaction gets its id with its first lock or write; if it then
waited for a row held by a younger one, it would commit after it with a smaller id. So row locks
are taken with ``NOWAIT`` and a batch that meets a locked row is rolled back and run again, with
a new, younger id. Each statement sees what committed before it (READ COMMITTED), so a batch
that has its id may also read a row that a younger transaction wrote and committed since: every
row it locks is read with the batch's seq base, and a row whose latest event is not older makes
the batch run again, younger. A claim (``SKIP LOCKED``, never waiting) always comes first in its
transaction, so that takes its id as it locks what it claims.

**Changes decided on rows as seen.** A worker writing its attempt's outcome knows the row as it
last wrote it. Such changes are decided on that record, unread, and written in one statement
(no ``BEGIN`` or ``COMMIT`` of their own) that writes each only where the row is still as seen
(:data:`.sql.COMMIT_SEEN`): four round trips become one. Those whose row changed meanwhile (a
cancel, a renewed lease) are run again as usual: read, locked, decided.

**Plans that stay cheap.** The write path's sessions have ``enable_seqscan`` and
``enable_bitmapscan`` off (the store's ``session_settings``): the task table is a queue whose
partial indexes hold many entries of rows that have moved on until ``VACUUM``; an ordered index
scan marks them dead as it passes and later scans skip them, a bitmap scan reads them every
time, and plans cached while the table was small scan all of it for one row. A claim's
transaction (a claim alone: nothing else is planned so) plans without sorts (``SET LOCAL
enable_sort``, in its ``BEGIN``): a plan cached
while the statistics said the queue was empty (early in a database's life) would read every
pending task through another index and sort them to claim a few, for as long as the session
lives; without sorts, each part of the queue is walked in its index's order. (Neither path is
forbidden, only priced out, which would make the JIT compiler compile every such plan: the write
path's sessions have ``jit`` off.) As every plan of the write path reaches rows through indexes,
one made at a statement's first call serves every call (``plan_cache_mode =
force_generic_plan``): PostgreSQL would otherwise plan the statements that pass rows as arrays
again at every call, which cost more than running them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from errands.errors import StoreError
from errands.model import Change, Event, EventType, TaskRecord
from errands.model.credits import Balance, CreditMove
from errands.store.base import claimable, hints
from errands.store.columns import COLUMNS, to_record, values, with_seq
from errands.store.postgres.sql import (
    COMMIT,
    COMMIT_SEEN,
    INSERT_RECEIPTS,
    INSERT_TASK,
    INSERT_TASKS,
    INSERTED,
    LOCK_KEYS,
    LOCK_SCOPES,
    LOCK_TASKS,
    REPORT_TARGET,
    STATEMENTS,
    WRITTEN,
    channels,
    payload,
)
from errands.store.records import Receipt
from errands.store.shared import Mode, Settlement, TxBase, op_error, settle

log = logging.getLogger("errands.store")

_MAX_BATCH = 256
_ATTEMPTS = 12
_SEQ = COLUMNS.index("seq")
#: How a claim's transaction begins, in one round trip (see "Plans that stay cheap" above).
_BEGIN_CLAIM = "BEGIN; SET LOCAL enable_sort = off"
CONNECTION_ERRORS = (
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
if TYPE_CHECKING:
    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record] | asyncpg.Connection


class _Unseen(Exception):
    """A change decided on rows as seen needed a row it was not given: run it as usual."""


class YoungerWrite(Exception):
    """A row this transaction read was last written by a younger transaction: run again, younger."""


_RETRYABLE = (
    asyncpg.LockNotAvailableError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    YoungerWrite,
)


def _older(row: Any) -> Any:
    """``row`` (whose last column is the transaction's seq base) if its task's latest event is
    older than this transaction, so that the event this transaction writes comes after it."""
    if row[_SEQ] >= row[-1]:
        raise YoungerWrite()
    return row


class PgTx(TxBase):
    """One write transaction, as the changes of a batch see it (see the module docstring)."""

    sql = STATEMENTS

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: list[Change] = []
        self.overlay: dict[str, TaskRecord] = {}
        self.ordinal = 0  # events numbered so far in this transaction (the low bits of their seqs)
        self.written: list[Event] = []  # events already written (creates)
        self.receipts: list[Receipt] = []  # provider reports to record, with the batch
        self.created: dict[str, TaskRecord] = {}
        self.locked: dict[str, TaskRecord] = {}  # rows locked here, as they were read
        self.absent: set[str] = set()  # ids a lock found no row for (until this one inserts them)
        # Tasks this transaction started, per (type, owner, key): not yet written, so not counted
        # by a query, but they count against the limits of the next claim in the batch.
        self.starts: dict[tuple[str, str, str | None], int] = {}
        # Creates the batch's jobs declared (``Writer.submit(creates=…)``), not written yet: the
        # first insert writes them all in one statement, and keeps each one's outcome here.
        self.declared: list[TaskRecord] = []
        self.inserted: dict[int, bool] = {}  # by id() of the record: created, or already there
        #: Rows as their writers last saw them, taken as they are instead of read (no
        #: transaction around the changes: see Writer._run_seen); those the commit found
        #: changed since are left in ``unwritten``.
        self.seen: dict[str, TaskRecord] | None = None
        self.unwritten: set[str] = set()

    # -- statements ---------------------------------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self.conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        return await self.conn.fetchrow(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self.conn.execute(sql, *args)
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, rows)

    # -- tasks and their events ---------------------------------------------------------------

    async def load(self, task_id: str) -> TaskRecord | None:
        if task_id in self.overlay:
            return self.overlay[task_id]
        if self.seen is not None:
            if task_id not in self.seen:
                raise _Unseen()
            return self.seen[task_id]
        await self.lock((task_id,))
        return self.locked.get(task_id)

    async def lock(self, task_ids: Iterable[str]) -> None:
        if self.seen is not None:
            return  # nothing is read: each row is taken as seen
        ids = sorted(
            {i for i in task_ids if i not in self.overlay and i not in self.locked and i not in self.absent}
        )
        if not ids:
            return
        for row in await self.conn.fetch(LOCK_TASKS, ids):
            record = to_record(_older(row))
            self.locked[record.id] = record
        self.absent.update(i for i in ids if i not in self.locked)

    async def move_credits(
        self, owner: str, move: CreditMove, *, now: float, task_id: str | None = None, note: str | None = None
    ) -> Balance:
        if self.seen is not None:  # one statement, no transaction: the move could not share it
            raise _Unseen()
        return await super().move_credits(owner, move, now=now, task_id=task_id, note=note)

    def write(self, change: Change, before: TaskRecord) -> TaskRecord:
        del before  # the second phase writes every mutable column
        self.pending.append(change)
        self.overlay[change.record.id] = change.record
        return change.record

    async def insert(self, record: TaskRecord) -> bool:
        """Written at once, with its final seq, not in the second phase (and with every other
        create the batch declared, in one statement)."""
        if id(record) not in self.inserted:
            await self.insert_declared([record])
        return self.inserted.pop(id(record))

    async def insert_many(self, records: Sequence[TaskRecord]) -> list[bool]:
        await self.insert_declared(records)
        return [self.inserted.pop(id(r)) for r in records]

    async def insert_declared(self, first: Sequence[TaskRecord] = ()) -> None:
        """Write ``first`` and the declared creates, the first record of each id (a later one
        with the same id finds it there, as a concurrent duplicate would)."""
        group: dict[str, TaskRecord] = {}
        for record in [*first, *(r for r in self.declared if all(r is not f for f in first))]:
            if record.id in group:
                self.inserted[id(record)] = False
            else:
                group[record.id] = record
        self.declared = []
        records = list(group.values())
        ordinals = range(self.ordinal + 1, self.ordinal + 1 + len(records))
        self.ordinal += len(records)
        snapshots = [r.public_json() for r in records]
        hint = hints((EventType.CREATED, r.waits) for r in records)
        notice = payload(hint, claimable((EventType.CREATED, r.waits, r.type) for r in records))
        if len(records) == 1:
            seq = await self.conn.fetchval(
                INSERT_TASK, *values(records[0], INSERTED), ordinals[0], snapshots[0], notice, channels(hint)
            )
            seqs = {} if seq is None else {records[0].id: seq}
        else:
            rows = [values(r, INSERTED) for r in records]
            arrays = [[row[i] for row in rows] for i in range(len(INSERTED))]
            seqs = {
                i: q
                for i, q, _ in await self.conn.fetch(
                    INSERT_TASKS, *arrays, list(ordinals), snapshots, notice, channels(hint)
                )
            }
        for record, snapshot in zip(records, snapshots, strict=True):
            seq = seqs.get(record.id)
            self.inserted[id(record)] = seq is not None
            if seq is None:
                continue
            object.__setattr__(record, "seq", seq)  # a fresh record, not shared yet
            self.overlay[record.id] = self.created[record.id] = record
            self.written.append(
                Event(seq, EventType.CREATED, record.updated_at, record.id, record.owner, record.type,
                      record.status, with_seq(snapshot, seq), record.waits, record)
            )  # fmt: skip

    # -- undoing one change -------------------------------------------------------------------

    async def mark(self) -> object:
        return len(self.pending)

    async def reset(self, mark: object) -> None:
        # Only buffered changes can be undone; a create that was written stays (operations that
        # raise do so before they write).
        assert isinstance(mark, int)
        del self.pending[mark:]
        self.overlay = {**self.created, **{c.record.id: c.record for c in self.pending}}

    async def release(self, mark: object) -> None:
        """Nothing to do: a kept change is simply not undone."""

    def recoverable(self, exc: Exception) -> bool:
        return op_error(exc)  # a database error aborts the whole transaction

    # -- what only some operations need -------------------------------------------------------

    async def add_receipt(self, receipt: Receipt) -> None:
        self.receipts.append(receipt)

    async def lock_scopes(self, scopes: Sequence[str]) -> set[str]:
        """One claimer per scope at a time, or two could each see room for one more: a
        transaction lock per scope, never waited for."""
        return {r[0] for r in await self.conn.fetch(LOCK_SCOPES, list(scopes)) if r[1]}

    async def lock_keys(self, keys: Sequence[str]) -> None:
        """Transaction locks, never waited for (like a row's: a transaction that has its id must
        not wait for a younger one); one held elsewhere runs the batch again, younger."""
        if not all(r[0] for r in await self.conn.fetch(LOCK_KEYS, list(keys))):
            raise YoungerWrite()

    def started(self, records: Sequence[TaskRecord]) -> None:
        for record in records:
            key = (record.type, record.owner, record.key)
            self.starts[key] = self.starts.get(key, 0) + 1

    def own_starts(self) -> list[tuple[str, str, str | None, int]]:
        return [(t, o, k, n) for (t, o, k), n in self.starts.items()]

    async def report_target(
        self, receipt: Receipt, job: tuple[Sequence[str], str] | None
    ) -> tuple[bool, TaskRecord | None]:
        key: list[Any]
        if job is None:
            where, key = "id = $4", [receipt.task_id or ""]
        else:
            where, key = "external_id = $4 AND type = ANY($5::text[])", [job[1], list(job[0])]
        row = await self.conn.fetchrow(
            REPORT_TARGET.format(where=where),
            receipt.provider,
            receipt.delivery_id,
            receipt.received_at,
            *key,
        )
        if row is None:
            return True, None
        record = to_record(_older(list(row)[1:]))
        self.locked.setdefault(record.id, record)
        return receipt.delivery_id is None or row[0] > 0, self.overlay.get(record.id, record)

    # -- the second phase ---------------------------------------------------------------------

    async def commit_changes(self) -> list[Event]:
        """Rows, events, notification. Sets each written record's seq."""
        if self.receipts:
            r = self.receipts
            await self.conn.execute(
                INSERT_RECEIPTS, [x.provider for x in r], [x.delivery_id for x in r], [x.task_id for x in r],
                [str(x.outcome) for x in r], [x.status_code for x in r], [x.received_at for x in r],
                [x.detail for x in r],
            )  # fmt: skip
            self.receipts = []
        if not self.pending:
            return self.written
        if self.ordinal + len(self.pending) >= 1 << 16:
            raise StoreError("Too many changes in one transaction.")
        first = self.ordinal + 1
        last_ord: dict[str, int] = {}
        for ord_, change in enumerate(self.pending, start=first):
            last_ord[change.record.id] = ord_
        finals = [self.pending[o - first].record for o in last_ord.values()]
        row_arrays: list[list[Any]] = [[r.id for r in finals], list(last_ord.values())]
        written = [values(r, WRITTEN) for r in finals]
        row_arrays.extend([row[i] for row in written] for i in range(len(WRITTEN)))
        snapshots = [c.snapshot() for c in self.pending]
        event_arrays: list[list[Any]] = [
            list(range(first, first + len(self.pending))),
            [c.event.value for c in self.pending],
            [c.record.updated_at for c in self.pending],
            [c.record.id for c in self.pending],
            [c.record.owner for c in self.pending],
            [c.record.type for c in self.pending],
            [c.record.status.value for c in self.pending],
            snapshots,
        ]
        hint = hints((c.event, c.record.waits) for c in self.pending)
        notice = payload(hint, claimable((c.event, c.record.waits, c.record.type) for c in self.pending))
        args = [first + len(self.pending) - 1, *row_arrays, *event_arrays, notice, channels(hint)]
        if self.seen is None:
            base = await self.conn.fetchval(COMMIT, *args)
        else:
            as_seen = [self.seen[r.id] for r in finals]
            row = await self.conn.fetchrow(
                COMMIT_SEEN, *args, [r.id for r in as_seen], [r.seq for r in as_seen],
                [r.lease_expires_at for r in as_seen], [r.poll_at for r in as_seen],
            )  # fmt: skip
            assert row is not None  # one row, always
            base = row[0]
            self.unwritten = {r.id for r in finals} - set(row[1])
        events = list(self.written)
        for ord_, (change, snapshot) in enumerate(zip(self.pending, snapshots, strict=True), start=first):
            record, kind = change.record, change.event
            if record.id in self.unwritten:
                continue
            seq = base + ord_
            if last_ord[record.id] == ord_:
                object.__setattr__(record, "seq", seq)  # fresh records, not shared yet
            events.append(
                Event(seq, kind, record.updated_at, record.id, record.owner, record.type, record.status,
                      with_seq(snapshot, seq), record.waits, record)
            )  # fmt: skip
        return sorted(events, key=lambda e: e.seq)


_Op = Callable[[PgTx], Awaitable[Any]]
_Result = Settlement


class _Job(NamedTuple):
    fn: _Op
    future: asyncio.Future[Any]
    mode: Mode
    task_id: str | None = None
    creates: TaskRecord | None = None
    seen: TaskRecord | None = None


@contextlib.asynccontextmanager
async def transaction(conn: Connection, *, claims: bool = False) -> AsyncIterator[None]:
    """A transaction (on a session of the write path's, see "Plans that stay cheap"); one that
    ``claims`` plans without sorts."""
    await conn.execute(_BEGIN_CLAIM if claims else "BEGIN")
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, *CONNECTION_ERRORS):
                await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


class Writer:
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

    def submit(
        self,
        fn: _Op,
        *,
        mode: Mode = "batch",
        task_id: str | None = None,
        creates: TaskRecord | None = None,
        seen: TaskRecord | None = None,
    ) -> asyncio.Future[Any]:
        """``creates``: the record ``fn`` inserts before anything else, if it does (then the
        creates of a batch are written in one statement); ``seen``: the row ``task_id`` as the
        caller last saw it, which ``fn`` may be decided on (see the module docstring)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._stopping:
            future.set_exception(StoreError("The store is closed."))
            return future
        self._queue.append(_Job(fn, future, mode, task_id, creates, seen if task_id is not None else None))
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
            if batch[0].seen is not None:
                # Changes decided on rows as seen go together, one per task (a second change of
                # the same task must be decided on the first's result).
                tasks = {batch[0].task_id}
                while (
                    self._queue and len(batch) < _MAX_BATCH and self._queue[0].seen is not None
                    and self._queue[0].task_id not in tasks
                ):  # fmt: skip
                    tasks.add(self._queue[0].task_id)
                    batch.append(self._queue.popleft())
            elif batch[0].mode != "first":  # a claim plans without sorts: nothing shares that
                while self._queue and len(batch) < _MAX_BATCH and self._queue[0].mode != "first":
                    batch.append(self._queue.popleft())
            if self._queue:
                self._wake.set()  # let another lane take the rest
            try:
                await self._run(batch)
            except Exception:  # never let a lane die; fail the batch instead
                log.exception("postgres write lane failed")
                settle(
                    [
                        (job.future, None, StoreError("The database could not save the change."))
                        for job in batch
                    ]
                )

    async def _run(self, batch: list[_Job]) -> None:
        if batch[0].seen is not None:
            left = await self._run_seen(batch)
            if left:
                await self._run([job._replace(seen=None) for job in left])
            return
        if len(batch) > 1 and all(job.mode == "alone" and job.creates is not None for job in batch):
            for job in await self._create_many(batch):
                await self._run([job])
            return
        for attempt in range(_ATTEMPTS):
            try:
                results, events = await self._transaction(batch)
            except _RETRYABLE:
                # A row was locked (NOWAIT): run again, as a younger transaction, once it is free.
                if attempt == _ATTEMPTS - 1:
                    raise
                await asyncio.sleep(random.uniform(0.001, 0.004) * (attempt + 1))  # noqa: S311 - jitter
                continue
            except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
                if len(batch) > 1 and not isinstance(exc, CONNECTION_ERRORS):
                    for job in batch:  # find the change that broke it; the others still land
                        await self._run([job])
                    return
                log.error("postgres write failed: %s", exc)
                error = StoreError("The database could not save the change.")
                error.__cause__ = exc
                settle([(job.future, None, error) for job in batch])
                return
            if events:
                try:
                    self._on_commit(events)
                except Exception:
                    log.exception("a commit listener failed")
            settle(results)
            return

    async def _run_seen(self, batch: list[_Job]) -> list[_Job]:
        """Changes decided on their rows as seen, in one statement (see the module docstring):
        those written are settled; the others (the row changed, the decision refused or
        changed nothing on the row as seen, the statement failed) are returned, to be run as
        usual, on the row as it is."""
        written: list[tuple[_Job, Any]] = []
        try:
            async with self._pool.acquire() as conn:
                tx = PgTx(conn)
                tx.seen = {job.seen.id: job.seen for job in batch if job.seen is not None}
                decided: list[tuple[_Job, Any]] = []
                for job in batch:
                    mark = await tx.mark()
                    try:
                        result = await job.fn(tx)
                    except Exception:  # perhaps only because the row seen is not the row as it is
                        await tx.reset(mark)
                        continue
                    if len(tx.pending) == mark:  # nothing to write, which only the row as it is can say
                        continue
                    decided.append((job, result))
                events = await tx.commit_changes()
                written = [(job, result) for job, result in decided if job.task_id not in tx.unwritten]
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            log.debug("changes decided on rows as seen were not written (%s): deciding again", exc)
            return batch
        if events:
            try:
                self._on_commit(events)
            except Exception:
                log.exception("a commit listener failed")
        settle([(job.future, result, None) for job, result in written])
        return [job for job in batch if all(job is not w for w, _ in written)]

    async def _create_many(self, batch: list[_Job]) -> list[_Job]:
        """Creates that each would be one statement alone, as one statement (one commit for all):
        those created are settled; the others (their id exists, or the statement failed) are
        returned, to be run alone."""
        try:
            async with self._pool.acquire() as conn:
                tx = PgTx(conn)
                await tx.insert_declared([job.creates for job in batch if job.creates is not None])
                created = [job for job in batch if job.creates is not None and tx.inserted[id(job.creates)]]
                results: list[_Result] = []
                for job in created:  # each finds its record written: no round trip
                    try:
                        results.append((job.future, await job.fn(tx), None))
                    except Exception as exc:
                        results.append((job.future, None, exc))
        except (asyncpg.PostgresError, *CONNECTION_ERRORS) as exc:
            log.warning("postgres batch of creates failed, writing them one by one: %s", exc)
            return batch
        if tx.written:
            try:
                self._on_commit(tx.written)
            except Exception:
                log.exception("a commit listener failed")
        settle(results)
        return [job for job in batch if all(job is not c for c in created)]

    async def _transaction(self, batch: list[_Job]) -> tuple[list[_Result], list[Event]]:
        if len(batch) == 1 and batch[0].mode == "alone":
            fn, future = batch[0].fn, batch[0].future
            async with self._pool.acquire() as conn:
                tx = PgTx(conn)
                try:
                    result = await fn(tx)
                except Exception as exc:
                    if not op_error(exc):
                        raise
                    return [(future, None, exc)], tx.written
                return [(future, result, None)], await tx.commit_changes()
        async with self._pool.acquire() as conn, transaction(conn, claims=batch[0].mode == "first"):
            tx = PgTx(conn)
            tx.declared = [job.creates for job in batch if job.creates is not None]
            results: list[_Result] = []
            # The rows the changes will load, locked in one statement rather than one each
            # (after a claim, which must take the transaction's id itself).
            keys = [job.task_id for job in batch if job.task_id is not None]
            for fn, future, mode, *_ in batch:
                if len(keys) > 1 and mode != "first":
                    await tx.lock(keys)
                    keys = []
                mark = await tx.mark()
                try:
                    result = await fn(tx)
                except Exception as exc:
                    if not op_error(exc):
                        raise
                    await tx.reset(mark)
                    results.append((future, None, exc))
                else:
                    results.append((future, result, None))
            events = await tx.commit_changes()
        return results, events
