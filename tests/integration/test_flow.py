"""Flow control on both stores, with the controlled clock: concurrency and rate limits of a
type, a provider's pool, per owner and per key; fairness between keys; ``waiting_for``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from errands import Errands, Limit, TaskContext
from errands.clock import ManualClock
from errands.config import Settings
from errands.model import Bound, Status, TaskRecord, complete
from errands.store import Store, open_store
from errands.store.records import ClaimSpec, TaskQuery
from tests.integration.conftest import RuntimeFactory, http, new_task, wait_task


def spec(*limits: Limit, type: str = "work", pool: tuple[str, ...] | None = None) -> ClaimSpec:
    name = f"type:{type}" if pool is None else "provider:p"
    return ClaimSpec(type, bounds=tuple(Bound(name, pool or (type,), limit) for limit in limits))


async def claim(store: Store, specs: list[ClaimSpec], limit: int = 50) -> list[TaskRecord]:
    return list(await store.claim(worker_id="w", specs=specs, limit=limit, lease_s=30))


async def finish(store: Store, record: TaskRecord, clock: ManualClock) -> None:
    token = record.lease_token
    await store.apply(record.id, lambda r: complete(r, now=clock.now(), lease_token=token, result=None))


async def test_concurrency_of_a_type_holds_across_claims_and_an_end_gives_the_turn_away(
    store: Store, clock: ManualClock
) -> None:
    for i in range(6):
        await store.create(new_task(f"t{i}", owner=f"o{i % 3}"))
    specs = [spec(Limit(concurrency=2))]
    first = await claim(store, specs)
    assert [r.id for r in first] == ["t0", "t1"]
    assert await claim(store, specs) == []
    await finish(store, first[0], clock)
    assert [r.id for r in await claim(store, specs)] == ["t2"]


async def test_a_rate_starts_at_most_burst_at_once_then_one_per_interval(
    store: Store, clock: ManualClock
) -> None:
    for i in range(30):
        await store.create(new_task(f"t{i:02d}"))
    specs = [spec(Limit(rate="10/s", burst=3))]
    started = await store.claim(worker_id="w", specs=specs, limit=50, lease_s=30)
    assert len(started) == 3  # the burst
    # The next start is allowed one interval (0.1 s) later, and the claim says when.
    assert started.retry_at == pytest.approx(clock.now() + 0.1)
    again = await store.claim(worker_id="w", specs=specs, limit=50, lease_s=30)
    assert list(again) == [] and again.retry_at == pytest.approx(clock.now() + 0.1)
    clock.advance(0.099)
    assert await claim(store, specs) == []  # not one tick early
    clock.advance(0.001)
    assert len(await claim(store, specs)) == 1
    # Over any stretch the starts stay within burst + rate x time: 2 s more of claims every 10 ms.
    starts = []
    for _ in range(200):
        clock.advance(0.01)
        starts += [clock.now()] * len(await claim(store, specs))
    assert len(starts) == pytest.approx(20, abs=1)
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            assert j - i + 1 <= 3 + 10 * (starts[j] - starts[i]) + 1e-6


async def test_per_key_limits_count_each_key_apart_and_default_to_the_owner(
    store: Store, clock: ManualClock
) -> None:
    for i in range(3):
        await store.create(new_task(f"a{i}", owner="app", key="customer-a"))
        await store.create(new_task(f"b{i}", owner="app", key="customer-b"))
        await store.create(new_task(f"n{i}", owner="nokey"))  # counted under its owner
    specs = [spec(Limit(concurrency=1, per="key"))]
    started = await claim(store, specs)
    assert sorted(r.id for r in started) == ["a0", "b0", "n0"]
    assert await claim(store, specs) == []
    await finish(store, next(r for r in started if r.id == "b0"), clock)
    assert [r.id for r in await claim(store, specs)] == ["b1"]


async def test_a_key_counts_within_its_owner(store: Store, clock: ManualClock) -> None:
    """Another owner giving the same key, or an owner of the key's name, takes nothing from it."""
    specs = [spec(Limit(concurrency=1, per="key"))]
    for i in range(2):
        await store.create(new_task(f"mine-{i}", owner="alice", key="shared"))
    assert [r.id for r in await claim(store, specs)] == ["mine-0"]
    for i in range(2):
        await store.create(new_task(f"theirs-{i}", owner="mallory", key="shared"))
        await store.create(new_task(f"named-{i}", owner="shared"))
    assert sorted(r.id for r in await claim(store, specs)) == ["named-0", "theirs-0"]
    assert await claim(store, specs) == []


async def test_one_busy_key_cannot_keep_a_claim_from_the_others(store: Store, clock: ManualClock) -> None:
    # Key "big" has far more queued than one claim reads; the other keys wait behind it.
    for i in range(300):
        await store.create(new_task(f"big-{i:03d}", key="big"))
        clock.advance(0.001)
    for name in ("k1", "k2", "k3", "k4"):
        await store.create(new_task(f"{name}-0", key=name))
        clock.advance(0.001)
    specs = [spec(Limit(concurrency=2, rate="5/s", burst=2, per="key"))]
    started = await claim(store, specs, limit=10)
    assert sorted(r.id for r in started) == ["big-000", "big-001", "k1-0", "k2-0", "k3-0", "k4-0"]


async def test_a_provider_pool_is_shared_by_its_types(store: Store, clock: ManualClock) -> None:
    for i in range(3):
        await store.create(new_task(f"img-{i}", type="image"))
        await store.create(new_task(f"vid-{i}", type="video"))
    pool = ("image", "video")
    shared = Limit(concurrency=2)
    specs = [spec(shared, type="image", pool=pool), spec(shared, type="video", pool=pool)]
    started = await claim(store, specs)
    assert len(started) == 2
    assert await claim(store, specs) == []
    await finish(store, started[0], clock)
    assert len(await claim(store, [spec(shared, type="video", pool=pool)])) == 1


async def test_limits_hold_between_the_claims_of_one_transaction_batch(
    store: Store, clock: ManualClock
) -> None:
    # Several claims may share a transaction (PostgreSQL batches them): the starts of the first
    # count for the next, although they are written only at the commit.
    for i in range(10):
        await store.create(new_task(f"t{i}"))
    specs = [spec(Limit(concurrency=3, rate="100/s", burst=5))]
    results = await asyncio.gather(*(claim(store, specs, limit=2) for _ in range(5)))
    # A claim that met another counting the same scope leaves it to the next: never more than 3.
    assert sum(len(r) for r in results) <= 3
    started = sum(len(r) for r in results) + len(await claim(store, specs))
    assert started == 3


def flow_app() -> Errands:
    app = Errands()

    @app.task("work", limits=[Limit(concurrency=1, per="key"), Limit(rate="1/min")])
    async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    return app


async def test_waiting_for_says_why_a_pending_task_waits(runtime_factory: RuntimeFactory) -> None:
    clock = ManualClock()
    app = flow_app()
    runtime = await runtime_factory(app, workers=False, clock=clock)
    async with http(runtime) as client:
        for body in (
            {"type": "work", "id": "first", "key": "k"},
            {"type": "work", "id": "same-key", "key": "k"},
            {"type": "work", "id": "other-key", "key": "j"},
            {"type": "work", "id": "later", "delay_s": 60},
        ):
            assert (await client.post("/v1/tasks", json=body)).status_code == 202
        assert (await client.get("/v1/tasks/first")).json()["waiting_for"] is None  # for a worker
        specs = [ClaimSpec("work", bounds=app.bounds()["work"])]
        assert [r.id for r in await claim(runtime.store, specs)] == ["first"]
        assert (await client.get("/v1/tasks/same-key")).json()["waiting_for"] == "concurrency"
        assert (await client.get("/v1/tasks/other-key")).json()["waiting_for"] == "rate"
        assert (await client.get("/v1/tasks/later")).json()["waiting_for"] == "schedule"
        listed = {t["id"]: t["waiting_for"] for t in (await client.get("/v1/tasks")).json()["tasks"]}
        assert listed == {"first": None, "same-key": "concurrency", "other-key": "rate", "later": "schedule"}
        first = await client.get("/v1/tasks/first")
        assert first.json()["status"] == "processing" and first.json()["key"] == "k"
        clock.advance(60)
        assert (await client.get("/v1/tasks/other-key")).json()["waiting_for"] is None


async def test_a_worker_starts_rate_limited_tasks_as_the_rate_allows(runtime_factory: RuntimeFactory) -> None:
    # No polling to fall back on: the claim's retry_at alone must wake the worker.
    clock = ManualClock()
    app = Errands()

    @app.task("work", limits=[Limit(rate="2/s", burst=1)])
    async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    runtime = await runtime_factory(app, clock=clock, poll_s=3600)
    tasks = [await app.submit("work", id=name) for name in ("a", "b", "c")]  # queue order: by id

    assert (await wait_task(runtime, tasks[0].id)).status is Status.COMPLETED
    second = await runtime.store.get(tasks[1].id)
    assert isinstance(second, TaskRecord) and second.status is Status.PENDING
    clock.advance(0.5)
    assert (await wait_task(runtime, tasks[1].id)).started_at == clock.now()
    clock.advance(0.5)
    assert (await wait_task(runtime, tasks[2].id)).status is Status.COMPLETED


def plain_app() -> Errands:
    app = Errands()

    @app.task("work")
    async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    return app


async def test_debounce_replaces_the_pending_task_of_the_key_and_only_the_owners(
    runtime_factory: RuntimeFactory,
) -> None:
    clock = ManualClock()
    runtime = await runtime_factory(plain_app(), workers=False, clock=clock)
    async with http(runtime) as client:

        async def submit(task_id: str, owner: str = "alice", **fields: Any) -> Any:
            body = {"type": "work", "id": task_id, "owner": owner, "debounce_key": "doc-7", **fields}
            answer = await client.post("/v1/tasks", json=body)
            assert answer.status_code == 202, answer.text
            return answer.json()

        first = await submit("first", debounce_s=5)
        assert first["scheduled_for"] is not None and first["debounce_key"] == "doc-7"
        other = await submit("other-owner", owner="bob")  # another owner's key of the same name: not touched
        clock.advance(1)
        second = await submit("second", debounce_s=5)
        replaced = (await client.get("/v1/tasks/first")).json()
        assert replaced["status"] == "cancelled"
        assert replaced["error"]["code"] == "debounced" and "second" in replaced["error"]["message"]
        assert (await client.get("/v1/tasks/other-owner")).json()["status"] == "pending"
        # The same request again is the same task: it replaces nothing, not even itself.
        again = await client.post(
            "/v1/tasks",
            json={"type": "work", "id": "second", "owner": "alice", "debounce_key": "doc-7", "debounce_s": 5},
        )
        assert again.status_code == 200 and again.json()["status"] == "pending"
        # A started task runs on: only pending ones are replaced.
        clock.advance(5)
        assert sorted(r.id for r in await claim(runtime.store, [ClaimSpec("work")])) == [
            "other-owner",
            "second",
        ]
        await submit("third")
        assert (await client.get("/v1/tasks/second")).json()["status"] == "processing"
        assert (await client.get("/v1/tasks/third")).json()["status"] == "pending"
        # The replaced task's end is an event like any other: its owner is told.
        events = (await client.get("/v1/tasks/first/events")).json()["events"]
        assert [e["type"] for e in events] == ["task.created", "task.cancelled"]
        assert other["status"] == "pending" and second["status"] == "pending"


async def test_a_batch_keeps_only_the_last_task_of_each_debounce_key(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(plain_app(), workers=False, clock=ManualClock())
    async with http(runtime) as client:
        await client.post("/v1/tasks", json={"type": "work", "id": "old", "debounce_key": "k"})
        items = [{"type": "work", "id": f"b{i}", "debounce_key": "k"} for i in range(3)]
        items.append({"type": "work", "id": "free"})
        results = (await client.post("/v1/tasks/batch", json={"tasks": items})).json()["results"]
        assert [r["status"] for r in results] == [202, 202, 202, 202]
        assert [r["task"]["status"] for r in results] == ["cancelled", "cancelled", "pending", "pending"]
        statuses = {t["id"]: t["status"] for t in (await client.get("/v1/tasks")).json()["tasks"]}
        assert statuses == {
            "old": "cancelled",
            "b0": "cancelled",
            "b1": "cancelled",
            "b2": "pending",
            "free": "pending",
        }


async def test_concurrent_submits_of_one_debounce_key_leave_one_pending_across_nodes(
    database_url: str, clock: ManualClock
) -> None:
    """Two nodes creating tasks of one key at the same moment: each sees the other's task (the
    later one replaces the earlier), never both kept."""
    nodes = [open_store(Settings(db=database_url), clock) for _ in range(4)]
    for node in nodes:
        await node.open()
    try:
        for i in range(20):
            await asyncio.gather(
                *(
                    node.create(new_task(f"r{i}-{n}-{k}", debounce_key=f"doc-{i}", fingerprint=f"{n}{k}"))
                    for n, node in enumerate(nodes)
                    for k in range(4)
                )
            )
        pending = await nodes[0].list_tasks(TaskQuery(owner="alice", status=Status.PENDING, limit=100))
        assert sorted(r.debounce_key or "" for r in pending) == sorted(f"doc-{i}" for i in range(20))
    finally:
        for node in nodes:
            await node.close()
