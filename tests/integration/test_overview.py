"""The console's API on both stores: filtered lists, counts, bulk actions a page at a time, series."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from errands import Errands, TaskContext
from errands.auth import SYSTEM
from errands.clock import ManualClock, iso
from errands.service import TokenRequest
from tests.integration.conftest import RuntimeFactory, http, wait_task


def plain_app() -> Errands:
    app = Errands()

    @app.task("work")
    async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
        if input.get("fail"):
            raise RuntimeError("no")

    @app.task("other")
    async def other(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    return app


async def test_lists_and_counts_narrow_on_the_server(runtime_factory: RuntimeFactory) -> None:
    clock = ManualClock(datetime(2026, 12, 4, 12, 0, tzinfo=UTC).timestamp())
    runtime = await runtime_factory(plain_app(), workers=False, clock=clock)
    async with http(runtime) as admin:
        for i in range(6):
            await admin.post("/v1/tasks", json={"type": "work", "id": f"img-{i}", "owner": "alice"})
            clock.advance(60)
        for i in range(3):
            await admin.post("/v1/tasks", json={"type": "other", "id": f"doc-{i}", "owner": "bob"})
        noon = iso(datetime(2026, 12, 4, 12, 0, tzinfo=UTC).timestamp())
        three_past = iso(datetime(2026, 12, 4, 12, 3, tzinfo=UTC).timestamp())

        async def ids(**params: Any) -> list[str]:
            answer = await admin.get("/v1/tasks", params=params)
            assert answer.status_code == 200, answer.text
            return [t["id"] for t in answer.json()["tasks"]]

        async def count(**params: Any) -> int:
            answer = await admin.get("/v1/tasks/count", params=params)
            assert answer.status_code == 200, answer.text
            return int(answer.json()["count"])

        assert await ids(id_prefix="img-") == [f"img-{i}" for i in reversed(range(6))]
        assert await ids(id_prefix="doc") == ["doc-2", "doc-1", "doc-0"]
        assert await ids(created_after=noon, created_before=three_past) == ["img-2", "img-1", "img-0"]
        assert await count() == 9 and await count(type="other") == 3 and await count(owner="alice") == 6
        assert await count(id_prefix="img", created_after=three_past) == 3
        assert (await admin.get("/v1/tasks/count", params={"created_after": "yesterday"})).status_code == 422
        assert (await admin.get("/v1/tasks", params={"id_prefix": "a b"})).status_code == 422
    bob = runtime.service.mint_token(TokenRequest(owner="bob"), SYSTEM)["token"]
    async with http(runtime, bob) as client:
        assert (await client.get("/v1/tasks/count")).json() == {"count": 3}  # only bob's
        assert (await client.get("/v1/tasks/count", params={"owner": "alice"})).status_code == 403


async def test_bulk_cancel_goes_a_page_at_a_time_and_touches_only_the_selection(
    runtime_factory: RuntimeFactory,
) -> None:
    runtime = await runtime_factory(plain_app(), workers=False)
    async with http(runtime) as admin:
        bodies = [{"type": "work", "id": f"w{i:02d}", "owner": "alice"} for i in range(25)]
        bodies += [{"type": "other", "id": f"o{i}", "owner": "alice"} for i in range(3)]
        await admin.post("/v1/tasks/batch", json={"tasks": bodies})
        selection = {"type": "work"}
        assert (await admin.get("/v1/tasks/count", params=selection)).json()["count"] == 25
        cursor, calls, done = None, 0, 0
        while True:
            body = {"action": "cancel", "selection": selection, "limit": 10, "cursor": cursor}
            answer = await admin.post("/v1/tasks/bulk", json=body)
            assert answer.status_code == 200, answer.text
            result = answer.json()
            calls, done, cursor = calls + 1, done + result["done"], result["next_cursor"]
            if cursor is None:
                break
        assert (calls, done) == (3, 25)
        assert (await admin.get("/v1/tasks/count", params={"status": "cancelled"})).json()["count"] == 25
        assert (await admin.get("/v1/tasks/count", params={"status": "pending"})).json()["count"] == 3
        again = await admin.post("/v1/tasks/bulk", json={"action": "cancel", "selection": selection})
        assert again.json() == {"done": 0, "skipped": 0, "next_cursor": None}
        refused = await admin.post("/v1/tasks/bulk", json={"action": "delete", "selection": selection})
        assert refused.status_code == 422


async def test_bulk_retry_skips_what_cannot_be_retried_and_owners_touch_only_their_own(
    runtime_factory: RuntimeFactory,
) -> None:
    runtime = await runtime_factory(plain_app(), default_max_attempts=1, max_manual_retries=1)
    async with http(runtime) as admin:
        for owner in ("alice", "bob"):
            for i in range(3):
                body = {"type": "work", "id": f"{owner}-{i}", "owner": owner, "input": {"fail": True}}
                await admin.post("/v1/tasks", json=body)
        for owner in ("alice", "bob"):
            for i in range(3):
                await wait_task(runtime, f"{owner}-{i}")
        await admin.post("/v1/tasks/alice-0/retry")  # its one manual retry, used
        await wait_task(runtime, "alice-0", until=lambda r: r.status.terminal and r.manual_retries == 1)
    alice = runtime.service.mint_token(TokenRequest(owner="alice"), SYSTEM)["token"]
    async with http(runtime, alice) as client:
        result = (await client.post("/v1/tasks/bulk", json={"action": "retry"})).json()
    assert result == {"done": 2, "skipped": 1, "next_cursor": None}
    for i in range(3):
        bob_task = await runtime.store.get(f"bob-{i}")
        assert bob_task is not None and bob_task.manual_retries == 0  # type: ignore[union-attr]


async def test_series_count_per_minute_and_time_by_type(runtime_factory: RuntimeFactory) -> None:
    clock = ManualClock(datetime(2026, 12, 4, 12, 0, 30, tzinfo=UTC).timestamp())
    runtime = await runtime_factory(plain_app(), clock=clock, default_max_attempts=1)
    async with http(runtime) as admin:
        for i in range(3):
            await admin.post("/v1/tasks", json={"type": "work", "id": f"ok-{i}"})
        await admin.post("/v1/tasks", json={"type": "work", "id": "bad", "input": {"fail": True}})
        for task_id in ("ok-0", "ok-1", "ok-2", "bad"):
            await wait_task(runtime, task_id)
        clock.advance(60)
        await admin.post("/v1/tasks", json={"type": "other", "id": "later", "delay_s": 3600})
        answer = await admin.get("/v1/stats/series")
        assert answer.status_code == 200, answer.text
        series = answer.json()
        day = (await admin.get("/v1/stats/series", params={"window": "day"})).json()
        assert (await admin.get("/v1/stats/series", params={"window": "week"})).status_code == 422
    assert series["step_s"] == 60 and len(series["buckets"]) == 60
    noon, next_minute = series["buckets"][-2], series["buckets"][-1]
    assert noon == {"at": "2026-12-04T12:00:00.000Z", "submitted": 4, "completed": 3, "failed": 1}
    assert next_minute == {"at": "2026-12-04T12:01:00.000Z", "submitted": 1, "completed": 0, "failed": 0}
    assert series["by_type"]["work"]["run_time_s"]["n"] == 4
    assert day["step_s"] == 900, day and sum(b["submitted"] for b in day["buckets"]) == 5


async def test_counts_by_status_come_in_one_read(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(plain_app(), workers=False)
    async with http(runtime) as admin:
        for i in range(4):
            await admin.post("/v1/tasks", json={"type": "work", "id": f"c{i}"})
        await admin.post("/v1/tasks/c0/cancel")
        answer = (await admin.get("/v1/tasks/count", params={"by": "status", "type": "work"})).json()
        assert (await admin.get("/v1/tasks/count", params={"by": "owner"})).status_code == 422
    assert answer["count"] == 4
    assert answer["by_status"] == {
        "pending": 3, "processing": 0, "completed": 0, "failed": 0, "timeout": 0, "cancelled": 1
    }  # fmt: skip


async def test_a_bulk_page_is_as_large_as_asked_not_a_lists_page(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(plain_app(), workers=False)
    async with http(runtime) as admin:
        for first in range(0, 620, 310):
            bodies = [{"type": "work", "id": f"b{i:04d}"} for i in range(first, first + 310)]
            assert (await admin.post("/v1/tasks/batch", json={"tasks": bodies})).status_code == 200
        first_call = (await admin.post("/v1/tasks/bulk", json={"action": "cancel"})).json()
        assert first_call["done"] == 500 and first_call["next_cursor"] is not None
        body = {"action": "cancel", "cursor": first_call["next_cursor"]}
        second_call = (await admin.post("/v1/tasks/bulk", json=body)).json()
        assert second_call == {"done": 120, "skipped": 0, "next_cursor": None}
        misspelt = {"action": "cancel", "selection": {"tpye": "work"}}  # must not mean "every task"
        assert (await admin.post("/v1/tasks/bulk", json=misspelt)).status_code == 422


async def test_an_id_prefix_matches_by_the_ids_bytes(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(plain_app(), workers=False)
    async with http(runtime) as admin:
        ids = ["img1", "imgA", "img-x", "img_z", "imgz", "imh", "im", "IMG2", "xim"]
        await admin.post("/v1/tasks/batch", json={"tasks": [{"type": "work", "id": i} for i in ids]})
        found = (await admin.get("/v1/tasks", params={"id_prefix": "img"})).json()["tasks"]
    assert sorted(t["id"] for t in found) == sorted(["img1", "imgA", "img-x", "img_z", "imgz"])
