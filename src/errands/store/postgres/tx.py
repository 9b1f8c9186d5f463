"""A write transaction of PostgreSQL's write path, as the changes of a batch see it.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from errands.errors import StoreError
from errands.model import Change, Event, EventType, Status, TaskRecord
from errands.model.credits import Balance, CreditMove
from errands.store.base import claimable, hints
from errands.store.columns import COLUMNS, to_record, values, with_seq
from errands.store.postgres.notices import channels, events_text, payload
from errands.store.postgres.sql import (
    COMMIT,
    COMMIT_ONE,
    COMMIT_SEEN,
    COMMIT_SEEN_ONE,
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
)
from errands.store.records import Receipt
from errands.store.shared import TxBase, op_error

_SEQ = COLUMNS.index("seq")
if TYPE_CHECKING:
    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record] | asyncpg.Connection


class _Unseen(Exception):
    """A change decided on rows as seen needed a row it was not given: run it as usual."""


class YoungerWrite(Exception):
    """A row this transaction read was last written by a younger transaction: run again, younger."""


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
        #: What precedes the events written, as the last statement that wrote some read it
        #: (:data:`.sql.AFTER`): ``None`` while another transaction could still commit before them.
        self.after: int | None = None

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
        if not records:  # (every create refused before it was written: nothing to send)
            return
        ordinals = range(self.ordinal + 1, self.ordinal + 1 + len(records))
        self.ordinal += len(records)
        snapshots = [r.public_json() for r in records]
        hint = hints((EventType.CREATED, r.waits) for r in records)
        notice = payload(hint, claimable((EventType.CREATED, r.waits, r.type) for r in records))
        # The events, for the notification to carry, when they are the transaction's first (as
        # the statement writes them to the log: every create is pending).
        carried = (
            events_text(
                [
                    (o, EventType.CREATED.value, r.updated_at, r.id, r.owner, r.type, Status.PENDING.value, s)
                    for o, r, s in zip(ordinals, records, snapshots, strict=True)
                ]
            )
            if ordinals[0] == 1
            else ""
        )
        if len(records) == 1:
            row = await self.conn.fetchrow(
                INSERT_TASK, *values(records[0], INSERTED), ordinals[0], snapshots[0], notice, channels(hint),
                carried,
            )  # fmt: skip
            created = [] if row is None else [(records[0].id, row[0], row[2])]
        else:
            rows = [values(r, INSERTED) for r in records]
            arrays = [[row[i] for row in rows] for i in range(len(INSERTED))]
            created = [
                (i, q, after)
                for i, q, _, after in await self.conn.fetch(
                    INSERT_TASKS, *arrays, list(ordinals), snapshots, notice, channels(hint), carried
                )
            ]
        seqs = {i: q for i, q, _ in created}
        if created:
            self.after = created[0][2]
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
        # Only a commit whose events are all here (none written before, by a create): a hub
        # that took these would pass the others.
        carried = "" if self.written else events_text(list(zip(*event_arrays, strict=True)))
        # One change of one row passes its values as they are: asyncpg checks each array and
        # each element of one before it encodes them (some 200 checks for one row's 43 arrays).
        one = len(self.pending) == 1
        columns: list[Any] = [*row_arrays, *event_arrays]
        if one:
            columns = [c[0] for c in columns]
        args = [first + len(self.pending) - 1, *columns, notice, channels(hint), carried]
        if self.seen is None:
            row = await self.conn.fetchrow(COMMIT_ONE if one else COMMIT, *args)
        else:
            seen = [self.seen[f.id] for f in finals]
            as_seen: list[Any] = [
                [x.id for x in seen], [x.seq for x in seen], [x.lease_expires_at for x in seen],
                [x.poll_at for x in seen],
            ]  # fmt: skip
            if one:
                as_seen = [a[0] for a in as_seen]
            row = await self.conn.fetchrow(COMMIT_SEEN_ONE if one else COMMIT_SEEN, *args, *as_seen)
        assert row is not None  # one row, always
        if self.seen is not None:
            self.unwritten = {r.id for r in finals} - set(row[1])
        base, self.after = row[0], row[-1]
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
