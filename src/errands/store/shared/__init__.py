"""What both stores do, written once: every operation's logic, over a dialect's statements.

A dialect (``errands.store.sqlite``, ``errands.store.postgres``) supplies only persistence: its
statements (:class:`~errands.store.statements.Statements`), reads (:meth:`Dialect._fetch`), its
write path (:meth:`Dialect._write`, which runs an operation in a transaction) and the few steps
whose mechanics differ (locking a row, appending an event, finding a report's task), through
the :class:`Tx` it hands each operation. The operations in this package are the rest: what is
read, in which order, and which decision (a pure function of :mod:`errands.model` or passed in
by the caller) is run on the rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, TypeVar

from errands.clock import Clock
from errands.errors import ErrandsError, InsufficientCredits, NotFound, StoreError
from errands.model import Change, TaskRecord
from errands.model.credits import Balance, CreditMove, after_move, credit_move
from errands.store.base import Changes, Decision
from errands.store.records import Receipt
from errands.store.statements import Statements

T = TypeVar("T")
#: How an operation may be run: ``batch`` with whatever else is queued; ``alone`` as one
#: statement when nothing else is queued (PostgreSQL: in autocommit); ``first`` first in its
#: transaction (a claim, which takes the transaction's id as it locks); ``own`` in a transaction
#: of its own (notification bookkeeping that touches no task). SQLite runs every mode alike.
Mode = Literal["batch", "alone", "first", "own"]


class Tx(Protocol):
    """One write transaction, as an operation sees it."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Any | None: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it affected."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def load(self, task_id: str) -> TaskRecord | None:
        """The task's row, locked for the rest of the transaction (as this transaction sees it)."""

    async def lock(self, task_ids: Iterable[str]) -> None:
        """Lock several rows at once, for the changes that will load them."""

    async def insert(self, record: TaskRecord) -> bool:
        """Insert a new task with its event; ``False`` (nothing written) if its id is taken, or
        was taken by a task since purged."""

    async def insert_many(self, records: Sequence[TaskRecord]) -> list[bool]:
        """:meth:`insert` for each record, in as few statements as the dialect can (a later
        record with an id an earlier one took is not inserted)."""

    def write(self, change: Change, before: TaskRecord) -> TaskRecord:
        """Write a decided change of ``before`` (the row as loaded) with its event."""

    async def apply(self, task_id: str, decide: Decision) -> TaskRecord: ...

    async def write_changes(self, changes: Changes, current: TaskRecord) -> TaskRecord:
        """Write what a decision asked for (nothing, a change, or changes in order), with the
        credit moves they make (raises :class:`InsufficientCredits` when one cannot be paid)."""

    async def cover_credits(self, owner: str, move: CreditMove) -> None:
        """Raise :class:`InsufficientCredits` unless the owner's credits cover ``move``; they stay
        as they are (held) for the rest of the transaction."""

    async def move_credits(
        self, owner: str, move: CreditMove, *, now: float, task_id: str | None = None, note: str | None = None
    ) -> Balance:
        """Apply ``move`` to the owner's credits and write its ledger entry; raise
        :class:`InsufficientCredits` (nothing written) when the balance cannot cover it."""

    async def mark(self) -> object:
        """A point to undo back to (``reset``) or keep (``release``)."""

    async def reset(self, mark: object) -> None: ...

    async def release(self, mark: object) -> None: ...

    def recoverable(self, exc: Exception) -> bool:
        """Whether the transaction can go on after ``exc`` undone back to a mark."""

    async def add_receipt(self, receipt: Receipt) -> None: ...

    async def lock_scopes(self, scopes: Sequence[str]) -> set[str]:
        """Take the flow-control scopes this claim counts (:mod:`errands.model.flow`) for the
        rest of the transaction, never waiting: the ones taken (another claim counts the rest,
        and may start one more of them)."""

    async def lock_keys(self, keys: Sequence[str]) -> None:
        """Take ``keys`` for the rest of the transaction, so that writes that must see each
        other's rows (a debounce key's) go one at a time; one held by another transaction makes
        this one run again once it has ended."""

    def started(self, records: Sequence[TaskRecord]) -> None:
        """This transaction started ``records``, for the counts of a later claim in it."""

    def own_starts(self) -> list[tuple[str, str, str | None, int]]:
        """``(type, owner, key, count)`` of the tasks this transaction started that a query of
        the running tasks does not count yet (not written until the transaction ends)."""

    async def report_target(
        self, receipt: Receipt, job: tuple[Sequence[str], str] | None
    ) -> tuple[bool, TaskRecord | None]:
        """For a provider's report: whether its delivery id is new (and now remembered), and the
        task it is about, locked (``None`` when there is none)."""


#: An operation's future, and what to settle it with: its result, or the error it met.
Settlement = tuple["asyncio.Future[Any]", Any, BaseException | None]


def settle(results: Sequence[Settlement]) -> None:
    """Resolve each caller's future (after the commit: durable before acknowledged)."""
    for future, result, error in results:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def op_error(exc: BaseException) -> bool:
    """An error an operation raised on its own (refused, not found…), not a database's."""
    return isinstance(exc, ErrandsError | ValueError) and not isinstance(exc, StoreError)


def as_errands_error(exc: Exception) -> Exception:
    """``exc`` as callers may see it: an operation's own error as it is, a driver's as a
    :class:`StoreError` (with the driver's error as its cause)."""
    if isinstance(exc, ErrandsError | ValueError):
        return exc
    error = StoreError("The database could not save the change.")
    error.__cause__ = exc
    return error


class TxBase:
    """What every dialect's transaction does the same way."""

    sql: Statements  # the dialect's

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    async def execute(self, sql: str, *args: Any) -> int:
        raise NotImplementedError

    async def load(self, task_id: str) -> TaskRecord | None:
        raise NotImplementedError

    def write(self, change: Change, before: TaskRecord) -> TaskRecord:
        raise NotImplementedError

    async def apply(self, task_id: str, decide: Decision) -> TaskRecord:
        current = await self.load(task_id)
        if current is None:
            raise NotFound()
        return await self.write_changes(decide(current), current)

    async def write_changes(self, changes: Changes, current: TaskRecord) -> TaskRecord:
        """Write what a decision asked for, in order, each change with the credit move it makes
        (:func:`errands.model.credits.credit_move`); the record as it is after."""
        for change in () if changes is None else (changes,) if isinstance(changes, Change) else changes:
            move = credit_move(current, change.record)
            current = self.write(change, current)
            if move is not None:
                await self.move_credits(current.owner, move, now=current.updated_at, task_id=current.id)
        return current

    async def cover_credits(self, owner: str, move: CreditMove) -> None:
        await self._after(owner, move, now=0.0)

    async def _after(self, owner: str, move: CreditMove, *, now: float) -> Balance:
        """The owner's credits after ``move`` (its balance locked, never waited for, for the
        rest of the transaction), or :class:`InsufficientCredits`."""
        rows = await self.fetch(self.sql.lock_balance, owner)
        current = Balance(*rows[0]) if rows else Balance(owner)
        after = after_move(current, move, now=now)
        if after is None:
            raise InsufficientCredits(
                f"The owner has {current.balance} credits; this takes {-move.amount}."
                if move.amount < 0
                else "The owner's credits cannot hold that many."
            )
        return after

    async def move_credits(
        self, owner: str, move: CreditMove, *, now: float, task_id: str | None = None, note: str | None = None
    ) -> Balance:
        after = await self._after(owner, move, now=now)
        await self.execute(self.sql.set_balance, owner, after.balance, after.reserved, now)
        await self.execute(
            self.sql.insert_ledger, owner, move.kind, move.amount, move.held, after.balance, after.reserved, now,
            task_id, note,
        )  # fmt: skip
        return after


class Dialect:
    """What the shared operations need of a store (the dialect fills it in)."""

    sql: Statements
    clock: Clock
    #: Whether event snapshots are stored with their seq (SQLite) or get it when read (PostgreSQL).
    snapshots_have_seq: bool = True

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a read, outside any write transaction."""
        raise NotImplementedError

    async def _fetch_heavy(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a read that scans much (statistics), kept off the write path's way."""
        return await self._fetch(sql, *args)

    async def _write(
        self,
        op: Callable[[Tx], Awaitable[T]],
        *,
        mode: Mode = "batch",
        task_id: str | None = None,
        creates: TaskRecord | None = None,
        seen: TaskRecord | None = None,
    ) -> T:
        """Run ``op`` in a write transaction (see :data:`Mode`); ``task_id``, when known, is the
        task it will load (locked with the others' of its batch); ``creates``, the record ``op``
        inserts first, if it does (written with the batch's other creates in one statement);
        ``seen``, the row ``task_id`` as the caller last saw it (see ``Tasks.apply``)."""
        raise NotImplementedError

    def _where(self, conditions: Sequence[tuple[str, tuple[Any, ...] | None]]) -> tuple[str, list[Any]]:
        """``WHERE`` of the conditions that apply (those whose values are not ``None``; each
        ``{}`` in a condition is one value's placeholder) and their values. Only the filters
        given are in the statement, so each combination gets a plan that uses its index."""
        clauses: list[str] = []
        args: list[Any] = []
        for condition, values in conditions:
            if values is None:
                continue
            marks = []
            for value in values:
                args.append(value)
                marks.append(self.sql.param(len(args)))
            clauses.append(condition.format(*marks))
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", args

    async def _first(self, sql: str, *args: Any) -> Any:
        """The first column of the first row of a read (``None`` without rows)."""
        rows = await self._fetch(sql, *args)
        return rows[0][0] if rows else None
