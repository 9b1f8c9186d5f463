"""A worker process on PostgreSQL follows only the tasks it runs (Hub.follow_only): it reads
their events when a commit's hints say one may have been stopped, and learns of new work and of
ends from the hints alone. Its leases are renewed only every 20 s here (lease_s=60), and it
polls as seldom, so what it hears within the test's few seconds it heard from the hints (or,
deaf in a stream, from reading its tasks' events every 0.2 s)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from errands import Errands, TaskContext
from errands.auth import SYSTEM
from errands.model import Event, EventType, Status
from errands.store.base import Hint
from tests.integration.conftest import RuntimeFactory, until, wait_task

pytestmark = pytest.mark.postgres

app = Errands()
running: dict[str, asyncio.Event] = {}
stopped: dict[str, asyncio.Event] = {}


async def _hold(ctx: TaskContext) -> None:
    running.setdefault(ctx.task_id, asyncio.Event()).set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        stopped.setdefault(ctx.task_id, asyncio.Event()).set()
        raise


@app.task("hold")
async def hold(ctx: TaskContext, input: dict[str, Any]) -> None:
    await _hold(ctx)


@app.task("turns", concurrency_per_owner=1)
async def turns(ctx: TaskContext, input: dict[str, Any]) -> None:
    await _hold(ctx)


@app.task("quick")
async def quick(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


@app.task("slow")
async def slow(ctx: TaskContext, input: dict[str, Any]) -> None:
    await asyncio.sleep(0.01)


attempts: dict[str, int] = {}


@app.task("flaky", max_attempts=3)
async def flaky(ctx: TaskContext, input: dict[str, Any]) -> str:
    attempts[ctx.task_id] = ctx.attempt
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails")
    return "second time lucky"


@pytest.fixture
def store_kind() -> str:
    return "postgres"


@pytest.fixture(autouse=True)
def _fresh_flags() -> None:
    running.clear()
    stopped.clear()


def _flag(flags: dict[str, asyncio.Event], task_id: str) -> asyncio.Event:
    return flags.setdefault(task_id, asyncio.Event())


async def _nodes(runtime_factory: RuntimeFactory, concurrency: int) -> tuple[Any, Any, list[Event]]:
    """A worker process (no watches) and then an API node without workers (app.submit goes to
    it); the events the worker's hub hands to its listeners."""
    worker = await runtime_factory(app, serves_watches=False, concurrency=concurrency, lease_s=60, poll_s=60)
    api = await runtime_factory(app, workers=False)
    seen: list[Event] = []
    worker.hub.add_listener(seen.append)
    return worker, api, seen


async def test_a_worker_process_reads_only_its_tasks_and_hears_a_cancel_from_another_node(
    runtime_factory: RuntimeFactory,
) -> None:
    worker, api, seen = await _nodes(runtime_factory, concurrency=1)
    await app.submit("hold", id="mine")
    await asyncio.wait_for(_flag(running, "mine").wait(), 10)
    await app.submit("hold", id="queued")  # no free slot: stays pending
    await app.submit("hold", id="gone")
    await api.service.cancel("gone", SYSTEM)  # a stop hint: the worker reads its own task's events
    await api.service.cancel("mine", SYSTEM)
    await asyncio.wait_for(_flag(stopped, "mine").wait(), 10)
    # Only the running task's events after its claim, each once: never the others'.
    assert [(e.task_id, e.type) for e in seen] == [("mine", EventType.CANCELLED)]
    # Its slot is free: the queued task is claimed (the cancel's hints announced no work, the
    # worker's own free slot does), and a cancel stops it too.
    await asyncio.wait_for(_flag(running, "queued").wait(), 10)
    await api.service.cancel("queued", SYSTEM)
    await asyncio.wait_for(_flag(stopped, "queued").wait(), 10)
    assert [e.task_id for e in seen] == ["mine", "queued"]
    assert worker.worker is not None


async def test_a_task_ended_elsewhere_gives_its_owner_the_next_turn_in_a_worker_process(
    runtime_factory: RuntimeFactory,
) -> None:
    """concurrency_per_owner=1: the owner's second task waits for the first; the first is
    cancelled on another node, and the worker process, told of the end, claims the second."""
    worker, api, _seen = await _nodes(runtime_factory, concurrency=4)
    await app.submit("turns", id="first", owner="alice")
    await asyncio.wait_for(_flag(running, "first").wait(), 10)
    await app.submit("turns", id="second", owner="alice")
    await app.submit("turns", id="other", owner="bob")  # another owner's turn is its own
    await asyncio.wait_for(_flag(running, "other").wait(), 10)
    assert (await api.service.get("second", SYSTEM)).status is Status.PENDING
    await api.service.cancel("first", SYSTEM)
    await asyncio.wait_for(_flag(running, "second").wait(), 10)
    for task_id in ("second", "other"):
        await api.service.cancel(task_id, SYSTEM)
        await wait_task(api, task_id)
    assert worker.worker is not None


async def test_a_worker_process_runs_a_retry_when_its_backoff_ends(runtime_factory: RuntimeFactory) -> None:
    """The retry's backoff (10-50 ms here) ends long before the worker would poll (60 s): the
    retry's hints alone tell it to look for the next ready time."""
    worker, api, _seen = await _nodes(runtime_factory, concurrency=4)
    await app.submit("flaky", id="again")
    task = await wait_task(api, "again")
    assert (task.status, task.result, attempts["again"]) == (Status.COMPLETED, "second time lucky", 2)
    assert worker.worker is not None


async def test_a_worker_process_in_a_stream_hears_nothing_yet_learns_of_a_cancel_and_listens_again(
    runtime_factory: RuntimeFactory,
) -> None:
    """While work comes as a stream, a worker process claims on its own pace and is told of no
    commit (PostgreSQL wakes the session of every listener at each commit). Here it is kept
    busy (each claim fills its slots from a backlog that never runs dry, so it never listens
    again meanwhile): it still learns of a cancel of a task it runs, from that task's events
    (it would poll, and renew its leases, only after 20 s). Once the stream ends it listens
    again, and a lone task is claimed on its announcement."""
    worker, api, _seen = await _nodes(runtime_factory, concurrency=5)
    await app.submit("hold", id="long")
    await asyncio.wait_for(_flag(running, "long").wait(), 10)
    completed = 0

    def count(event: Event) -> None:
        nonlocal completed
        completed += event.type is EventType.COMPLETED and event.task_type == "slow"

    api.hub.add_listener(count)
    streaming, submitted, deaf_throughout = True, 0, True

    async def stream() -> None:
        nonlocal submitted, deaf_throughout
        while streaming:
            if submitted - completed < 40:  # a backlog of 40 at least: every claim finds some
                await app.submit_many([{"type": "slow"} for _ in range(10)])
                submitted += 10
            else:
                await asyncio.sleep(0.005)
            deaf_throughout = deaf_throughout and worker.hub.wanted is Hint.NONE

    submitter = asyncio.create_task(stream())
    try:
        await until(lambda: worker.store.channels == [], 30)  # type: ignore[attr-defined]
        deaf_throughout = True
        await api.service.cancel("long", SYSTEM)
        await asyncio.wait_for(_flag(stopped, "long").wait(), 10)
        assert deaf_throughout and worker.hub.wanted is Hint.NONE
    finally:
        streaming = False
        await submitter
    await until(lambda: completed == submitted, 60)
    await until(lambda: worker.store.channels != [], 30)  # type: ignore[attr-defined]
    await app.submit("quick", id="lone")
    assert (await wait_task(api, "lone")).status is Status.COMPLETED


async def test_a_deaf_worker_process_reads_its_tasks_often_and_catches_up_once_it_listens(
    runtime_factory: RuntimeFactory,
) -> None:
    """Deaf (as in a stream; made so here, idle), a worker process hears neither a cancel nor
    new work; it reads its running task's events every DEAF_POLL_S, so the cancel stops the
    handler all the same (it would poll, and renew its leases, only after 20 s). Listening
    again, it catches up with what was committed meanwhile: the task submitted while it was
    deaf is claimed."""
    worker, api, seen = await _nodes(runtime_factory, concurrency=4)
    await app.submit("hold", id="long")
    await asyncio.wait_for(_flag(running, "long").wait(), 10)
    assert worker.hub.deafen(True) and worker.hub.wanted is Hint.NONE
    await until(lambda: worker.store.channels == [])  # type: ignore[attr-defined]
    await api.service.cancel("long", SYSTEM)
    await asyncio.wait_for(_flag(stopped, "long").wait(), 10)
    assert [(e.task_id, e.type) for e in seen] == [("long", EventType.CANCELLED)]
    await app.submit("quick", id="meanwhile")
    assert not worker.hub.deafen(False)
    assert (await wait_task(api, "meanwhile")).status is Status.COMPLETED
    # A hub that follows the whole log (an API node) is never deaf: it serves watches.
    assert not api.hub.deafen(True) and api.hub.wanted is None


def _insert_events(seq: str, task: str, rows: str = "") -> str:
    """An INSERT of events of the log: ``seq`` and ``task`` are SQL expressions over ``rows``."""
    columns = "seq, type, at, task_id, owner, task_type, status, task"
    values = f"{seq}, 'task.progress', 0, {task}, 'o', 'quick', 'processing', '\\x00'::bytea"
    return f"INSERT INTO errands_events ({columns}) SELECT {values} {rows}"


async def test_a_worker_process_reads_its_tasks_events_without_reading_the_whole_log() -> None:
    """What a worker process reads of the log (errands_task_log, its running tasks' events)
    goes through each task's entries of the task index, however the plan was made: on a log
    that was never analysed (a young database), and with plans made once for any argument (a
    session's later calls), it scans no table, and still says when some of the tasks' events
    wait above the bound. That test used to be a hash join over every event kept, a cost that
    grew with the log."""
    import asyncpg

    from tests.conftest import migrated_database

    async with migrated_database("errands_task_log") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("ALTER TABLE errands_events SET (autovacuum_enabled = false)")
            # 20,000 events of 2,000 tasks, seqs as transactions write them (id << 16 | ordinal).
            source = "FROM generate_series(1, 20000) AS g"
            await conn.execute(_insert_events("(1000 + g) << 16 | 1", "'t' || (g % 2000)", source))
            ids = ["t1", "t2", "t3"]
            async with conn.transaction():
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                for _ in range(3):
                    rows = await conn.fetch(
                        "SELECT * FROM errands_task_log($1::text[], $2::int8[], 1000)", ids, [0, 0, 0]
                    )
                    seqs = [r["seq"] for r in rows]
                    assert seqs == sorted(seqs) and len(seqs) == 30 and not rows[0]["behind"]
                    assert {r["task_id"] for r in rows} == set(ids)
                # An event of t1 above the bound (a transaction of errands' that began before it
                # is still open): not read yet, and the read says that some wait.
                holder = await asyncpg.connect(url, server_settings={"application_name": "errands"})
                try:
                    async with holder.transaction():
                        xid = await holder.fetchval("SELECT pg_current_xact_id()::text::bigint")
                        await conn.execute(_insert_events("($1::int8 + 1) << 16 | 1", "'t1'"), xid)
                        rows = await conn.fetch(
                            "SELECT * FROM errands_task_log($1::text[], $2::int8[], 1000)", ids, [0, 0, 0]
                        )
                        assert len(rows) == 30 and rows[0]["behind"]
                finally:
                    await holder.close()
                scans = await conn.fetchrow(
                    "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'errands_events'"
                )
            assert scans["seq_scan"] == 0 and scans["idx_scan"] > 0, dict(scans)
        finally:
            await conn.close()
