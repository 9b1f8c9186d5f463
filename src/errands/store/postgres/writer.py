"""PostgreSQL's write path: changes batched into transactions (:mod:`.tx`, which says how a
transaction runs and keeps the log in order) on a few lanes (connections) working in parallel.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import asyncpg

from errands.errors import StoreError
from errands.model import Event, TaskRecord
from errands.store.postgres.tx import PgTx, YoungerWrite
from errands.store.shared import Mode, Settlement, op_error, settle

if TYPE_CHECKING:
    from errands.store.postgres.tx import Connection

log = logging.getLogger("errands.store")

T = TypeVar("T")
_MAX_BATCH = 256
_ATTEMPTS = 12
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

_RETRYABLE = (
    asyncpg.LockNotAvailableError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    YoungerWrite,
)


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

    def __init__(
        self, pool: asyncpg.Pool, on_commit: Callable[[Sequence[Event], int | None], None], lanes: int
    ) -> None:
        """``on_commit(events, after)``: right after each commit, its events and what precedes
        them (see ``CommitSubscriber.committed``)."""
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
                results, events, after = await self._transaction(batch)
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
            self._committed(events, after)
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
        self._committed(events, tx.after)
        settle([(job.future, result, None) for job, result in written])
        return [job for job in batch if all(job is not w for w, _ in written)]

    async def as_read(self, op: Callable[[PgTx], Awaitable[T]]) -> tuple[T, set[str]]:
        """Run ``op``, which reads the rows it changes itself, without locks (and sets them as
        ``tx.seen``), then write its changes in one statement, each only where its row is still
        as read (as for changes decided on rows as seen): no transaction, two round trips.
        Returns what ``op`` returned and the ids of the rows that changed meanwhile, unwritten."""
        if self._stopping:
            raise StoreError("The store is closed.")
        try:
            async with self._pool.acquire() as conn:
                tx = PgTx(conn)
                tx.seen = {}
                result = await op(tx)
                events = await tx.commit_changes()
        except Exception as exc:  # as a lane fails a batch (nothing here is the caller's to refuse)
            raise StoreError("The database could not save the change.") from exc
        self._committed(events, tx.after)
        return result, tx.unwritten

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
        self._committed(tx.written, tx.after)
        settle(results)
        return [job for job in batch if all(job is not c for c in created)]

    def _committed(self, events: list[Event], after: int | None) -> None:
        if events:
            try:
                self._on_commit(events, after)
            except Exception:
                log.exception("a commit listener failed")

    async def _transaction(self, batch: list[_Job]) -> tuple[list[_Result], list[Event], int | None]:
        if len(batch) == 1 and batch[0].mode == "alone":
            fn, future = batch[0].fn, batch[0].future
            async with self._pool.acquire() as conn:
                tx = PgTx(conn)
                try:
                    result = await fn(tx)
                except Exception as exc:
                    if not op_error(exc):
                        raise
                    return [(future, None, exc)], tx.written, tx.after
                return [(future, result, None)], await tx.commit_changes(), tx.after
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
        return results, events, tx.after
