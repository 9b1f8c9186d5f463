"""Credits and usage: grant (admin), read balances, the ledger and usage (admin, or an owner its
own)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.responses import Response

from errands.api.routing import Call, Route
from errands.clock import iso
from errands.inputs import Owner, Text, TypeName, integral
from errands.model.credits import MAX_CREDITS, Balance, LedgerEntry
from errands.model.usage import DAY_PATTERN, DayUsage


class GrantRequest(BaseModel):
    """The body of ``POST /v1/credits``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    owner: Owner
    amount: Annotated[
        int,
        Field(ge=-MAX_CREDITS, le=MAX_CREDITS, description="Credits to add; negative to take back."),
        integral,
    ]
    note: Annotated[Text, Field(max_length=500)] | None = None


class BalanceOut(BaseModel):
    owner: str
    balance: int = Field(description="Credits the owner may spend now.")
    reserved: int = Field(description="Credits its unfinished tasks hold.")
    updated_at: str | None


class BalancePage(BaseModel):
    balances: list[BalanceOut]
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last.")


class LedgerEntryOut(BaseModel):
    id: int
    owner: str
    kind: str = Field(description="`grant`, `reserve`, `charge` or `release`.")
    amount: int = Field(description="What it did to the balance.")
    held: int = Field(description="What it did to the reserved credits.")
    balance: int
    reserved: int
    at: str
    task_id: str | None
    note: str | None


class LedgerPage(BaseModel):
    entries: list[LedgerEntryOut]
    next_after: int | None = Field(description="Pass as `after` for the next page; null on the last.")


class BalancesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    after: Annotated[Owner, Field(description="The last owner of the previous page.")] | None = None
    limit: Annotated[int, Field(ge=1, le=500), integral] = 100


class LedgerQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    owner: (
        Annotated[Owner, Field(description="Whose ledger (an owner token: its own, the default).")] | None
    ) = None
    after: Annotated[
        int, Field(ge=0, le=2**62, description="The last id of the previous page."), integral
    ] = 0
    limit: Annotated[int, Field(ge=1, le=500), integral] = 100


def _day(value: Any) -> Any:
    """Only ``YYYY-MM-DD`` names a day (not a timestamp, nor a date with a time)."""
    if not isinstance(value, str) or not re.fullmatch(DAY_PATTERN, value):
        raise ValueError("a day is written YYYY-MM-DD")
    return value


#: The days a usage read may name (those whose timestamps every store and client can represent).
Day = Annotated[dt.date, BeforeValidator(_day), Field(ge=dt.date(1970, 1, 1), le=dt.date(9000, 12, 31))]


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    owner: (
        Annotated[Owner, Field(description="Whose usage (an owner token: its own, the default).")] | None
    ) = None
    type: Annotated[TypeName, Field(description="Of this task type only.")] | None = None
    since: (
        Annotated[Day, Field(description="The first day (UTC), `YYYY-MM-DD`; 30 days ago by default.")] | None
    ) = None
    until: Annotated[Day, Field(description="The last day (UTC), included; today by default.")] | None = None
    after: (
        Annotated[Text, Field(max_length=2000, description="`next_after` of the previous page.")] | None
    ) = None
    limit: Annotated[int, Field(ge=1, le=1000), integral] = 500


class DayUsageOut(BaseModel):
    day: str = Field(description="The day (UTC) its tasks were submitted, `YYYY-MM-DD`.")
    owner: str
    type: str
    submitted: int = Field(description="Tasks submitted that day (stored or since purged).")
    statuses: dict[str, int] = Field(description="How many of them are in each status now.")
    credits_charged: int = Field(description="Credits charged for those that completed.")
    credits_reserved: int = Field(description="Credits held by those not ended yet.")


class UsagePageOut(BaseModel):
    since: str
    until: str
    usage: list[DayUsageOut] = Field(description="By day, then owner, then type.")
    next_after: str | None = Field(description="Pass as `after` for the next page; null on the last.")


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def balance_out(b: Balance) -> dict[str, Any]:
    return {"owner": b.owner, "balance": b.balance, "reserved": b.reserved, "updated_at": iso(b.updated_at)}


def entry_out(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": e.id, "owner": e.owner, "kind": e.kind, "amount": e.amount, "held": e.held,
        "balance": e.balance, "reserved": e.reserved, "at": iso(e.at), "task_id": e.task_id, "note": e.note,
    }  # fmt: skip


async def grant(call: Call) -> Response:
    """Add credits to an owner's balance (``amount`` < 0 takes them back): ``402`` when the
    balance cannot go that low. Each grant is a ledger entry."""
    body = await call.json(GrantRequest)
    return _json(
        balance_out(
            await call.runtime.service.accounts.grant(body.owner, body.amount, body.note, call.principal)
        )
    )


async def balances(call: Call) -> Response:
    """Owners' credits, by owner (admin); an owner token sees its own only."""
    q = call.query(BalancesQuery)
    page, next_after = await call.runtime.service.accounts.balances(
        call.principal, after=q.after or "", limit=q.limit
    )
    return _json({"balances": [balance_out(b) for b in page], "next_after": next_after})


async def ledger(call: Call) -> Response:
    """An owner's ledger, oldest first: every grant, and every task's reservation, charge or
    release, with the balance right after it. Its ``amount`` sum to the balance, its ``held``
    to the reserved credits."""
    q = call.query(LedgerQuery)
    page, next_after = await call.runtime.service.accounts.ledger(
        call.principal, q.owner, after=q.after, limit=q.limit
    )
    return _json({"entries": [entry_out(e) for e in page], "next_after": next_after})


def usage_out(u: DayUsage) -> dict[str, Any]:
    return {
        "day": u.day, "owner": u.owner, "type": u.type, "submitted": u.submitted, "statuses": u.by_status(),
        "credits_charged": u.charged, "credits_reserved": u.reserved,
    }  # fmt: skip


async def usage(call: Call) -> Response:
    """What tasks came to, per day (UTC, of their submit), owner and type: how many were
    submitted, how many are in each status, the credits charged and still held. Tasks without a
    cost count too; purged tasks stay counted."""
    q = call.query(UsageQuery)
    page = await call.runtime.service.accounts.usage(
        call.principal, owner=q.owner, type=q.type, first=q.since, last=q.until, after=q.after, limit=q.limit
    )
    return _json({
        "since": page.first.isoformat(), "until": page.last.isoformat(),
        "usage": [usage_out(u) for u in page.rows], "next_after": page.next_after,
    })  # fmt: skip


ROUTES = [
    Route(
        "POST",
        "/v1/credits",
        grant,
        "Grant credits to an owner (admin)",
        "credits",
        body=GrantRequest,
        response=BalanceOut,
        errors=(400, 401, 402, 403, 413, 422),
    ),
    Route(
        "GET",
        "/v1/credits",
        balances,
        "Owners' credits",
        "credits",
        query=BalancesQuery,
        response=BalancePage,
        errors=(401, 403, 422),
    ),
    Route(
        "GET",
        "/v1/credits/ledger",
        ledger,
        "An owner's ledger",
        "credits",
        query=LedgerQuery,
        response=LedgerPage,
        errors=(401, 403, 404, 422),
    ),
    Route(
        "GET",
        "/v1/usage",
        usage,
        "Usage per day, owner and type",
        "credits",
        query=UsageQuery,
        response=UsagePageOut,
        errors=(400, 401, 403, 404, 422),
    ),
]
