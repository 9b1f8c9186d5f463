"""What only PostgreSQL has to prove: commit-ordered seqs, LISTEN/NOTIFY, one sweeper, leases."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from errands import Errands, TaskContext
from errands.auth import SYSTEM
from errands.hub import WatchFilter
from errands.model import EventType
from errands.service import SubmitRequest
from tests.integration.conftest import RuntimeFactory

pytestmark = pytest.mark.postgres

app = Errands()


@app.task("work")
async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


@pytest.fixture
def store_kind() -> str:
    return "postgres"


async def test_seqs_follow_commit_order_even_when_transactions_race(runtime_factory: RuntimeFactory) -> None:
    """Two transactions race for seq N and N+1, the second trying to finish first. It cannot: it
    cannot even take its seq (let alone commit) until the first has committed. With a sequence
    the second would commit N+1 first and a reader following ``seq > last`` would skip N; here a
    watcher gets both, in order, exactly once."""
    runtime = await runtime_factory(app, workers=False)
    url = runtime.settings.db
    watch = runtime.hub.watch(WatchFilter(), key=None)
    template = orjson.loads(
        (await runtime.service.submit(SubmitRequest(type="work", id="t0"), SYSTEM))[0].public_json()
    )
    first, second = await asyncpg.connect(url), await asyncpg.connect(url)

    async def append(conn: asyncpg.Connection, task_id: str) -> int:
        seq: int = await conn.fetchval("UPDATE errands_seq SET value = value + 1 RETURNING value")
        snapshot = orjson.dumps({**template, "id": task_id, "seq": seq})
        await conn.execute(
            "INSERT INTO errands_events (seq, type, at, task_id, owner, task_type, status, task) "
            "VALUES ($1, 'task.created', 0, $2, 'default', 'work', 'pending', $3)",
            seq,
            task_id,
            snapshot,
        )
        await conn.execute("SELECT pg_notify('errands_events', $1)", str(seq))
        return seq

    try:
        t1, t2 = first.transaction(), second.transaction()
        await t1.start()
        await t2.start()
        n = await append(first, "racer-1")
        later = asyncio.create_task(append(second, "racer-2"))
        done, _ = await asyncio.wait({later}, timeout=0.5)
        assert not done, "the second transaction waits for the first to commit"
        await t1.commit()
        n_plus_1 = await asyncio.wait_for(later, 5)
        await t2.commit()
        assert n_plus_1 == n + 1
        received: list[int] = []
        while len(received) < 2:
            received.extend(e.seq for e in await watch.next(5) if e.task_id.startswith("racer"))
        assert received == [n, n + 1]
    finally:
        watch.close()
        await first.close()
        await second.close()


async def test_events_committed_by_another_process_reach_this_hub(runtime_factory: RuntimeFactory) -> None:
    """Two runtimes on one database stand in for two nodes: each sees the other's commits."""
    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    watch = node_a.hub.watch(WatchFilter(), key=None)
    try:
        for i in range(20):
            await node_b.service.submit(SubmitRequest(type="work", id=f"b{i}"), SYSTEM)
        seen: list[str] = []
        while len(seen) < 20:
            seen.extend(e.task_id for e in await watch.next(5) if e.type is EventType.CREATED)
        assert seen == [f"b{i}" for i in range(20)]
    finally:
        watch.close()


async def test_only_one_sweeper_at_a_time_and_another_takes_over(runtime_factory: RuntimeFactory) -> None:
    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    assert await node_a.store.hold_sweeper_lock() is True
    assert await node_b.store.hold_sweeper_lock() is False
    assert await node_a.store.hold_sweeper_lock() is True  # still its own
    await node_a.store.close()  # the sweeper's node goes away, and its session with it
    assert await node_b.store.hold_sweeper_lock() is True
    await node_a.store.open()


async def test_concurrent_claims_from_two_nodes_never_share_a_task(runtime_factory: RuntimeFactory) -> None:
    from errands.store.base import ClaimSpec

    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    for i in range(200):
        await node_a.service.submit(SubmitRequest(type="work", id=f"c{i}"), SYSTEM)

    async def drain(store: Any) -> list[str]:
        got: list[str] = []
        while True:
            batch = await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=7, lease_s=30)
            if not batch:
                return got
            got.extend(t.id for t in batch)

    a, b = await asyncio.gather(drain(node_a.store), drain(node_b.store))
    assert not set(a) & set(b)
    assert len(a) + len(b) == 200


async def test_concurrency_per_owner_holds_across_nodes(runtime_factory: RuntimeFactory) -> None:
    from errands.store.base import ClaimSpec

    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    for i in range(30):
        await node_a.service.submit(SubmitRequest(type="work", id=f"o{i}", owner="alice"), SYSTEM)
    spec = [ClaimSpec("work", concurrency_per_owner=2)]
    results = await asyncio.gather(
        *(
            store.claim(worker_id="w", specs=spec, limit=5, lease_s=30)
            for store in [node_a.store, node_b.store] * 5
        )
    )
    assert sum(len(r) for r in results) == 2
