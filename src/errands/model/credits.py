"""Credits: what an owner may spend, and what its tasks' costs do to it. No I/O.

An owner has a ``balance`` (credits it may spend now) and ``reserved`` credits (held by its
unfinished tasks). A task with a ``cost`` reserves it when it is created (refused, ``402``, when
the balance cannot cover it); its end charges it (``completed``) or gives it back (``failed``,
``timeout``, ``cancelled``); a manual retry reserves it again. Each move is one ledger entry,
written in the transaction of the change that made it, so it happens exactly once, whatever
crashes and retries: the sums of the ledger's ``amount`` and ``held`` are the balance and the
reserved credits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from errands.model.task import Status, TaskRecord

MoveKind = Literal["grant", "reserve", "charge", "release"]
#: The most credits one move may carry, and an owner may hold (64-bit columns, JSON-safe).
MAX_CREDITS = 10**15
#: The most one task may cost: a day's sums of costs per owner, type and status (the usage
#: rollups) stay far inside 64 bits at any rate of tasks.
MAX_COST = 10**9


@dataclass(frozen=True, slots=True)
class CreditMove:
    """One change of an owner's credits: ``amount`` to its balance, ``held`` to its reserved."""

    kind: MoveKind
    amount: int
    held: int


@dataclass(frozen=True, slots=True)
class Balance:
    """An owner's credits as stored (``0``/``0`` for an owner never granted any)."""

    owner: str
    balance: int = 0
    reserved: int = 0
    updated_at: float | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One move, as written: the balance and reserved credits right after it."""

    id: int
    owner: str
    kind: MoveKind
    amount: int
    held: int
    balance: int
    reserved: int
    at: float
    task_id: str | None = None
    note: str | None = None


def credit_move(before: TaskRecord | None, after: TaskRecord) -> CreditMove | None:
    """What a change of a task (``before`` is ``None`` for its creation) does to its owner's
    credits: reserve its cost as it is created or manually retried, charge it as it completes,
    give it back as it ends otherwise; nothing for a task without a cost, nor for any other
    change (a claim, a progress report, an automatic retry keep the reservation)."""
    cost = after.cost
    if cost <= 0:
        return None
    if before is None:
        return CreditMove("reserve", -cost, cost)
    if before.status.terminal:
        if after.status is Status.PENDING:  # a manual retry
            return CreditMove("reserve", -cost, cost)
        return None
    if not after.status.terminal:
        return None
    if after.status is Status.COMPLETED:
        return CreditMove("charge", 0, -cost)
    return CreditMove("release", cost, -cost)


def after_move(balance: Balance, move: CreditMove, *, now: float) -> Balance | None:
    """The owner's credits after ``move``, or ``None`` when its balance cannot cover it."""
    new_balance = balance.balance + move.amount
    if new_balance < 0 or new_balance > MAX_CREDITS:
        return None
    return Balance(balance.owner, new_balance, balance.reserved + move.held, now)
