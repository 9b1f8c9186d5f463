"""Schedules on both stores, with the controlled clock: two nodes fire each slot once over a
simulated day (across a daylight-saving change, and after errands was down for an hour), and
the ``/v1/schedules`` API."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from errands import Errands, TaskContext
from errands.clock import ManualClock, iso
from errands.model import EventType, Status, TaskRecord
from errands.model.schedules import ScheduleSpec, slot_task_id
from errands.runtime import Runtime
from errands.store.records import TaskQuery
from tests.integration.conftest import RuntimeFactory, http, wait_task
from tests.integration.test_worker import event_types

NY = ZoneInfo("America/New_York")


def expected_slots(start: float, end: float, *, minute_of: int) -> list[float]:
    """Every UTC minute in (start, end] whose New York wall-clock minute is a multiple of
    ``minute_of``: the slots of ``*/minute_of * * * *``, found without cron."""
    found = []
    t = int(start // 60 + 1) * 60
    while t <= end:
        if datetime.fromtimestamp(t, NY).minute % minute_of == 0:
            found.append(float(t))
        t += 60
    return found


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0) -> None:
    """Until ``condition()`` holds (read from the store, which the loops write)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - the state is in the database
            await asyncio.sleep(0.002)


async def fired_up_to(runtime: Runtime, names: list[str], now: float) -> None:
    """Until every schedule has moved past ``now`` (its due slot fired, or skipped)."""

    async def moved() -> bool:
        for name in names:
            schedule = await runtime.store.get_schedule(name)
            if schedule is None or schedule.next_at is None or schedule.next_at <= now:
                return False
        return True

    await eventually(moved, f"schedules fired by {iso(now)}")


async def tasks_of(runtime: Runtime, prefix: str) -> list[TaskRecord]:
    found: list[TaskRecord] = []
    before = None
    while True:
        page = await runtime.store.list_tasks(TaskQuery(owner=None, limit=200, before=before))
        found.extend(r for r in page if r.id.startswith(prefix + "-"))
        if len(page) < 200:
            return found
        before = (page[-1].created_at, page[-1].id)


def make_app(ran: list[str]) -> Errands:
    app = Errands()

    @app.schedule("every20", cron="*/20 * * * *", tz="America/New_York")
    @app.schedule("skip20", cron="*/20 * * * *", tz="America/New_York", missed="skip")
    @app.schedule("nightly", cron="30 1 * * *", tz="America/New_York", input={"kind": "nightly"})
    @app.task("tick")
    async def tick(ctx: TaskContext, input: dict[str, Any]) -> None:
        ran.append(ctx.task_id)

    return app


@pytest.mark.timeout(120)
async def test_two_nodes_fire_each_slot_once_over_a_day_across_dst_and_an_outage(
    runtime_factory: RuntimeFactory,
) -> None:
    # New York, from 18:00 on Oct 31st: the clocks go back at 02:00 on Nov 1st (01:00-02:00
    # happens twice), and from 09:02 to 10:02 no node runs (the clock jumps an hour at once).
    ran: list[str] = []
    start = datetime(2026, 10, 31, 18, 0, tzinfo=NY).timestamp()
    clock = ManualClock(start)
    node_a = await runtime_factory(make_app(ran), clock=clock, sweeper=True)
    node_b = await runtime_factory(make_app(ran), clock=clock, sweeper=True)
    names = ["every20", "skip20", "nightly"]
    outage_from = datetime(2026, 11, 1, 9, 2, tzinfo=NY).timestamp()
    end = start + 26 * 3600  # the day has 25 hours; one more
    # Every five minutes (on each slot, on time), but nothing between 09:02 and 10:02.
    times = [start + 300 * k for k in range(1, 26 * 12 + 1)]
    times = sorted(
        {t for t in times if not outage_from < t < outage_from + 3600} | {outage_from, outage_from + 3600}
    )
    for t in times:
        clock.advance(t - clock.now())
        await fired_up_to(node_a if len(ran) % 2 else node_b, names, t)
    every = expected_slots(start, end, minute_of=20)
    missed = [s for s in every if outage_from < s <= outage_from + 3600]
    assert len(missed) == 3  # 09:20, 09:40, 10:00
    for name, slots in (
        ("every20", [s for s in every if s not in missed[:-1]]),  # "last": 10:00, two minutes late
        ("skip20", [s for s in every if s not in missed]),  # "skip": none of them
    ):
        found = sorted(r.created_at for r in await tasks_of(node_a, name))
        assert len(found) == len(slots), name
        assert {r.id for r in await tasks_of(node_a, name)} == {
            f"{name}-{datetime.fromtimestamp(s, UTC):%Y%m%dT%H%M%SZ}" for s in slots
        }
    nightly = await tasks_of(node_a, "nightly")
    # Once on Nov 1st (01:30 EDT, not again at 01:30 EST) and once on Nov 2nd... which is past
    # the end: one in all, as Debian's cron does.
    assert [r.id for r in nightly] == ["nightly-20261101T053000Z"]
    assert nightly[0].input == {"kind": "nightly"}
    # Each task ran once, on one node or the other.
    everything = [r for name in names for r in await tasks_of(node_a, name)]
    for record in everything:
        done = await wait_task(node_a, record.id)
        assert done.status is Status.COMPLETED
        assert (await event_types(node_a, record.id)).count(EventType.PROCESSING) == 1
    assert sorted(ran) == sorted(r.id for r in everything)


async def test_schedules_over_the_api(runtime_factory: RuntimeFactory) -> None:
    app = Errands()

    @app.task("report")
    async def report(ctx: TaskContext, input: dict[str, Any]) -> None:
        return None

    clock = ManualClock(datetime(2026, 12, 2, 0, 0, tzinfo=UTC).timestamp())
    runtime = await runtime_factory(app, workers=False, sweeper=True, clock=clock)
    body = {"name": "daily", "type": "report", "cron": "0 9 * * *", "tz": "Asia/Shanghai", "input": {"a": 1}}
    async with http(runtime) as admin:
        r = await admin.post("/v1/schedules", json=body)
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["next_at"] == "2026-12-02T01:00:00.000Z" and created["source"] == "api"
        assert created["next_runs"][:2] == ["2026-12-02T01:00:00.000Z", "2026-12-03T01:00:00.000Z"]
        assert (await admin.post("/v1/schedules", json=body)).status_code == 200
        r = await admin.post("/v1/schedules", json={**body, "cron": "0 10 * * *"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "schedule_exists"
        r = await admin.get("/v1/schedules/daily", params={"next": 3})
        assert len(r.json()["next_runs"]) == 3
        r = await admin.get("/v1/schedules/daily", params={"next": 0})
        assert r.status_code == 200 and r.json()["next_runs"] == []
        assert [s["name"] for s in (await admin.get("/v1/schedules")).json()["schedules"]] == ["daily"]

        clock.advance(3600)  # 09:00 in Shanghai
        await until_fired(runtime, "daily-20261202T010000Z")
        task = await runtime.store.get("daily-20261202T010000Z")
        assert isinstance(task, TaskRecord) and task.input == {"a": 1} and task.type == "report"

        r = await admin.post("/v1/schedules/daily/pause")
        assert r.json()["paused"] is True and r.json()["next_at"] is None and r.json()["next_runs"] == []
        clock.advance(2 * 86_400)  # two slots pass while paused
        r = await admin.post("/v1/schedules/daily/resume")
        assert r.json()["next_at"] == "2026-12-05T01:00:00.000Z"  # the passed slots do not run
        await runtime.scheduler.tick()
        assert len(await tasks_of(runtime, "daily")) == 1

        r = await admin.put(
            "/v1/schedules/daily",
            json={k: v for k, v in body.items() if k != "name"} | {"cron": "0 12 * * *"},
        )
        assert r.status_code == 200 and r.json()["cron"] == "0 12 * * *"
        assert r.json()["next_at"] == "2026-12-04T04:00:00.000Z"
        assert (await admin.put("/v1/schedules/other", json=body)).status_code == 422
        assert (await admin.delete("/v1/schedules/daily")).status_code == 204
        assert (await admin.delete("/v1/schedules/daily")).status_code == 404
        assert (await admin.get("/v1/schedules/daily")).status_code == 404
        owner = (await admin.post("/v1/tokens", json={"owner": "alice"})).json()["token"]
    async with http(runtime, owner) as alice:
        assert (await alice.get("/v1/schedules")).status_code == 403
        assert (await alice.post("/v1/schedules", json=body)).status_code == 403
    assert await runtime.store.list_schedules() == []


async def until_fired(runtime: Runtime, task_id: str) -> None:
    async def submitted() -> bool:
        return await runtime.store.get(task_id) is not None

    await eventually(submitted, task_id)


async def test_declared_schedules_are_stored_at_start_and_follow_the_app(
    runtime_factory: RuntimeFactory,
) -> None:
    clock = ManualClock(datetime(2026, 12, 2, 0, 0, tzinfo=UTC).timestamp())
    first = Errands()
    first.schedule("nightly", type="tick", cron="0 3 * * *")
    first.task("tick")(_noop)
    runtime = await runtime_factory(first, workers=False, sweeper=True, clock=clock)
    stored = await runtime.store.get_schedule("nightly")
    assert stored is not None and stored.source == "app" and stored.next_at == clock.now() + 3 * 3600
    await runtime.scheduler.pause("nightly", _admin(), paused=True)
    await runtime.stop()
    # The next release runs it at 04:00: replaced, and still paused as an operator left it.
    second = Errands()
    second.schedule("nightly", type="tick", cron="0 4 * * *")
    second.task("tick")(_noop)
    runtime = await runtime_factory(second, workers=False, sweeper=True, clock=clock)
    stored = await runtime.store.get_schedule("nightly")
    assert stored is not None and stored.spec.cron == "0 4 * * *" and stored.paused
    await runtime.scheduler.pause("nightly", _admin(), paused=False)
    await runtime.stop()
    # A release that no longer declares it: paused, not firing, not deleted.
    third = Errands()
    third.task("tick")(_noop)
    runtime = await runtime_factory(third, workers=False, sweeper=True, clock=clock)
    stored = await runtime.store.get_schedule("nightly")
    assert stored is not None and stored.paused and stored.source == "undeclared"
    clock.advance(5 * 3600)
    assert await runtime.scheduler.tick() == 0
    await runtime.stop()
    # A release that declares it again: resumed (errands paused it, not an operator).
    fourth = Errands()
    fourth.schedule("nightly", type="tick", cron="0 4 * * *")
    fourth.task("tick")(_noop)
    runtime = await runtime_factory(fourth, workers=False, sweeper=True, clock=clock)
    stored = await runtime.store.get_schedule("nightly")
    assert stored is not None and not stored.paused and stored.source == "app" and stored.next_at is not None


async def test_a_schedule_that_cannot_submit_passes_its_slot_and_blocks_no_other(
    runtime_factory: RuntimeFactory,
) -> None:
    """A stored schedule whose tasks are refused (an older errands checked less, or its type left
    the app) logs and moves on at each slot; the other schedules fire as due."""
    clock = ManualClock(datetime(2026, 12, 2, 0, 0, tzinfo=UTC).timestamp())
    app = Errands()
    app.task("tick")(_noop)
    runtime = await runtime_factory(app, workers=False, clock=clock)  # ticked here only
    first = clock.now() + 60
    bad = ScheduleSpec("bad", "tick", "* * * * *", priority=5000, owner="")
    gone = ScheduleSpec("gone", "no-such-type", "* * * * *")
    good = ScheduleSpec("good", "tick", "* * * * *")
    for spec in (bad, gone, good):
        await runtime.store.put_schedule(spec, source="api", next_at=first, replace=True)
    for minute in range(1, 3):
        clock.advance(60)
        assert await runtime.scheduler.tick() == 1
        for name in ("bad", "gone", "good"):
            stored = await runtime.store.get_schedule(name)
            assert stored is not None and stored.next_at == first + 60 * minute
    assert await runtime.store.get(slot_task_id("good", first)) is not None
    assert await runtime.store.get(slot_task_id("bad", first)) is None


async def _noop(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


def _admin() -> Any:
    from errands.auth import SYSTEM

    return SYSTEM


async def test_a_schedule_replaced_after_it_was_read_does_not_fire_as_it_was(
    runtime_factory: RuntimeFactory,
) -> None:
    """Firing compares the schedule as it was read (next slot and last change): one replaced
    meanwhile, even with the same next slot, is fired by the next pass, as it is now."""
    clock = ManualClock(datetime(2026, 12, 2, 0, 0, tzinfo=UTC).timestamp())
    app = Errands()
    app.task("tick")(_noop)
    runtime = await runtime_factory(app, workers=False, clock=clock)
    first = clock.now() + 60
    original = ScheduleSpec("s", "tick", "* * * * *")
    await runtime.store.put_schedule(original, source="api", next_at=first, replace=True)
    stale = await runtime.store.get_schedule("s")
    assert stale is not None
    clock.advance(1)
    changed = ScheduleSpec("s", "tick", "* * * * *", input={"v": 2})
    await runtime.store.put_schedule(changed, source="api", next_at=first, replace=True)
    moved, record = await runtime.store.fire_schedule(stale, slot=first, next_at=first + 60, task=None)
    assert (moved, record) == (False, None)
    clock.advance(60)
    assert await runtime.scheduler.tick() == 1
    task = await runtime.store.get(slot_task_id("s", first))
    assert isinstance(task, TaskRecord) and task.input == {"v": 2}
