"""Usage on both stores: per day (UTC, of the submit), owner and type, counted from the tasks
while they are stored and from the rollups once they are purged, the same figures either way;
and over HTTP, each owner its own."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from errands import Errands, TaskContext, model
from errands.clock import ManualClock
from errands.model.usage import DayUsage, utc_day
from errands.store.base import Store
from errands.store.records import ClaimSpec
from tests.integration.conftest import RuntimeFactory, http, new_task, wait_task

DAY = 86_400.0


def cursor(parts: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def figures(rows: list[DayUsage]) -> list[tuple[str, str, str, dict[str, int], int, int]]:
    return [
        (r.day, r.owner, r.type, {k: v for k, v in r.by_status().items() if v}, r.charged, r.reserved)
        for r in rows
    ]


async def everything(store: Store, first: dt.date, last: dt.date, **filters: Any) -> list[DayUsage]:
    """Every row of a range, read a page of two at a time."""
    rows: list[DayUsage] = []
    after = ("", "", "")
    while page := await store.usage(first=first, last=last, after=after, limit=2, **filters):
        rows.extend(page)
        after = (page[-1].day, page[-1].owner, page[-1].type)
    return rows


async def test_usage_counts_per_day_owner_and_type_and_survives_a_purge(
    store: Store, clock: ManualClock
) -> None:
    # The last moment of one day and the first of the next, UTC.
    midnight = (int(clock.now() // DAY) + 1) * DAY
    clock.advance(midnight - clock.now() - 0.0004)  # SQLite would round this to the next day
    day1 = utc_day(clock.now())
    await store.grant("alice", 100)
    await store.create(new_task("a1", cost=7))  # alice, work, costs 7
    await store.create(new_task("a2", type="other"))
    await store.create(new_task("b1", owner="bob", type="other"))
    clock.advance(0.0004)
    day2 = utc_day(clock.now())
    assert day2 > day1
    await store.create(new_task("a3", cost=5))
    await store.create(new_task("a4"))
    # a1 completes (charged 7), a3 is cancelled (5 given back), a4 runs, the rest wait.
    [claimed] = await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=1, lease_s=30)
    assert claimed.id == "a1"
    token = claimed.lease_token
    await store.apply("a1", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=1))
    await store.apply("a3", lambda r: model.cancel(r, now=clock.now()))
    [running] = await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=1, lease_s=30)
    assert running.id == "a4"

    first, last = dt.date.fromisoformat(day1), dt.date.fromisoformat(day2)
    expected = [
        (day1, "alice", "other", {"pending": 1}, 0, 0),
        (day1, "alice", "work", {"completed": 1}, 7, 0),
        (day1, "bob", "other", {"pending": 1}, 0, 0),
        (day2, "alice", "work", {"cancelled": 1, "processing": 1}, 0, 0),
    ]
    assert figures(await everything(store, first, last)) == expected
    assert [r.submitted for r in await everything(store, first, last)] == [1, 1, 1, 2]
    # Filters and ranges.
    assert figures(await everything(store, first, last, owner="bob")) == [expected[2]]
    assert figures(await everything(store, first, last, type="work")) == [expected[1], expected[3]]
    assert figures(await everything(store, last, last)) == [expected[3]]
    assert await everything(store, last + dt.timedelta(days=1), last + dt.timedelta(days=9)) == []

    # The ended tasks are purged: the figures do not change, read as rollups.
    clock.advance(60)
    purged = await store.purge(finished_before=clock.now(), tombstones_before=0, limit=100)
    assert purged == 2 and await store.get("a1") is not None  # a tombstone now
    assert figures(await everything(store, first, last)) == expected
    # Another task of day 2 ends the same way and is purged too: the rollup adds up.
    await store.apply("a4", lambda r: model.cancel(r, now=clock.now()))
    clock.advance(60)
    assert await store.purge(finished_before=clock.now(), tombstones_before=0, limit=100) == 1
    day2_row = (day2, "alice", "work", {"cancelled": 2}, 0, 0)
    assert figures(await everything(store, first, last)) == [*expected[:3], day2_row]


async def test_a_cost_held_by_unfinished_tasks_shows_as_reserved(store: Store, clock: ManualClock) -> None:
    await store.grant("alice", 50)
    await store.create(new_task("a1", cost=20))
    await store.create(new_task("a2", cost=3))
    today = dt.date.fromisoformat(utc_day(clock.now()))
    [row] = await store.usage(first=today, last=today)
    assert (row.submitted, row.charged, row.reserved) == (2, 0, 23)


app = Errands()


@app.task("quick")
async def quick(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    return {}


async def test_usage_over_http(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app)
    async with http(runtime) as admin:
        for owner, n in (("carol", 3), ("dave", 1)):
            for i in range(n):
                r = await admin.post(
                    "/v1/tasks", json={"type": "quick", "id": f"{owner}-{i}", "owner": owner}
                )
                assert r.status_code == 202
        for task_id in ("carol-0", "carol-1", "carol-2", "dave-0"):
            await wait_task(runtime, task_id)
        today = utc_day(runtime.clock.now())
        everyone = (await admin.get("/v1/usage")).json()
        assert everyone["until"] == today
        since = dt.date.fromisoformat(today) - dt.timedelta(days=29)
        assert everyone["since"] == since.isoformat()  # the last 30 days
        assert [(u["owner"], u["submitted"], u["statuses"]["completed"]) for u in everyone["usage"]] == [
            ("carol", 3, 3),
            ("dave", 1, 1),
        ]
        assert everyone["next_after"] is None
        first = (await admin.get("/v1/usage", params={"limit": 1})).json()
        assert [u["owner"] for u in first["usage"]] == ["carol"] and first["next_after"]
        rest = (await admin.get("/v1/usage", params={"limit": 1, "after": first["next_after"]})).json()
        assert [u["owner"] for u in rest["usage"]] == ["dave"] and rest["next_after"] is None
        mine = (await admin.get("/v1/usage", params={"owner": "dave", "since": today, "until": today})).json()
        assert [u["owner"] for u in mine["usage"]] == ["dave"]
        # Refused, each with a clear reason and nothing else.
        for params, status in (
            ({"since": "2026-12-07", "until": "2026-12-06"}, 422),
            ({"since": "2025-01-01", "until": "2026-12-06"}, 422),  # more than 366 days
            ({"since": "yesterday"}, 422),
            ({"since": "1969-12-31"}, 422),
            ({"until": "9999-12-31"}, 422),
            ({"limit": 0}, 422),
            ({"limit": 1.5}, 422),
            ({"after": "not-a-cursor"}, 400),
            ({"after": "W10"}, 400),  # base64 of [] — well formed, not ours
            ({"after": cursor(["\u0000", "", ""])}, 400),  # the same answer on both stores
            ({"after": cursor(["2026-12-06", "x" * 300, ""])}, 400),
            ({"after": cursor(["2026-12-06", "carol", "no such type!"])}, 400),
            ({"type": "no such type!"}, 422),
        ):
            answer = await admin.get("/v1/usage", params=params)
            assert answer.status_code == status, (params, answer.text)
            assert answer.json()["error"]["message"]
        early = (await admin.get("/v1/usage", params={"until": "1970-01-05"})).json()
        assert (early["since"], early["usage"]) == ("1970-01-01", [])  # the default range starts no earlier
        token = (await admin.post("/v1/tokens", json={"owner": "carol"})).json()["token"]
        one_task = (await admin.post("/v1/tokens", json={"owner": "carol", "task_id": "carol-0"})).json()[
            "token"
        ]
    async with http(runtime, one_task) as scoped:  # it reads its task, not the owner's accounts
        assert (await scoped.get("/v1/tasks/carol-0")).status_code == 200
        for path in ("/v1/usage", "/v1/credits", "/v1/credits/ledger"):
            refused = await scoped.get(path)
            assert refused.status_code == 403, (path, refused.text)
    async with http(runtime, token) as carol:
        own = (await carol.get("/v1/usage")).json()
        assert [u["owner"] for u in own["usage"]] == ["carol"]
        assert (await carol.get("/v1/usage", params={"owner": "dave"})).status_code == 404
        assert (await carol.get("/v1/usage", params={"owner": "carol"})).status_code == 200


@pytest.mark.parametrize("at", [0.0, 1_800_000_000.0, 1_800_086_399.999])
def test_a_day_is_the_utc_day(at: float) -> None:
    assert utc_day(at) == dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d")
