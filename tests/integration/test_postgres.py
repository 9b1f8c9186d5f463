"""What only PostgreSQL has to prove: commit-ordered seqs, LISTEN/NOTIFY, one sweeper, leases."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest

from errands import Errands, Limit, TaskContext
from errands.auth import SYSTEM
from errands.hub import WatchFilter
from errands.model import Bound, EventType, Status
from errands.service import SubmitRequest
from errands.store.postgres import session_settings
from tests.integration.conftest import RuntimeFactory, wait_task

pytestmark = pytest.mark.postgres

app = Errands()


@app.task("work")
async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


async def generic_plan(conn: Any, sql: str, args: list[str] | None = None) -> str:
    """The one plan PostgreSQL keeps for ``sql`` whatever its arguments (a generic plan), shown
    for ``args`` (SQL literals; ``NULL`` each by default, which such a plan does not depend on)."""
    statement = await conn.prepare(sql)
    types = [await conn.fetchval("SELECT format_type($1, NULL)", t.oid) for t in statement.get_parameters()]
    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE generic_plan({', '.join(types)}) AS {sql}")
    try:
        rows = await conn.fetch(f"EXPLAIN EXECUTE generic_plan({', '.join(args or ['NULL'] * len(types))})")
    finally:
        await conn.execute("DEALLOCATE generic_plan")
    return "\n".join(r[0] for r in rows)


@pytest.fixture
def store_kind() -> str:
    return "postgres"


async def test_an_event_that_commits_late_is_still_delivered_in_order(
    runtime_factory: RuntimeFactory,
) -> None:
    """Two transactions take seq N and N+1 and commit in the reverse order: a watcher receives
    both, in order, exactly once (N+1 waits until the transaction holding N has finished)."""
    runtime = await runtime_factory(app, workers=False)
    url = runtime.settings.db
    watch = runtime.hub.watch(WatchFilter(), key=None)
    template = orjson.loads(
        (await runtime.service.submit(SubmitRequest(type="work", id="t0"), SYSTEM))[0].public_json()
    )
    # Sessions of errands' own (by name): the log waits for their transactions.
    older, younger = [await asyncpg.connect(url, server_settings=session_settings()) for _ in range(2)]

    async def append(conn: asyncpg.Connection, task_id: str) -> int:
        """What the store's commit statement does for one event, without committing."""
        seq: int = await conn.fetchval("SELECT (pg_current_xact_id()::text::bigint << 16) + 1")
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

    async def received(timeout_s: float) -> list[int]:
        try:
            return [e.seq for e in await watch.next(timeout_s) if e.task_id.startswith("racer")]
        except TimeoutError:
            return []

    try:
        first, second = older.transaction(), younger.transaction()
        await first.start()
        await second.start()
        n = await append(older, "racer-n")
        n_plus_1 = await append(younger, "racer-n+1")
        assert n < n_plus_1
        await second.commit()  # N+1 commits first...
        assert await received(0.5) == [], "N+1 is held back while N's transaction runs"
        await first.commit()  # ...then N
        got: list[int] = []
        while len(got) < 2:
            got.extend(await received(5))
        assert got == [n, n_plus_1]
        assert await received(0.3) == []  # exactly once
    finally:
        watch.close()
        await older.close()
        await younger.close()


async def another_nodes_event(conn: asyncpg.Connection, task_id: str) -> int:
    """An event of ``task_id`` written in ``conn``'s transaction (a session of errands'), as
    another node's commit writes it, but without its notification: its seq."""
    seq: int = await conn.fetchval("SELECT (pg_current_xact_id()::text::bigint << 16) + 1")
    await conn.execute(
        "INSERT INTO errands_events (seq, type, at, task_id, owner, task_type, status, task) "
        "VALUES ($1, 'task.created', 0, $2, 'default', 'work', 'pending', $3)",
        seq,
        task_id,
        orjson.dumps({"id": task_id, "seq": seq}),
    )
    return seq


async def commit_beside_another_node(
    runtime_factory: RuntimeFactory, *, commit_first: bool, remote: bool = False
) -> None:
    """Another node writes an event N, then a task is cancelled, by this process or (``remote``)
    by a third node: this process's watch receives N, then the cancel, once each. ``commit_first``:
    N commits before the cancel (this process's hub has not read it yet: N sends no notification);
    otherwise after it (N's transaction is older, so the cancel is held back until N's ends)."""
    from errands import model

    runtime = await runtime_factory(app, workers=False)
    writer = await runtime_factory(app, workers=False) if remote else runtime
    watch = runtime.hub.watch(WatchFilter(), key=None)
    await writer.service.submit(SubmitRequest(type="work", id="t0"), SYSTEM)
    assert [e.task_id for e in await watch.next(5)] == ["t0"]

    async def cancel() -> int:
        record = await writer.store.apply("t0", lambda r: model.cancel(r, now=writer.clock.now()))
        return record.seq

    other = await asyncpg.connect(runtime.settings.db, server_settings=session_settings())
    try:
        async with other.transaction():
            n = await another_nodes_event(other, "other")
            if not commit_first:
                mine = await cancel()
                assert await watch.next(0.5) == []  # held back behind N
        if commit_first:
            mine = await cancel()
        got: list[int] = []
        for _ in range(10):
            got.extend(e.seq for e in await watch.next(1))
            if len(got) >= 2:
                break
        assert got == [n, mine]
    finally:
        watch.close()
        await other.close()


async def test_a_commit_of_this_process_waits_for_an_older_transaction_of_another(
    runtime_factory: RuntimeFactory,
) -> None:
    """This process's own commits reach its hub at once when nothing can commit before them;
    not while an older transaction of errands' (another node's) may still commit below them."""
    await commit_beside_another_node(runtime_factory, commit_first=False)


async def test_a_commit_of_this_process_comes_after_one_the_hub_has_not_read_yet(
    runtime_factory: RuntimeFactory,
) -> None:
    """Another node's event committed but not yet read comes before this process's next
    commit, never after it, and is not lost."""
    await commit_beside_another_node(runtime_factory, commit_first=True)


@pytest.mark.parametrize("commit_first", [True, False])
async def test_another_nodes_commit_carried_in_its_notification_keeps_the_order(
    runtime_factory: RuntimeFactory, commit_first: bool
) -> None:
    """The same with the cancel on a third node, whose notification carries its events: they
    come after N's, never before, and N is not lost."""
    await commit_beside_another_node(runtime_factory, commit_first=commit_first, remote=True)


def count_reads(runtime: Any) -> Callable[[], int]:
    """How many times the runtime's hub has read the log since this was called."""
    reads = 0
    read_log = runtime.store.read_log

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read_log(*args, **kwargs)

    runtime.store.read_log = counted
    return lambda: reads


async def test_this_processs_commits_reach_its_hub_without_a_read(runtime_factory: RuntimeFactory) -> None:
    """One submit after another, nothing else writing: each reaches the hub (and a watch) from
    the commit itself, not from a read of the log."""
    runtime = await runtime_factory(app, workers=False)
    watch = runtime.hub.watch(WatchFilter(), key=None)
    reads = count_reads(runtime)
    for i in range(20):
        task, _ = await runtime.service.submit(SubmitRequest(type="work", id=f"s{i}"), SYSTEM)
        assert [e.seq for e in await watch.next(5)] == [task.seq]
    assert reads() <= 5  # (the hub's poll, and the odd commit another process made meanwhile)


async def trusted(node_a: Any, node_b: Any) -> int:
    """Until node A knows node B's sessions as errands' (it takes the events of their
    notifications only then, and looks again, at most 20 times a second, when one notifies it):
    the seq of the last task B submitted meanwhile."""
    for _ in range(200):
        task, _ = await node_b.service.submit(SubmitRequest(type="work"), SYSTEM)
        if node_b.store._own_pids <= node_a.store._peers:
            return int(task.seq)
        await asyncio.sleep(0.05)
    raise AssertionError("node B's sessions were never known to node A")


async def test_another_nodes_commits_reach_a_hub_with_their_events_without_a_read(
    runtime_factory: RuntimeFactory,
) -> None:
    """A commit's notification carries its events when nothing can come between them and what
    precedes them: a hub that has read up to there delivers them without reading the log, in
    order, once each."""
    from errands import model

    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    watch = node_a.hub.watch(WatchFilter(), key=None)
    seen: list[int] = []

    async def until(seq: int) -> None:
        for _ in range(50):
            if seen and seen[-1] >= seq:
                return
            seen.extend(e.seq for e in await watch.next(0.2))
        raise AssertionError(f"event {seq} never arrived")

    await until(await trusted(node_a, node_b))
    seen.clear()
    reads = count_reads(node_a)
    submits_without_a_read = changes_without_a_read = 0
    for i in range(20):
        before = reads()
        task, _ = await node_b.service.submit(SubmitRequest(type="work", id=f"n{i}"), SYSTEM)
        await until(task.seq)
        submits_without_a_read += reads() == before
        before = reads()
        cancelled = await node_b.store.apply(task.id, lambda r: model.cancel(r, now=node_b.clock.now()))
        await until(cancelled.seq)
        changes_without_a_read += reads() == before
    assert seen == sorted(set(seen)) and len(seen) == 40
    assert submits_without_a_read >= 10 and changes_without_a_read >= 10


async def test_another_nodes_creates_together_reach_a_hub_without_a_read_only_when_all_were_made(
    runtime_factory: RuntimeFactory,
) -> None:
    """Creates written in one statement carry their events when every one was created: a batch
    with an id that exists already carries none (its events would not be all of the
    transaction's seqs), and another node reads it, in order, once each."""
    from tests.integration.conftest import new_task

    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    await trusted(node_a, node_b)
    watch = node_a.hub.watch(WatchFilter(), key=None)
    reads = count_reads(node_a)

    async def batch(ids: list[str]) -> list[tuple[str, EventType]]:
        results = await node_b.store.create_many([new_task(i, type="work") for i in ids])
        made = {r[0].id for r in results if isinstance(r, tuple) and r[1]}
        got: list[tuple[str, EventType]] = []
        for _ in range(20):
            got.extend((e.task_id, e.type) for e in await watch.next(0.5) if e.task_id in ids)
            if len(got) >= len(made):
                break
        assert got == [(i, EventType.CREATED) for i in ids if i in made]
        return got

    carried = 0
    for k in range(10):
        before = reads()
        await batch([f"b{k}-{j}" for j in range(4)])
        carried += reads() == before
    assert carried >= 5
    before = reads()
    await batch(["b0-1", "c-new", "b0-2", "c-other"])  # two exist: the others are read
    assert reads() > before


async def test_a_transaction_that_creates_and_changes_tasks_reaches_another_node_whole(
    runtime_factory: RuntimeFactory,
) -> None:
    """A create is written before the rest of its transaction: the create's notification may
    carry its event, the second phase's carries none (they would not be all of the
    transaction's), and another node has every one, in order."""
    from errands import model
    from errands.store.postgres.tx import PgTx
    from tests.integration.conftest import new_task

    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    await trusted(node_a, node_b)
    watch = node_a.hub.watch(WatchFilter(), key=None)
    t0, _ = await node_b.service.submit(SubmitRequest(type="work", id="t0"), SYSTEM)
    for _ in range(10):  # (B's tasks before it may come first)
        if t0.seq in [e.seq for e in await watch.next(1)]:
            break
    now = node_b.clock.now()

    async def both(tx: PgTx) -> None:
        await tx.insert(model.create(new_task("t1", type="work"), now=now))
        await tx.apply("t0", lambda r: model.cancel(r, now=now))

    await node_b.store._write(both)
    got: list[tuple[str, EventType]] = []
    for _ in range(10):
        got.extend((e.task_id, e.type) for e in await watch.next(1))
        if len(got) >= 2:
            break
    assert got == [("t1", EventType.CREATED), ("t0", EventType.CANCELLED)]


async def test_events_notified_by_another_role_are_not_taken(runtime_factory: RuntimeFactory) -> None:
    """Any role that may connect may notify: events a session of another role sends are not
    delivered (the hub reads the log instead, which holds nothing of them)."""
    import uuid

    from errands.store.postgres.notices import events_text

    runtime = await runtime_factory(app, workers=False)
    watch = runtime.hub.watch(WatchFilter(), key=None)
    role = f"errands_intruder_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(runtime.settings.db)
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        intruder = await asyncpg.connect(runtime.settings.db, user=role)
        try:
            last = runtime.hub.last_seq
            seq = ((last >> 16) + 10 << 16) + 1
            snapshot = orjson.dumps({"id": "forged", "status": "completed", "seq": 0})
            carried = events_text(
                [(1, "task.completed", 0.0, "forged", "default", "work", "completed", snapshot)]
            )
            await intruder.execute("SELECT pg_notify('errands_events', $1)", f"{seq}/4/0//{last}/{carried}")
            assert await watch.next(1) == []
            assert runtime.hub.last_seq < seq
        finally:
            await intruder.close()
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()
        watch.close()


async def test_a_transaction_never_writes_a_task_after_a_younger_one(runtime_factory: RuntimeFactory) -> None:
    """A batch that got its transaction id early must not change a task that a younger
    transaction wrote since: its event would get a smaller seq than the younger one's, and the
    task's events would be out of order (a worker once took a task's own task.created for a
    sign that it had lost the task). Such a batch runs again, younger."""
    from errands import model
    from errands.store.postgres import PostgresStore

    runtime = await runtime_factory(app, workers=False)
    store = runtime.store
    assert isinstance(store, PostgresStore)
    runs = 0

    async def op(tx: Any) -> Any:
        nonlocal runs
        runs += 1
        await tx.conn.execute("SELECT pg_current_xact_id()")  # this transaction has its id now
        if runs == 1:  # meanwhile a younger transaction creates the task (on another lane)
            await runtime.service.submit(SubmitRequest(type="work", id="late"), SYSTEM)
        return await tx.apply("late", lambda r: model.cancel(r, now=runtime.clock.now()))

    await store._write(op)
    events = await store.events("late")
    assert [e.type for e in events] == [EventType.CREATED, EventType.CANCELLED]
    assert events[0].seq < events[1].seq
    assert runs == 2


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


async def test_query_parameters_of_the_url_are_settings_of_every_connection(
    runtime_factory: RuntimeFactory, database_url: str
) -> None:
    """``?synchronous_commit=off`` (docs/configuration.md) reaches the pool's connections, and a
    node on such a URL runs tasks and hears commits as any other."""
    node = await runtime_factory(app, db=f"{database_url}?synchronous_commit=off")
    pool = node.store._pool  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "off"
    await node.service.submit(SubmitRequest(type="work", id="relaxed"), SYSTEM)
    task = await wait_task(node, "relaxed")
    assert task.status.value == "completed"


async def test_a_commit_that_makes_work_wakes_the_workers_of_other_nodes(
    runtime_factory: RuntimeFactory,
) -> None:
    """The notification of a commit says whether it made a task claimable, so a worker on
    another node can claim at once rather than after its hub's next read of the log."""
    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    # Listening announces work once on (re)connect, so that nothing missed meanwhile waits.
    await asyncio.wait_for(node_b.store.listening.wait(), 10)  # type: ignore[attr-defined]
    created, cancelled, work = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen = {EventType.CREATED: created, EventType.CANCELLED: cancelled}
    node_b.hub.add_listener(lambda event: seen[event.type].set() if event.type in seen else None)
    node_b.hub.on_work(work.set)
    await node_a.service.submit(SubmitRequest(type="work", id="w1"), SYSTEM)
    await asyncio.wait_for(asyncio.gather(work.wait(), created.wait()), 10)
    work.clear()
    await node_a.service.cancel("w1", SYSTEM)
    await asyncio.wait_for(cancelled.wait(), 10)
    assert not work.is_set(), "a cancel makes nothing claimable"


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
    from errands.store.records import ClaimSpec

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


async def test_claims_alone_never_share_a_task_with_each_other_or_with_claims_that_lock(
    runtime_factory: RuntimeFactory,
) -> None:
    """A claim alone reads its tasks without locks and writes each only where it is still as
    read: raced by another such claim and by one that locks, each task still starts once."""
    from errands.store.records import ClaimSpec

    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    ids = [f"q{i}" for i in range(60)]
    for task_id in ids:
        await node_a.service.submit(SubmitRequest(type="work", id=task_id), SYSTEM)

    async def drain(store: Any, *, alone: bool) -> list[str]:
        got: list[str] = []
        while True:
            batch = await store.claim(
                worker_id="w", specs=[ClaimSpec("work")], limit=2, lease_s=30, alone=alone
            )
            if not batch:
                return got
            got.extend(t.id for t in batch)

    claimed = await asyncio.gather(
        drain(node_a.store, alone=True), drain(node_b.store, alone=True), drain(node_b.store, alone=False)
    )
    assert sorted(t for got in claimed for t in got) == sorted(ids)
    for task_id in ids:
        events = await node_a.store.events(task_id)
        assert [e.type for e in events] == [EventType.CREATED, EventType.PROCESSING]
        assert events[0].seq < events[1].seq


async def test_a_claim_alone_that_finds_its_task_taken_claims_as_usual(
    runtime_factory: RuntimeFactory,
) -> None:
    """A task at the head of the queue, locked by another transaction, is read without a lock
    but not written; the claim then claims as usual, which skips it and takes the next."""
    from errands.store.records import ClaimSpec

    runtime = await runtime_factory(app, workers=False)
    for task_id in ["h0", "h1"]:
        await runtime.service.submit(SubmitRequest(type="work", id=task_id), SYSTEM)
    holder = await asyncpg.connect(runtime.settings.db)
    try:
        async with holder.transaction():
            await holder.execute("SELECT id FROM errands_tasks WHERE id = 'h0' FOR UPDATE")
            claimed = await runtime.store.claim(
                worker_id="w", specs=[ClaimSpec("work")], limit=1, lease_s=30, alone=True
            )
        assert [t.id for t in claimed] == ["h1"]
    finally:
        await holder.close()


async def test_a_claim_alone_of_a_limited_type_keeps_its_limits(runtime_factory: RuntimeFactory) -> None:
    """Limits are counted in a claim's transaction: a type with limits is claimed that way."""
    from errands.store.records import ClaimSpec

    runtime = await runtime_factory(app, workers=False)
    for i in range(3):
        await runtime.service.submit(SubmitRequest(type="work", id=f"l{i}", owner="alice"), SYSTEM)
    spec = [ClaimSpec("work", bounds=(Bound("type:work", ("work",), Limit(concurrency=1, per="owner")),))]
    first = await runtime.store.claim(worker_id="w", specs=spec, limit=3, lease_s=30, alone=True)
    again = await runtime.store.claim(worker_id="w", specs=spec, limit=3, lease_s=30, alone=True)
    assert (len(first), len(again)) == (1, 0)


async def test_concurrency_per_owner_holds_across_nodes(runtime_factory: RuntimeFactory) -> None:
    from errands.store.records import ClaimSpec

    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, workers=False)
    for i in range(30):
        await node_a.service.submit(SubmitRequest(type="work", id=f"o{i}", owner="alice"), SYSTEM)
    spec = [ClaimSpec("work", bounds=(Bound("type:work", ("work",), Limit(concurrency=2, per="owner")),))]
    results = await asyncio.gather(
        *(
            store.claim(worker_id="w", specs=spec, limit=5, lease_s=30)
            for store in [node_a.store, node_b.store] * 5
        )
    )
    assert sum(len(r) for r in results) == 2


async def test_write_transactions_reach_tasks_through_indexes(runtime_factory: RuntimeFactory) -> None:
    """On a new table, never analyzed, the claim still walks the queue index in order: a bitmap
    scan would read every entry its partial index keeps for tasks that have moved on, and a
    sequential one the whole table (store/postgres/writer.py, "Plans that stay cheap")."""
    from errands.store.postgres import PostgresStore
    from errands.store.postgres.sql import STATEMENTS
    from errands.store.records import ClaimSpec

    runtime = await runtime_factory(app, workers=False)
    store = runtime.store
    assert isinstance(store, PostgresStore)
    await asyncio.gather(
        *(runtime.service.submit(SubmitRequest(type="work", id=f"q{i}"), SYSTEM) for i in range(2000))
    )
    # All but a few move on: their entries stay in the pending indexes until VACUUM.
    claimed = await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=1995, lease_s=60)
    assert len(claimed) == 1995

    async def explain(tx: Any) -> str:
        rows = await tx.conn.fetch(f"EXPLAIN {STATEMENTS.claim}", ["work"], 1e12, 20)
        return "\n".join(r[0] for r in rows)

    plan = await store._write(explain, mode="first")
    assert "Bitmap" not in plan and "Seq Scan" not in plan, plan
    # The queue and the tasks that came due are each walked in their index's order (no sort);
    # only the two short lists they give are merged.
    queued, due = plan.split("CTE queued")[1].split("CTE due")
    assert "Index Scan using errands_tasks_queue" in queued and "Sort" not in queued, plan
    due = due.split("->  Sort")[0]
    assert "Index Scan using errands_tasks_due" in due and "Sort" not in due, plan
    assert "Index Cond: (run_after <=" in due, plan


async def test_a_claim_planned_while_the_queue_was_empty_still_walks_its_index(
    runtime_factory: RuntimeFactory,
) -> None:
    """A plan cached while the queue was nearly empty (a new database: the sixth claim of a
    session is planned once for good) must not read every pending task and sort them once the
    queue has grown: a claim's transaction plans without sorting where an index gives the order."""
    from errands.store.postgres import PostgresStore
    from errands.store.postgres.sql import STATEMENTS
    from errands.store.records import ClaimSpec

    runtime = await runtime_factory(app, workers=False)
    store = runtime.store
    assert isinstance(store, PostgresStore)
    # The statistics of a queue that has run dry (autovacuum's, early in a database's life).
    for i in range(3):
        await runtime.service.submit(SubmitRequest(type="work", id=f"few{i}"), SYSTEM)
    assert len(await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=10, lease_s=60)) == 3
    await store._fetch("ANALYZE errands_tasks")

    async def claim_plan(tx: Any) -> str:
        return await generic_plan(tx.conn, STATEMENTS.claim, ["'{work}'", "1e12", "20"])

    plan = await store._write(claim_plan, mode="first")
    queued = plan.split("CTE queued")[1].split("CTE due")[0]
    assert "Index Scan using errands_tasks_queue" in queued and "Sort" not in queued, plan


async def test_the_write_path_plans_each_statement_once(runtime_factory: RuntimeFactory) -> None:
    """Submits, claims and outcomes all run on plans made once per session ("Plans that stay
    cheap"): PostgreSQL planned a claim's write of its rows and events (passed as arrays) again
    at every call, for a third of a millisecond each."""
    from errands.store.postgres import PostgresStore

    runtime = await runtime_factory(app)
    store = runtime.store
    assert isinstance(store, PostgresStore) and store._write_pool is not None
    for i in range(8):  # one at a time: each its own claim and outcome
        await runtime.service.submit(SubmitRequest(type="work", id=f"p{i}"), SYSTEM)
        assert (await wait_task(runtime, f"p{i}")).status is Status.COMPLETED
    pool = store._write_pool
    sessions = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        rows = [
            row
            for conn in sessions
            for row in await conn.fetch(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
            )
        ]
    finally:
        for conn in sessions:
            await pool.release(conn)
    task_writes = [r for r in rows if "errands_tasks" in r["statement"]]
    assert any("UPDATE errands_tasks" in r["statement"] for r in task_writes), rows
    assert sum(r["generic_plans"] for r in task_writes) >= 8 * 3, rows
    assert [r["statement"] for r in rows if r["custom_plans"]] == []


@pytest.mark.parametrize("sorts", ["on", "off"])
async def test_the_second_phase_plans_once_for_any_number_of_rows(
    runtime_factory: RuntimeFactory, sorts: str
) -> None:
    """The statements that write a transaction's rows and events have one plan for every call
    (made by whichever transaction runs them first: a claim's, without sorts, or another's):
    each row is reached by its primary key, whatever the number of rows."""
    from errands.store.postgres import PostgresStore
    from errands.store.postgres.sql import COMMIT, COMMIT_SEEN

    runtime = await runtime_factory(app, workers=False)
    store = runtime.store
    assert isinstance(store, PostgresStore)

    async def second_phase_plans(tx: Any) -> list[str]:
        await tx.conn.execute(f"SET LOCAL enable_sort = {sorts}")
        return [await generic_plan(tx.conn, sql) for sql in (COMMIT, COMMIT_SEEN)]

    for plan in await store._write(second_phase_plans, mode="first"):
        assert "Index Scan using errands_tasks_pkey on errands_tasks" in plan, plan
        assert "Seq Scan" not in plan and "Sort" not in plan and "Merge" not in plan, plan


async def test_meta_setdefault_answers_the_value_a_concurrent_first_start_committed(
    postgres_database: str,
) -> None:
    """The start-up race, at the SQL level: A stores a value in an open transaction, B tries the
    same key and waits for A's row, A commits. B must answer A's value (under READ COMMITTED, an
    ``ON CONFLICT DO NOTHING`` would return no row and a read in the same statement would not see
    A's row either)."""
    from errands.store.postgres.sql import META_SETDEFAULT

    a, b = await asyncpg.connect(postgres_database), await asyncpg.connect(postgres_database)
    try:
        await a.execute("DELETE FROM errands_meta WHERE key = 'race'")
        tx = a.transaction()
        await tx.start()
        assert await a.fetchval(META_SETDEFAULT, "race", "from-a") == "from-a"
        waiting = asyncio.create_task(b.fetchval(META_SETDEFAULT, "race", "from-b"))
        # B is waiting for A's row lock: the server says so (no sleep, a condition).
        async with asyncio.timeout(10):
            while not await a.fetchval(  # noqa: ASYNC110 - the server's state has no event to await
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                b.get_server_pid(),
            ):
                await asyncio.sleep(0.005)
        assert not waiting.done()
        await tx.commit()
        assert await asyncio.wait_for(waiting, 10) == "from-a"
        assert await b.fetchval(META_SETDEFAULT, "race", "again") == "from-a"
    finally:
        await a.execute("DELETE FROM errands_meta WHERE key = 'race'")
        await a.close()
        await b.close()


async def test_a_session_of_errands_younger_than_the_snapshot_does_not_sink_the_bound(
    runtime_factory: RuntimeFactory, database_url: str
) -> None:
    """The bound reads each errands session's xid as a distance back from the snapshot's xmax;
    one that got its id after a foreign transaction still running is ahead of xmax, and must
    not count as 2^32 transactions old (the log would read nothing while both stay open)."""
    runtime = await runtime_factory(app, workers=False)
    foreign = {"application_name": "another-app"}
    sessions = []
    try:
        older = await asyncpg.connect(database_url, server_settings=foreign)
        sessions.append(older)
        await older.execute("BEGIN")
        await older.fetchval("SELECT pg_current_xact_id()")  # a foreign xid, held
        await runtime.service.submit(SubmitRequest(type="work", id="below"), SYSTEM)  # committed
        between = await asyncpg.connect(database_url, server_settings=foreign)
        sessions.append(between)
        await between.execute("BEGIN")
        await between.fetchval("SELECT pg_current_xact_id()")  # assigned, not completed
        ours = await asyncpg.connect(database_url, server_settings=session_settings())
        sessions.append(ours)
        await ours.execute("BEGIN")
        await ours.fetchval("SELECT pg_current_xact_id()")  # errands', ahead of xmax
        read = await runtime.store.read_log(0)
        assert "below" in {e.task_id for e in read.events}
    finally:
        for conn in sessions:
            await conn.close()


async def test_a_delayed_task_created_on_another_node_starts_when_due_without_polling(
    runtime_factory: RuntimeFactory,
) -> None:
    """The commit of a task that waits tells the workers of other nodes to read when the next
    one is due (Hint.LATER): node B's worker, which polls once an hour, starts it once due."""
    node_a = await runtime_factory(app, workers=False)
    node_b = await runtime_factory(app, poll_s=3600.0)  # a node that serves the API too
    await asyncio.wait_for(node_b.store.listening.wait(), 10)  # type: ignore[attr-defined]
    # Once node B's worker ran a task, it has read when the next is due (none): only news can
    # tell it of the next.
    warm, _ = await node_a.service.submit(SubmitRequest(type="work", id="warm"), SYSTEM)
    await wait_task(node_b, warm.id)
    task, _ = await node_a.service.submit(SubmitRequest(type="work", id="later", delay_s=1), SYSTEM)
    done = await wait_task(node_b, task.id)
    assert done.status is Status.COMPLETED and done.started_at >= task.run_after


def _limited_apps() -> tuple[Errands, Errands, asyncio.Event]:
    """Two apps sharing the type "one" (at most one running in all); only the first also runs
    "slow", whose tasks wait for the test's end."""
    gate, end = asyncio.Event(), asyncio.Event()
    apps = Errands(), Errands()
    for node, each in zip("ab", apps, strict=True):

        @each.task("one", limits=[Limit(concurrency=1)], max_attempts=2)
        async def one(ctx: TaskContext, input: dict[str, Any], node: str = node) -> dict[str, str]:
            if input.get("fail"):
                await gate.wait()
                raise RuntimeError("again later")
            return {"node": node}

    @apps[0].task("slow")
    async def slow(ctx: TaskContext, input: dict[str, Any]) -> None:
        await end.wait()

    return apps[0], apps[1], gate


async def test_a_task_sent_back_to_wait_frees_its_slot_for_other_nodes(
    runtime_factory: RuntimeFactory,
) -> None:
    """A running task of a limited type sent back to wait (a retry's backoff) frees its slot,
    like an end: node B's worker (a worker process, which polls once an hour) starts the next
    at once."""
    app_a, app_b, gate = _limited_apps()
    slow = {"poll_s": 3600.0, "retry_base_s": 600.0, "retry_cap_s": 600.0}
    node_a = await runtime_factory(app_a, concurrency=1, **slow)
    failing = SubmitRequest(type="one", id="first", input={"fail": True})
    first, _ = await node_a.service.submit(failing, SYSTEM)
    await wait_task(node_a, first.id, until=lambda r: r.status is Status.PROCESSING)
    node_b = await runtime_factory(app_b, serves_watches=False, **slow)  # as `errands worker`
    await asyncio.wait_for(node_b.store.listening.wait(), 10)  # type: ignore[attr-defined]
    # Node A's one slot goes to "slow" once "first" leaves it; "second" is node B's to start.
    await node_a.service.submit(SubmitRequest(type="slow", id="blocker", priority=10), SYSTEM)
    second, _ = await node_b.service.submit(SubmitRequest(type="one", id="second", input={}), SYSTEM)
    gate.set()
    backoff = await wait_task(node_a, first.id, until=lambda r: r.status is Status.PENDING)
    assert backoff.scheduled_for is not None
    done = await wait_task(node_a, second.id)
    assert done.status is Status.COMPLETED and done.result == {"node": "b"}
