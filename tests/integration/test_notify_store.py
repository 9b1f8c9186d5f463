"""The notification half of the store contract, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from typing import Any

from errands import model
from errands.clock import ManualClock
from errands.model import EventType, TaskError
from errands.notify.policy import Route, Sent, after_attempt, plan
from errands.store.base import Store
from errands.store.records import AttemptResult, ClaimSpec, Endpoint, Message
from tests.integration.conftest import new_task

ENDPOINT = Endpoint(
    id="ep_1", url="https://example.com/hook", description=None, events=("task.*",), types=None,
    owners=None, secret="whsec_" + "QUJD" * 8, previous_secret=None, previous_secret_until=None,
    enabled=True, disabled_reason=None, failing_since=None, throttled_until=None, created_at=0.0,
    updated_at=0.0,
)  # fmt: skip


async def finished_task(store: Store, clock: ManualClock, task_id: str = "t1", **fields: Any) -> None:
    """A task that ran and failed: created, processing, failed."""
    await store.create(new_task(task_id, **fields))
    [claimed] = await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=1, lease_s=30)
    token = claimed.lease_token
    error = TaskError("x", "x")
    await store.apply(
        task_id,
        lambda r: model.fail_attempt(
            r, now=clock.now(), lease_token=token, error=error, retry=False, retry_delay_s=0
        ),
    )


async def fan_out(store: Store, clock: ManualClock, routes: list[Route]) -> list[Message]:
    cursor = await store.notify_cursor()
    events = (await store.read_log(cursor)).events
    ids = iter(range(1000))
    messages = plan(events, routes, now=clock.now(), new_id=lambda: f"msg_{next(ids):026d}")
    assert await store.add_messages(cursor, events[-1].seq, messages)
    return messages


def result(message: Message, sent: Sent, *, token: str | None = None) -> AttemptResult:
    """What the notifier decides after sending ``message`` with the answer ``sent``."""
    decided = after_attempt(
        message, sent, now=message.updated_at, schedule=(0.0, 5.0, 300.0), jitter=0.0, rnd=0.5,
        disable_after_s=86_400,
    )  # fmt: skip
    return dataclasses.replace(decided, lease_token=token or decided.lease_token)


OK = Sent(True, 200)


async def claim(store: Store, clock: ManualClock, hooks: tuple[str, ...] = ()) -> list[Message]:
    found = await store.claim_messages(
        now=clock.now(), limit=50, lease_s=60, channels=("endpoint", "url"), hooks=hooks
    )
    return [m for m, _ in found]


async def test_the_cursor_moves_once_and_a_late_fan_out_stores_nothing(
    store: Store, clock: ManualClock
) -> None:
    await store.create_endpoint(ENDPOINT)
    await finished_task(store, clock)
    cursor = await store.notify_cursor()
    events = (await store.read_log(cursor)).events
    routes = [Route("endpoint", "ep_1", ("task.failed",))]
    made = plan(events, routes, now=clock.now(), new_id=lambda: "msg_a")
    assert len(made) == 1
    assert await store.add_messages(cursor, events[-1].seq, made[:1])
    # Another process, late, with the old cursor: refused, nothing stored twice.
    assert not await store.add_messages(cursor, events[-1].seq, [dataclasses.replace(made[0], id="msg_b")])
    assert await store.notify_cursor() == events[-1].seq
    assert [m.id for m in await store.list_messages(_all())] == ["msg_a"]


async def test_the_fan_out_may_skip_the_log_only_until_a_task_with_a_notify_url_ends(
    store: Store, clock: ManualClock
) -> None:
    await finished_task(store, clock, "plain")  # no notify_url: nothing for the fan-out
    assert not await store.notify_urls_after(0)
    await store.create(new_task("cb", notify_url="https://example.com/cb"))
    [claimed] = await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=1, lease_s=30)
    before_end = (await store.read_log(0)).events[-1].seq
    token = claimed.lease_token
    await store.apply("cb", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=1))
    [end] = [e for e in (await store.read_log(before_end)).events if e.type is EventType.COMPLETED]
    assert await store.notify_urls_after(0)
    assert await store.notify_urls_after(before_end)
    assert await store.notify_urls_after(end.seq - 1)
    assert not await store.notify_urls_after(end.seq)  # nothing changed since


def _all() -> object:
    from errands.store.records import MessageQuery

    return MessageQuery()


async def test_claims_keep_order_per_task_and_a_lost_lease_only_logs(
    store: Store, clock: ManualClock
) -> None:
    await store.create_endpoint(ENDPOINT)
    await finished_task(store, clock)
    made = await fan_out(store, clock, [Route("endpoint", "ep_1", ("task.*",))])
    assert [m.event_type for m in made] == ["task.created", "task.processing", "task.failed"]
    [first] = await claim(store, clock)  # the later ones wait for the first
    assert first.event_type == "task.created" and first.attempts == 1 and first.lease_token
    assert await claim(store, clock) == []
    # The lease runs out; another sender claims it again; the first sender's report only logs.
    clock.advance(61)
    [again] = await claim(store, clock)
    assert again.id == first.id and again.attempts == 2 and again.lease_token != first.lease_token
    await store.finish_message(result(first, OK))
    assert (await store.get_message(first.id)).state == "pending"  # type: ignore[union-attr]
    assert len(await store.attempts(message_id=first.id)) == 1
    await store.finish_message(result(again, OK))
    assert (await store.get_message(first.id)).state == "delivered"  # type: ignore[union-attr]
    [second] = await claim(store, clock)
    assert second.event_type == "task.processing"


async def test_the_task_is_marked_notified_when_its_last_end_message_is_delivered(
    store: Store, clock: ManualClock
) -> None:
    await finished_task(store, clock)
    routes = [Route("endpoint", "ep_1", ("task.failed",)), Route("endpoint", "ep_2", ("task.failed",)),
              Route("hook", "app:refund", ("task.failed",))]  # fmt: skip
    for endpoint_id in ("ep_1", "ep_2"):
        await store.create_endpoint(dataclasses.replace(ENDPOINT, id=endpoint_id))
    await fan_out(store, clock, routes)
    claimed = await claim(store, clock, hooks=("app:refund",))
    assert {m.channel for m in claimed} == {"endpoint", "hook"}
    by_target = {m.target: m for m in claimed}
    await store.finish_message(result(by_target["app:refund"], OK))
    await store.finish_message(result(by_target["ep_1"], OK))
    assert not (await store.get("t1")).notification_sent  # type: ignore[union-attr]
    await store.finish_message(result(by_target["ep_2"], OK))
    task = await store.get("t1")
    assert task.notification_sent  # type: ignore[union-attr]
    assert [e.type for e in await store.events("t1")][-2:] == [EventType.FAILED, EventType.NOTIFIED]


async def test_disabled_throttled_and_foreign_hook_messages_are_not_claimed(
    store: Store, clock: ManualClock
) -> None:
    await store.create_endpoint(ENDPOINT)
    await finished_task(store, clock)
    await fan_out(
        store,
        clock,
        [Route("endpoint", "ep_1", ("task.failed",)), Route("hook", "other:hook", ("task.failed",))],
    )
    clock.advance(1)
    [message] = await claim(store, clock)  # the hook belongs to another app
    await store.finish_message(result(message, Sent(False, 429, throttle=True, retry_after_s=100)))
    throttled = await store.get_endpoint("ep_1")
    assert throttled is not None and throttled.failing_since == clock.now()
    assert throttled.throttled_until == clock.now() + 100
    assert await claim(store, clock) == []
    clock.advance(101)
    await store.update_endpoint("ep_1", lambda e: dataclasses.replace(e, enabled=False, disabled_reason="x"))
    assert await claim(store, clock) == []
    failed = await store.get_message(message.id)
    assert (
        failed is not None and failed.state == "failed" and failed.last_error == "the endpoint was disabled"
    )
    await store.update_endpoint("ep_1", lambda e: dataclasses.replace(e, enabled=True))
    assert await store.recover_endpoint("ep_1", since=0, now=clock.now()) == 1
    [again] = await claim(store, clock)
    assert again.id == message.id and again.attempts == 1  # a fresh schedule
    assert await store.delete_endpoint("ep_1")
    assert not await store.delete_endpoint("ep_1")
    gone = await store.get_message(message.id)
    assert gone is not None and gone.state == "failed" and gone.last_error == "the endpoint was deleted"


async def test_purge_drops_old_finished_messages_and_attempts(store: Store, clock: ManualClock) -> None:
    await store.create_endpoint(ENDPOINT)
    await finished_task(store, clock)
    await fan_out(store, clock, [Route("endpoint", "ep_1", ("task.failed",))])
    [message] = await claim(store, clock)
    await store.finish_message(result(message, OK))
    clock.advance(100)
    await store.purge(finished_before=clock.now() - 10, tombstones_before=0, limit=10)
    assert await store.list_messages(_all()) == []  # type: ignore[arg-type]
    assert await store.attempts() == []
