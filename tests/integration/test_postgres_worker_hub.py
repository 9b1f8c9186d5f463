"""A worker process on PostgreSQL follows only the tasks it runs (Hub.follow_only): it reads
their events when a commit's hints say one may have been stopped, and learns of new work and of
ends from the hints alone. Its leases are renewed only every 20 s here (lease_s=60), and it
polls as seldom, so what it hears within the test's few seconds it heard from the hints."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from errands import Errands, TaskContext
from errands.auth import SYSTEM
from errands.model import Event, EventType, Status
from tests.integration.conftest import RuntimeFactory, wait_task

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
