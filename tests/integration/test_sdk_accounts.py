"""The Python SDK's typed results: stats, credits, the ledger and usage, over the real API."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest

from errands import Errands, TaskContext
from errands.api import create_api
from errands.client import AsyncClient, CreditBalance, DayUsage, Stats
from errands.errors import InsufficientCredits, NotFound
from errands.model.usage import utc_day
from tests.conftest import ADMIN_KEY
from tests.integration.conftest import RuntimeFactory, http, wait_task

app = Errands()
STATUSES = ("pending", "processing", "completed", "failed", "timeout", "cancelled")


@app.task("photo", cost=4)
async def photo(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    return {}


def sdk(runtime: Any, token: str = ADMIN_KEY) -> AsyncClient:
    return AsyncClient("http://errands", token, transport=httpx.ASGITransport(app=create_api(runtime)))


async def test_stats_credits_ledger_and_usage_are_typed(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app)
    async with sdk(runtime) as admin:
        granted = await admin.grant("erin", 10, note="trial")
        assert granted == CreditBalance("erin", 10, 0, granted.updated_at) and granted.updated_at
        for i in range(2):
            await admin.submit("photo", id=f"p{i}", owner="erin")
        with pytest.raises(InsufficientCredits) as refused:  # 2 left, a photo costs 4
            await admin.submit("photo", id="p2", owner="erin")
        assert refused.value.status_code == 402 and refused.value.code == "insufficient_credits"
        for i in range(2):
            await wait_task(runtime, f"p{i}")

        stats = await admin.stats()
        assert isinstance(stats, Stats) and stats.by_status["completed"] == 2
        assert stats.by_type["photo"] == {"completed": 2} and stats.run_time_s.n == 2

        [balance] = (await admin.balances()).items
        assert (balance.owner, balance.balance, balance.reserved) == ("erin", 2, 0)
        first = await admin.ledger("erin", limit=3)
        rest = await admin.ledger("erin", after=first.next_after)
        assert [e.kind for e in first.items + rest.items] == [
            "grant",
            "reserve",
            "reserve",
            "charge",
            "charge",
        ]
        assert rest.next_after is None and first.items[0].note == "trial"

        today = utc_day(runtime.clock.now())
        page = await admin.usage(since=dt.date.fromisoformat(today), until=today)
        at_noon = dt.datetime.fromisoformat(today + "T12:00:00+00:00")  # a datetime names its day
        assert (await admin.usage(since=at_noon, until=at_noon)).items == page.items
        assert page.items == [
            DayUsage(
                day=today, owner="erin", type="photo", submitted=2,
                statuses={**dict.fromkeys(STATUSES, 0), "completed": 2},
                credits_charged=8, credits_reserved=0,
            )
        ]  # fmt: skip
        token = await admin.mint_token("frank")
    async with sdk(runtime, token) as frank:
        assert (await frank.usage()).items == []  # nothing of his own
        with pytest.raises(NotFound):
            await frank.usage(owner="erin")
        assert [b.owner for b in (await frank.balances()).items] == ["frank"]
    async with http(runtime) as raw:  # what the SDK read is what the API answers
        assert (await raw.get("/v1/credits/ledger", params={"owner": "erin"})).json()["entries"][0][
            "note"
        ] == "trial"
