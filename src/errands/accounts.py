"""Credits and usage on behalf of a caller: who may grant, and whose balances, ledger and usage
each caller may read (an owner token: its own; another owner's answers ``404``)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from errands.auth import READ, Principal
from errands.clock import Clock
from errands.errors import Forbidden, InvalidCursor, InvalidRequest, NotFound
from errands.inputs import OWNER_MAX_CHARS, TYPE_PATTERN, pack_cursor, unpack_cursor
from errands.model.credits import Balance, LedgerEntry
from errands.model.usage import DAY_PATTERN, MAX_DAYS, DayUsage, utc_day
from errands.store.base import Credits

#: The days a usage read covers when it names none: the last 30, today's included.
DEFAULT_DAYS = 30
#: The first day a usage read may cover.
FIRST_DAY = dt.date(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class UsagePage:
    rows: list[DayUsage]
    first: dt.date
    last: dt.date
    next_after: str | None


def usage_cursor(row: DayUsage) -> str:
    return pack_cursor([row.day, row.owner, row.type])


def decode_usage_cursor(cursor: str) -> tuple[str, str, str]:
    """The (day, owner, type) a usage cursor stands for; :class:`InvalidCursor` for anything
    this service did not make."""
    try:
        parts = unpack_cursor(cursor)
        if not isinstance(parts, list) or len(parts) != 3 or not all(isinstance(p, str) for p in parts):
            raise ValueError
        day, owner, type_ = parts
        if not re.fullmatch(DAY_PATTERN, day) or len(owner) > OWNER_MAX_CHARS or "\0" in owner:
            raise ValueError
        if type_ and not re.fullmatch(TYPE_PATTERN, type_):
            raise ValueError
        return day, owner, type_
    except (ValueError, TypeError):  # a JSONDecodeError is a ValueError
        raise InvalidCursor() from None


class Accounts:
    """The credits and usage operations of the API."""

    def __init__(self, store: Credits, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def grant(self, owner: str, amount: int, note: str | None, principal: Principal) -> Balance:
        if not principal.admin:
            raise Forbidden("Only an admin key may grant credits.")
        return await self.store.grant(owner, amount, note=note)

    async def balances(
        self, principal: Principal, *, after: str, limit: int
    ) -> tuple[list[Balance], str | None]:
        """A page of owners' credits and where the next starts; an owner token: its own."""
        _require_owner_wide(principal)
        if not principal.admin:
            mine = (
                [await self.store.balance(principal.owner or "")] if after < (principal.owner or "") else []
            )
            return mine, None
        page = await self.store.balances(after=after, limit=limit + 1)
        return page[:limit], page[limit - 1].owner if len(page) > limit else None

    async def ledger(
        self, principal: Principal, owner: str | None, *, after: int, limit: int
    ) -> tuple[list[LedgerEntry], int | None]:
        """A page of an owner's ledger (every owner's, for an admin who names none) and where
        the next starts."""
        owner = _whose(principal, owner)
        page = await self.store.ledger(owner, after=after, limit=limit + 1)
        return page[:limit], page[limit - 1].id if len(page) > limit else None

    async def usage(
        self,
        principal: Principal,
        *,
        owner: str | None,
        type: str | None,
        first: dt.date | None,
        last: dt.date | None,
        after: str | None,
        limit: int,
    ) -> UsagePage:
        """A page of usage per (day, owner, type) from ``first`` to ``last`` (UTC days, both
        included; the last 30 days by default), of every owner for an admin who names none."""
        owner = _whose(principal, owner)
        last = last or dt.date.fromisoformat(utc_day(self.clock.now()))
        first = first or max(FIRST_DAY, last - dt.timedelta(days=DEFAULT_DAYS - 1))
        if first > last:
            raise InvalidRequest("'since' is after 'until'.")
        if (last - first).days >= MAX_DAYS:
            raise InvalidRequest(f"A usage read covers at most {MAX_DAYS} days.")
        position = decode_usage_cursor(after) if after else ("", "", "")
        rows = await self.store.usage(
            first=first, last=last, owner=owner, type=type, after=position, limit=limit + 1
        )
        next_after = usage_cursor(rows[limit - 1]) if len(rows) > limit else None
        return UsagePage(rows[:limit], first, last, next_after)


def _whose(principal: Principal, owner: str | None) -> str | None:
    """The owner a read is about: an owner token reads its own (another owner's is not found),
    an admin the one it names (every owner's when it names none)."""
    _require_owner_wide(principal)
    if principal.admin:
        return owner
    if owner is not None and owner != principal.owner:
        raise NotFound()
    return principal.owner or ""


def _require_owner_wide(principal: Principal) -> None:
    """Credits and usage are about all of an owner's tasks: a token scoped to one task reads
    only that task, not them."""
    principal.require(READ)
    principal.require_owner_wide("A token scoped to one task cannot read credits or usage.")
