"""Workers running real handlers against a real store: outcomes, progress, cancel, leases, shutdown."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Any

import orjson
import pytest

from errands import Errands, Fail, Retry, TaskContext
from errands.clock import ManualClock
from errands.errors import UnknownTaskType
from errands.model import EventType, Status
from tests.integration.conftest import RuntimeFactory, until, wait_task


async def event_types(runtime: Any, task_id: str) -> list[EventType]:
    return [e.type for e in await runtime.store.events(task_id)]


async def test_a_result_completes_the_task(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("double")
    async def double(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
        return {"value": input["n"] * 2}

    runtime = await runtime_factory(app)
    task = await app.submit("double", {"n": 21}, owner="alice")
    assert task.status is Status.PENDING and task.owner == "alice"
    done = await wait_task(runtime, task.id)
    assert (done.status, done.result, done.attempt, done.progress) == (
        Status.COMPLETED,
        {"value": 42},
        1,
        100,
    )
    assert await event_types(runtime, task.id) == [
        EventType.CREATED,
        EventType.PROCESSING,
        EventType.COMPLETED,
    ]


async def test_progress_is_coalesced_monotonic_and_the_last_value_is_kept(
    runtime_factory: RuntimeFactory,
) -> None:
    app = Errands()

    @app.task("chatty", max_attempts=1)
    async def chatty(ctx: TaskContext, input: dict[str, Any]) -> None:
        for i in range(20_000):
            await ctx.progress(i // 400, f"step {i}")
            if i % 1000 == 0:
                await asyncio.sleep(0)
        await ctx.progress(10, "going backwards is ignored")
        await ctx.progress(57, "last words")
        raise Fail("stopped", "stopped on purpose")

    runtime = await runtime_factory(app, progress_interval_s=0.05)
    task = await app.submit("chatty")
    done = await wait_task(runtime, task.id)
    assert (done.status, done.progress, done.message) == (Status.FAILED, 57, "last words")
    events = await runtime.store.events(task.id)
    progress = [orjson.loads(e.task_json)["progress"] for e in events if e.type is EventType.PROGRESS]
    assert len(progress) < 20  # 20,000 reports, a handful of writes
    assert progress == sorted(progress)


async def test_fail_ends_without_retry_and_shows_its_message(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("picky", max_attempts=5)
    async def picky(ctx: TaskContext, input: dict[str, Any]) -> None:
        raise Fail("bad_image", "The image is not a photo.")

    runtime = await runtime_factory(app)
    done = await wait_task(runtime, (await app.submit("picky")).id)
    assert (done.status, done.attempt) == (Status.FAILED, 1)
    assert (done.error.code, done.error.message) == ("bad_image", "The image is not a photo.")


async def test_exceptions_retry_with_backoff_then_fail_scrubbed(
    runtime_factory: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = Errands()
    attempts: list[float] = []

    @app.task("broken", max_attempts=3)
    async def broken(ctx: TaskContext, input: dict[str, Any]) -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("connection to db:5432 failed, password=hunter2")

    runtime = await runtime_factory(app, retry_base_s=0.05, retry_cap_s=1.0)
    with caplog.at_level(logging.ERROR, logger="errands.worker"):
        done = await wait_task(runtime, (await app.submit("broken")).id)
    assert (done.status, done.attempt) == (Status.FAILED, 3)
    assert done.error.code == "internal_error"
    assert "hunter2" not in done.error.message
    assert all(b"hunter2" not in e.task_json for e in await runtime.store.events(done.id))
    assert "hunter2" in caplog.text  # the traceback goes to the log only
    assert [e for e in await event_types(runtime, done.id) if e is EventType.RETRYING] == [
        EventType.RETRYING
    ] * 2
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05  # base·2^(n-1), at least half of it with jitter


async def test_retry_asks_for_another_attempt(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("later", max_attempts=2)
    async def later(ctx: TaskContext, input: dict[str, Any]) -> int:
        if ctx.attempt == 1:
            raise Retry(after_s=0.05, message="not yet")
        return ctx.attempt

    runtime = await runtime_factory(app)
    done = await wait_task(runtime, (await app.submit("later")).id)
    assert (done.status, done.result) == (Status.COMPLETED, 2)
    events = await runtime.store.events(done.id)
    retrying = [orjson.loads(e.task_json) for e in events if e.type is EventType.RETRYING]
    assert retrying[0]["error"] == {"code": "retry_requested", "message": "not yet"}


async def test_timeout_retries_then_ends_timeout(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("slow", timeout_s=0.2, max_attempts=2)
    async def slow(ctx: TaskContext, input: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    runtime = await runtime_factory(app)
    done = await wait_task(runtime, (await app.submit("slow")).id)
    assert (done.status, done.attempt, done.error.code) == (Status.TIMEOUT, 2, "timeout")
    assert await event_types(runtime, done.id) == [
        EventType.CREATED,
        EventType.PROCESSING,
        EventType.RETRYING,
        EventType.PROCESSING,
        EventType.TIMEOUT,
    ]


async def test_sync_handlers_run_in_a_thread_and_report_progress(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("blocking")
    def blocking(ctx: TaskContext, input: dict[str, Any]) -> str:
        assert threading.current_thread() is not threading.main_thread()
        ctx.progress(40, "from a thread")
        time.sleep(0.15)
        return threading.current_thread().name

    runtime = await runtime_factory(app, progress_interval_s=0.0)
    done = await wait_task(runtime, (await app.submit("blocking")).id)
    assert (done.status, done.result) == (Status.COMPLETED, "errands-handler")
    assert EventType.PROGRESS in await event_types(runtime, done.id)


async def test_cancel_stops_a_running_async_handler(runtime_factory: RuntimeFactory) -> None:
    app = Errands()
    started, stopped = asyncio.Event(), asyncio.Event()

    @app.task("forever")
    async def forever(ctx: TaskContext, input: dict[str, Any]) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "unreachable"

    runtime = await runtime_factory(app)
    task = await app.submit("forever", owner="alice")
    await asyncio.wait_for(started.wait(), 5)
    cancelled = await runtime.service.cancel(task.id, _admin())
    assert cancelled.status is Status.CANCELLED
    await asyncio.wait_for(stopped.wait(), 5)
    await until(lambda: runtime.worker is not None and runtime.worker.running == 0)
    assert (await event_types(runtime, task.id))[-1] is EventType.CANCELLED


async def test_a_cancelled_sync_handler_writes_nothing_afterwards(runtime_factory: RuntimeFactory) -> None:
    app = Errands()
    started, finished = threading.Event(), threading.Event()

    @app.task("stubborn")
    def stubborn(ctx: TaskContext, input: dict[str, Any]) -> str:
        started.set()
        while not ctx.cancelled:
            time.sleep(0.005)
        ctx.progress(99, "too late")  # ignored: the attempt no longer counts
        finished.set()
        return "too late"

    runtime = await runtime_factory(app, progress_interval_s=0.0)
    task = await app.submit("stubborn")
    await until(started.is_set)
    await runtime.service.cancel(task.id, _admin())
    await until(finished.is_set)
    await until(lambda: runtime.worker is not None and runtime.worker.running == 0)
    final = await runtime.store.get(task.id)
    assert final.status is Status.CANCELLED and final.result is None and final.progress == 0
    assert (await event_types(runtime, task.id))[-1] is EventType.CANCELLED


async def test_a_lost_lease_stops_the_handler_and_the_task_runs_again(
    runtime_factory: RuntimeFactory,
) -> None:
    app = Errands()
    clock = ManualClock()
    first_started, first_stopped = asyncio.Event(), asyncio.Event()

    @app.task("stalls", max_attempts=3)
    async def stalls(ctx: TaskContext, input: dict[str, Any]) -> int:
        if ctx.attempt == 1:
            first_started.set()
            try:
                await asyncio.sleep(60)
            finally:
                first_stopped.set()
        return ctx.attempt

    runtime = await runtime_factory(app, clock=clock, lease_s=30, heartbeat_s=3600, sweeper=False)
    task = await app.submit("stalls")
    await asyncio.wait_for(first_started.wait(), 5)
    clock.advance(31)  # the lease runs out without a heartbeat, as if this process had stalled
    from errands.sweeper import Sweeper

    sweeper = Sweeper(
        runtime.store, runtime.settings, clock=clock, rng=runtime.rng, registry=app, intake=runtime.intake
    )
    report = await sweeper.sweep()
    assert report.requeued_or_failed == 1
    await asyncio.wait_for(first_stopped.wait(), 5)
    clock.advance(1)  # past the backoff
    runtime.worker._wake.set()  # type: ignore[union-attr]
    done = await wait_task(runtime, task.id)
    assert (done.status, done.result, done.attempt) == (Status.COMPLETED, 2, 2)
    types = await event_types(runtime, task.id)
    assert types.count(EventType.COMPLETED) == 1
    assert types[:4] == [EventType.CREATED, EventType.PROCESSING, EventType.RETRYING, EventType.PROCESSING]


async def test_concurrency_per_owner_limits_one_owner_not_the_others(runtime_factory: RuntimeFactory) -> None:
    app = Errands()
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    @app.task("fair", concurrency_per_owner=1)
    async def fair(ctx: TaskContext, input: dict[str, Any]) -> None:
        running[ctx.owner] = running.get(ctx.owner, 0) + 1
        peak[ctx.owner] = max(peak.get(ctx.owner, 0), running[ctx.owner])
        await asyncio.sleep(0.05)
        running[ctx.owner] -= 1

    runtime = await runtime_factory(app, concurrency=8)
    ids = [(await app.submit("fair", owner="alice")).id for _ in range(4)]
    ids.append((await app.submit("fair", owner="bob")).id)
    for task_id in ids:
        assert (await wait_task(runtime, task_id)).status is Status.COMPLETED
    assert peak == {"alice": 1, "bob": 1}


async def test_shutdown_lets_quick_handlers_finish_and_gives_back_the_rest(
    runtime_factory: RuntimeFactory,
) -> None:
    app = Errands()
    started: set[str] = set()

    @app.task("quick")
    async def quick(ctx: TaskContext, input: dict[str, Any]) -> str:
        started.add(ctx.task_id)
        await asyncio.sleep(0.2)
        return "done"

    @app.task("endless")
    async def endless(ctx: TaskContext, input: dict[str, Any]) -> None:
        started.add(ctx.task_id)
        await asyncio.sleep(60)

    runtime = await runtime_factory(app, shutdown_grace_s=1.0)
    q = await app.submit("quick")
    e = await app.submit("endless")
    await until(lambda: {q.id, e.id} <= started)
    store = runtime.store
    await runtime.stop()
    await store.open()
    try:
        assert (await store.get(q.id)).status is Status.COMPLETED
        released = await store.get(e.id)
        assert (released.status, released.attempt) == (Status.PENDING, 0)
    finally:
        await store.close()
        await store.open()  # the fixture stops the runtime again


async def test_in_process_submit_validates_like_the_api(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("known")
    async def known(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    await runtime_factory(app, workers=False)
    with pytest.raises(UnknownTaskType):
        await app.submit("unknown")
    first = await app.submit("known", {"a": 1}, id="mine")
    again = await app.submit("known", {"a": 1}, id="mine")
    assert first.id == again.id == "mine"


def _admin() -> Any:
    from errands.auth import SYSTEM

    return SYSTEM


async def test_a_task_stopped_before_its_handler_started_does_not_run(
    runtime_factory: RuntimeFactory,
) -> None:
    from errands.store.records import ClaimSpec
    from errands.worker import Worker
    from errands.worker.attempt import StopReason

    app = Errands()
    ran: list[str] = []

    @app.task("slow")
    async def slow(ctx: TaskContext, input: dict[str, Any]) -> None:
        ran.append(ctx.task_id)
        await asyncio.sleep(60)

    runtime = await runtime_factory(app, workers=False)
    worker = Worker(
        app, runtime.store, runtime.hub, runtime.settings, clock=runtime.clock, rng=runtime.rng,
        callbacks=runtime.callbacks,
    )  # fmt: skip
    task = await app.submit("slow")
    [record] = await runtime.store.claim(worker_id=worker.id, specs=[ClaimSpec("slow")], limit=1, lease_s=30)
    worker._start(record)
    worker.stop_task(task.id, StopReason.CANCELLED)  # before the attempt's coroutine took its first step
    await until(lambda: worker.running == 0, timeout_s=5)
    assert ran in ([], [task.id])
    await worker.shutdown(0)


async def test_an_event_older_than_the_claim_does_not_stop_the_handler(
    runtime_factory: RuntimeFactory,
) -> None:
    """The hub may deliver a task's creation after this worker claimed it (another process's
    commit, read from the log later): that stale 'pending' must not look like a requeue."""
    from errands.store.records import ClaimSpec
    from errands.worker import Worker

    app = Errands()
    release = asyncio.Event()

    @app.task("waits")
    async def waits(ctx: TaskContext, input: dict[str, Any]) -> str:
        await release.wait()
        return "done"

    runtime = await runtime_factory(app, workers=False)
    worker = Worker(
        app, runtime.store, runtime.hub, runtime.settings, clock=runtime.clock, rng=runtime.rng,
        callbacks=runtime.callbacks,
    )  # fmt: skip
    task = await app.submit("waits")
    [creation] = await runtime.store.events(task.id)
    [record] = await runtime.store.claim(worker_id=worker.id, specs=[ClaimSpec("waits")], limit=1, lease_s=30)
    worker._start(record)
    worker._on_event(creation)  # late delivery of the task.created event
    await asyncio.sleep(0)
    release.set()
    done = await wait_task(runtime, task.id)
    assert (done.status, done.result) == (Status.COMPLETED, "done")
    await worker.shutdown(1)
