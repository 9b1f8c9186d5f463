"""The sweeper on a real store with a controlled clock: leases, deadlines, expiry, retention."""

from __future__ import annotations

import random
from typing import Any

import pytest

from errands import Errands, TaskContext
from errands.auth import SYSTEM, Principal
from errands.clock import ManualClock
from errands.errors import Gone, NotFound
from errands.model import EventType, Status
from errands.store.records import ClaimSpec
from errands.sweeper import Sweeper
from tests.integration.conftest import RuntimeFactory, make_settings

app = Errands()


@app.task("work", max_attempts=2)
async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


@pytest.fixture
async def setup(runtime_factory: RuntimeFactory) -> tuple[Any, ManualClock, Sweeper]:
    clock = ManualClock()
    runtime = await runtime_factory(app, workers=False, clock=clock)
    sweeper = Sweeper(
        runtime.store, make_settings("sqlite:///unused"), clock=clock, rng=random.Random(1), registry=app,
        intake=runtime.intake,
    )  # fmt: skip
    return runtime, clock, sweeper


async def claim(runtime: Any) -> None:
    await runtime.store.claim(worker_id="dead", specs=[ClaimSpec("work")], limit=10, lease_s=5)


async def test_an_expired_lease_is_requeued_then_fails(setup: tuple[Any, ManualClock, Sweeper]) -> None:
    runtime, clock, sweeper = setup
    task = await app.submit("work")
    await claim(runtime)
    assert (await sweeper.sweep()).total == 0
    clock.advance(6)
    assert (await sweeper.sweep()).requeued_or_failed == 1
    requeued = await runtime.store.get(task.id)
    assert (requeued.status, requeued.error.code, requeued.lease_token) == (
        Status.PENDING,
        "worker_lost",
        None,
    )
    clock.advance(60)  # past the backoff
    await claim(runtime)
    clock.advance(6)
    await sweeper.sweep()
    failed = await runtime.store.get(task.id)
    assert (failed.status, failed.attempt, failed.error.code) == (Status.FAILED, 2, "worker_lost")
    assert (await sweeper.sweep()).total == 0  # nothing happens twice


async def test_past_the_deadline_times_out(setup: tuple[Any, ManualClock, Sweeper]) -> None:
    runtime, clock, sweeper = setup
    task = await app.submit("work", timeout_s=10, max_attempts=1)
    await claim(runtime)
    for _ in range(3):  # a live worker keeps renewing its lease
        clock.advance(4)
        [(task_id, token)] = [(task.id, (await runtime.store.get(task.id)).lease_token)]
        await runtime.store.renew({task_id: token}, 5)
    assert (await sweeper.sweep()).timed_out == 1
    ended = await runtime.store.get(task.id)
    assert (ended.status, ended.error.code) == (Status.TIMEOUT, "timeout")


async def test_unfinished_tasks_expire(setup: tuple[Any, ManualClock, Sweeper]) -> None:
    runtime, clock, sweeper = setup
    task = await app.submit("work", expires_in_s=100)
    clock.advance(99)
    assert (await sweeper.sweep()).expired == 0
    clock.advance(2)
    assert (await sweeper.sweep()).expired == 1
    ended = await runtime.store.get(task.id)
    assert (ended.status, ended.error.code) == (Status.TIMEOUT, "expired")
    assert [e.type for e in await runtime.store.events(task.id)][-1] is EventType.TIMEOUT


async def test_finished_tasks_are_purged_and_answer_gone(setup: tuple[Any, ManualClock, Sweeper]) -> None:
    runtime, clock, sweeper = setup
    task = await app.submit("work", owner="alice")
    await runtime.service.cancel(task.id, SYSTEM)
    clock.advance(runtime.settings.retention_s - 1)
    assert (await sweeper.sweep()).purged == 0
    clock.advance(2)
    assert (await sweeper.sweep()).purged == 1
    with pytest.raises(Gone):
        await runtime.service.get(task.id, Principal(admin=False, owner="alice"))
    with pytest.raises(NotFound):
        await runtime.service.get(task.id, Principal(admin=False, owner="mallory"))
    assert await runtime.store.events(task.id) == []
    clock.advance(runtime.settings.tombstone_s + 1)
    await sweeper.sweep()
    with pytest.raises(NotFound):
        await runtime.service.get(task.id, SYSTEM)
