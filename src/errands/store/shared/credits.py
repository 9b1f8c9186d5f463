"""Credits and usage: grants, and reads of balances, the ledger and usage. A task's own moves (reserve, charge,
release) are made by the write of its change (:meth:`TxBase.write_changes`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from errands.model.credits import Balance, CreditMove, LedgerEntry
from errands.model.usage import DayUsage, day_range
from errands.store.shared import Dialect, Tx


class CreditOps(Dialect):
    async def grant(self, owner: str, amount: int, *, note: str | None = None) -> Balance:
        move = CreditMove("grant", amount, 0)
        now = self.clock.now()

        async def op(tx: Tx) -> Balance:
            return await tx.move_credits(owner, move, now=now, note=note)

        return await self._write(op)

    async def balance(self, owner: str) -> Balance:
        rows = await self._fetch(self.sql.select_balance, owner)
        return Balance(*rows[0]) if rows else Balance(owner)

    async def balances(self, *, after: str, limit: int) -> list[Balance]:
        return [Balance(*row) for row in await self._fetch(self.sql.list_balances, after, limit)]

    async def ledger(self, owner: str | None, *, after: int, limit: int) -> list[LedgerEntry]:
        if owner is None:
            rows = await self._fetch(self.sql.select_all_ledger, after, limit)
        else:
            rows = await self._fetch(self.sql.select_ledger, owner, after, limit)
        return [LedgerEntry(*row) for row in rows]

    async def usage(
        self,
        *,
        first: dt.date,
        last: dt.date,
        owner: str | None = None,
        type: str | None = None,
        after: tuple[str, str, str] = ("", "", ""),
        limit: int = 1000,
    ) -> list[DayUsage]:
        since, until = day_range(first, last)
        args: list[Any] = [since, until, first.isoformat(), last.isoformat(), *after, limit]
        where = ""
        for column, value in (("owner", owner), ("type", type)):
            if value is not None:
                args.append(value)
                where += f" AND {column} = {self.sql.param(len(args))}"
        sql = self.sql.usage.format(tasks_where=where, days_where=where)
        return [
            DayUsage(r[0], r[1], r[2], tuple(r[3:-2]), r[-2], r[-1]) for r in await self._fetch(sql, *args)
        ]
