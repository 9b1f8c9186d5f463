"""Delayed tasks on both stores, with the controlled clock: ``run_at``, ``delay_s``,
``start_within_s``, and the queue that holds them until they are due."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from errands import Errands, TaskContext
from errands.clock import ManualClock, iso
from errands.errors import InvalidRequest
from errands.model import EventType, Status, TaskRecord, manual_retry, release
from errands.model.decisions import not_started
from errands.store import Store
from errands.store.records import ClaimSpec
from errands.sweeper import Sweeper
from tests.integration.conftest import RuntimeFactory, http, make_settings, new_task, wait_task
from tests.integration.test_worker import event_types

SPECS = [ClaimSpec("work")]


async def claim(store: Store, limit: int = 10) -> list[str]:
    return [r.id for r in await store.claim(worker_id="w", specs=SPECS, limit=limit, lease_s=30)]


async def test_a_delayed_task_is_not_claimed_one_tick_early_and_is_claimed_at_once_after(
    store: Store, clock: ManualClock
) -> None:
    created, _ = await store.create(new_task("later", delay_s=60.0))
    assert created.status is Status.PENDING
    assert created.scheduled_for == clock.now() + 60
    assert created.public()["scheduled_for"] == iso(clock.now() + 60)
    assert await store.next_ready_at(["work"], after=clock.now()) == clock.now() + 60
    clock.advance(59.999)
    assert await claim(store) == []
    clock.advance(0.001)
    assert await claim(store) == ["later"]
    started = await store.get("later")
    assert isinstance(started, TaskRecord) and started.scheduled_for is None


async def test_run_at_in_the_past_runs_at_once_and_expiry_counts_from_the_due_time(
    store: Store, clock: ManualClock
) -> None:
    now = clock.now()
    past, _ = await store.create(new_task("past", run_at=now - 3600))
    assert past.scheduled_for is None and past.run_after == now
    future, _ = await store.create(new_task("future", run_at=now + 7200, expires_in_s=3600.0))
    assert future.expires_at == now + 7200 + 3600  # a delayed task does not expire before it is due
    assert await claim(store) == ["past"]


async def test_tasks_that_came_due_join_the_queue_in_its_order(store: Store, clock: ManualClock) -> None:
    # Many waiting tasks must not stand in the way of the queue, and once due they take their
    # place in it by priority, then age.
    for i in range(50):
        await store.create(new_task(f"wait-{i:02d}", delay_s=3600.0 + i))
    await store.create(new_task("urgent-later", delay_s=10.0, priority=5))
    await store.create(new_task("now-1"))
    await store.create(new_task("now-2"))
    assert await claim(store, limit=1) == ["now-1"]
    clock.advance(10)
    assert await claim(store, limit=1) == ["urgent-later"]
    assert await claim(store, limit=5) == ["now-2"]
    clock.advance(3600 + 4 - 10)  # 3,604 s after they were created
    assert await claim(store, limit=10) == [f"wait-{i:02d}" for i in range(5)]


async def test_a_task_not_started_within_start_within_s_ends_timeout_not_started(
    store: Store, clock: ManualClock
) -> None:
    await store.create(new_task("prompt", delay_s=30.0, start_within_s=10.0))
    await store.create(new_task("in-time", start_within_s=10.0))
    assert await claim(store) == ["in-time"]  # started in time: start_by no longer counts
    clock.advance(40.001)
    # Past its start_by, no claim may start it, even before the sweeper has ended it.
    assert await claim(store) == []
    due = await store.due(now=clock.now(), limit=10)
    assert list(due.not_started) == ["prompt"]


async def test_tasks_too_late_to_start_do_not_stand_in_the_queue(store: Store, clock: ManualClock) -> None:
    """Until the sweeper ends them, tasks past their start_by must not fill the claims' reads."""
    for i in range(20):
        await store.create(new_task(f"late-{i:02d}", priority=5, start_within_s=1.0))
    clock.advance(2)
    await store.create(new_task("fresh"))
    assert await claim(store, limit=1) == ["fresh"]


async def test_start_within_s_bounds_the_first_start_only(store: Store, clock: ManualClock) -> None:
    """A task that started and was given back (a worker shut down, a provider asked to wait) has
    started: it runs on past its start_by. One retried by hand after ``not_started`` runs now."""
    await store.create(new_task("given-back", start_within_s=10.0))
    (started,) = await store.claim(worker_id="w", specs=SPECS, limit=1, lease_s=30)
    token = started.lease_token or ""
    await store.apply("given-back", lambda r: release(r, now=clock.now(), lease_token=token))
    clock.advance(20)
    assert await claim(store) == ["given-back"]
    assert list((await store.due(now=clock.now(), limit=10)).not_started) == []

    await store.create(new_task("late", start_within_s=10.0))
    clock.advance(20)
    await store.apply("late", lambda r: not_started(r, now=clock.now()))
    retried = await store.apply("late", lambda r: manual_retry(r, now=clock.now(), max_manual_retries=3))
    assert retried.status is Status.PENDING and retried.start_by is None
    assert await claim(store) == ["late"]


async def test_the_sweeper_times_out_what_did_not_start_and_the_owner_is_told(
    runtime_factory: RuntimeFactory,
) -> None:
    app = Errands()

    @app.task("work")
    async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    clock = ManualClock()
    runtime = await runtime_factory(app, workers=False, clock=clock)
    task = await app.submit("work", delay_s=5, start_within_s=60)
    assert task.scheduled_for is not None and task.start_by is not None
    assert task.start_by.timestamp() == pytest.approx(clock.now() + 65)
    sweeper = Sweeper(
        runtime.store, make_settings("sqlite:///unused"), clock=clock, rng=random.Random(1), registry=app,
        intake=runtime.intake,
    )  # fmt: skip
    clock.advance(65)
    assert (await sweeper.sweep()).not_started == 0  # at start_by it may still start
    clock.advance(0.001)
    assert (await sweeper.sweep()).not_started == 1
    ended = await runtime.store.get(task.id)
    assert isinstance(ended, TaskRecord)
    assert ended.status is Status.TIMEOUT and ended.error is not None and ended.error.code == "not_started"
    assert ended.attempt == 0 and ended.started_at is None
    # The end is an event like any other, so every channel that tells the owner of ends hears it.
    assert (await event_types(runtime, task.id))[-1] is EventType.TIMEOUT
    assert (await sweeper.sweep()).not_started == 0


async def test_a_worker_runs_a_delayed_task_when_its_timer_fires_not_before(
    runtime_factory: RuntimeFactory,
) -> None:
    app = Errands()
    ran: list[float] = []
    clock = ManualClock()

    @app.task("work")
    async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
        ran.append(clock.now())

    # No polling to fall back on: only the timer set from the task's due time can start it.
    runtime = await runtime_factory(app, clock=clock, poll_s=3600)
    start = clock.now()
    task = await app.submit("work", delay_s=30)
    first = await app.submit("work")
    await wait_task(runtime, first.id)  # the worker is idle again, its timer set
    clock.advance(29.9)
    await wait_task(runtime, (await app.submit("work")).id)  # another task runs; the delayed one waits
    assert (await runtime.store.get(task.id)).status is Status.PENDING  # type: ignore[union-attr]
    clock.advance(0.1)
    done = await wait_task(runtime, task.id)
    assert done.status is Status.COMPLETED and ran[-1] == start + 30


async def test_delays_over_the_api_are_idempotent_and_visible(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("work")
    async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    clock = ManualClock()
    runtime = await runtime_factory(app, workers=False, clock=clock)
    at = datetime.fromtimestamp(clock.now() + 3600, tz=UTC)
    async with http(runtime) as client:
        body = {"type": "work", "id": "nightly", "run_at": at.isoformat(), "start_within_s": 600}
        r = await client.post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
        assert r.json()["scheduled_for"] == iso(clock.now() + 3600)
        assert r.json()["start_by"] == iso(clock.now() + 4200)
        clock.advance(5)
        again = await client.post("/v1/tasks", json=body)
        assert again.status_code == 200 and again.json()["seq"] == r.json()["seq"]
        moved = await client.post("/v1/tasks", json={**body, "start_within_s": 60})
        assert moved.status_code == 409
        r = await client.post("/v1/tasks", json={"type": "work", "id": "soon", "delay_s": 2.5})
        assert r.json()["scheduled_for"] == iso(clock.now() + 2.5)
        again = await client.post("/v1/tasks", json={"type": "work", "id": "soon", "delay_s": 2.5})
        assert again.status_code == 200  # the same request, though sent later
    with pytest.raises(InvalidRequest):
        await app.submit("work", run_at=datetime(2030, 1, 1), delay_s=1)
