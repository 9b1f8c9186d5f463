"""Which slots a schedule fires: the missed-slot policies and daylight-saving changes (no I/O)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from errands import Errands, TaskContext
from errands.errors import ConfigError
from errands.model.schedules import (
    BadSchedule,
    Schedule,
    ScheduleSpec,
    check,
    fire,
    next_slots,
    slot_task_id,
)

NY = ZoneInfo("America/New_York")


def at(*parts: int, tz: ZoneInfo = NY, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=tz, fold=fold).timestamp()  # type: ignore[misc]


def stored(spec: ScheduleSpec, next_at: float) -> Schedule:
    return Schedule(spec, "api", False, next_at, None, None, 0.0, 0.0)


def local(ts: float) -> str:
    return datetime.fromtimestamp(ts, NY).strftime("%m-%d %H:%M%z")


def test_a_fixed_time_in_the_skipped_hour_runs_right_after_the_jump() -> None:
    spec = ScheduleSpec("d", "work", "30 2 * * *", tz="America/New_York")
    slots = next_slots(spec, after=at(2026, 3, 7, 12), n=3)
    assert [local(s) for s in slots] == ["03-08 03:00-0400", "03-09 02:30-0400", "03-10 02:30-0400"]


def test_a_fixed_time_in_the_repeated_hour_runs_once() -> None:
    spec = ScheduleSpec("d", "work", "30 1 * * *", tz="America/New_York")
    slots = next_slots(spec, after=at(2026, 10, 31, 12), n=2)
    assert [local(s) for s in slots] == ["11-01 01:30-0400", "11-02 01:30-0500"]


def test_a_finer_schedule_follows_the_wall_clock_through_the_repeated_hour() -> None:
    spec = ScheduleSpec("d", "work", "*/30 * * * *", tz="America/New_York")
    slots = next_slots(spec, after=at(2026, 11, 1, 0, 15), n=5)
    assert [local(s) for s in slots] == [
        "11-01 00:30-0400", "11-01 01:00-0400", "11-01 01:30-0400", "11-01 01:00-0500", "11-01 01:30-0500",
    ]  # fmt: skip
    assert len(set(slots)) == 5 and slots == sorted(slots)


def test_a_due_slot_fires_and_the_next_one_is_waited_for() -> None:
    spec = ScheduleSpec("q", "work", "*/15 * * * *")
    slot = at(2026, 12, 2, 9, 0, tz=ZoneInfo("UTC"))
    firing = fire(stored(spec, slot), now=slot + 1)
    assert (firing.slot, firing.next_at, firing.skipped) == (slot, slot + 900, 0)
    assert fire(stored(spec, slot), now=slot - 1).slot is None  # not yet


@pytest.mark.parametrize(("missed", "fired"), [("last", True), ("skip", False)])
def test_slots_missed_while_errands_was_down_follow_the_policy(missed: str, fired: bool) -> None:
    spec = ScheduleSpec("q", "work", "*/15 * * * *", missed=missed)  # type: ignore[arg-type]
    first = at(2026, 12, 2, 9, 0, tz=ZoneInfo("UTC"))
    # Down from just before 09:00 to 10:05: 09:00, 09:15, 09:30, 09:45 and 10:00 were missed.
    firing = fire(stored(spec, first), now=first + 3900)
    assert firing.next_at == first + 4500  # 10:15
    assert firing.slot == (first + 3600 if fired else None)  # the latest, 10:00, five minutes late
    assert firing.skipped == (4 if fired else 5)


def test_skip_still_fires_a_slot_within_its_grace() -> None:
    spec = ScheduleSpec("q", "work", "*/15 * * * *", missed="skip", grace_s=120)
    first = at(2026, 12, 2, 9, 0, tz=ZoneInfo("UTC"))
    assert fire(stored(spec, first), now=first + 119).slot == first
    assert fire(stored(spec, first), now=first + 121).slot is None


def test_slot_ids_are_the_same_on_every_node_and_are_task_ids() -> None:
    slot = at(2026, 12, 3, 9, 0, tz=ZoneInfo("Asia/Shanghai"))
    assert slot_task_id("digest", slot) == "digest-20261203T010000Z"
    assert len(slot_task_id("x" * 40, slot)) <= 64


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (ScheduleSpec("d", "work", "61 * * * *"), "cron"),
        (ScheduleSpec("d", "work", "* * *"), "cron"),
        (ScheduleSpec("d", "work", "0 0 30 2 *"), "cron"),
        (ScheduleSpec("d", "work", "0 9 * * *", tz="Mars/Olympus"), "tz"),
        (ScheduleSpec("d", "work", "0 9 * * *", tz="../../etc/passwd"), "tz"),
        (ScheduleSpec("d", "work", "0 9 * * *", tz="Asia/\x00"), "tz"),
        (ScheduleSpec("no spaces", "work", "0 9 * * *"), "name"),
        (ScheduleSpec("d", "work", "0 9 * * *", grace_s=0), "grace_s"),
        (ScheduleSpec("d", "work", "0 9 * * *", priority=5000), "priority"),
        (ScheduleSpec("d", "work", "0 9 * * *", owner=""), "an owner"),
        (ScheduleSpec("d", "work", "0 9 * * *", owner="a\x00"), "an owner"),
        (ScheduleSpec("d", "work", "0 9 * * *", input={"x": float("nan")}), "input"),
    ],
)
def test_unusable_schedules_are_refused_saying_why(spec: ScheduleSpec, says: str) -> None:
    with pytest.raises(BadSchedule, match=f"^{says}"):
        check(spec, now=at(2026, 12, 2, 0, 0))


def test_an_app_declares_schedules_above_its_handlers_or_alone() -> None:
    app = Errands()

    @app.schedule("digest", cron="0 9 * * *", tz="Asia/Shanghai", input={"kind": "daily"})
    @app.task("digest")
    async def digest(ctx: TaskContext, input: dict[str, str]) -> None:
        return None

    app.schedule("weekly", type="digest", cron="0 9 * * 1")
    assert app.schedules["digest"].type == "digest" and app.schedules["digest"].input == {"kind": "daily"}
    assert app.schedules["weekly"].cron == "0 9 * * 1"
    with pytest.raises(ConfigError, match="declared twice"):
        app.schedule("weekly", type="digest", cron="0 9 * * 1")
    with pytest.raises(ConfigError, match="cron"):
        app.schedule("bad", type="digest", cron="0 25 * * *")
    with pytest.raises(ConfigError, match="priority"):
        app.schedule("urgent", type="digest", cron="0 9 * * *", priority=5000)
    with pytest.raises(ConfigError, match="owner"):
        app.schedule("nobody", type="digest", cron="0 9 * * *", owner="")
