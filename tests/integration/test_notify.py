"""Notifications end to end: signed webhooks to real local receivers, the retry schedule on a
controlled clock, the delivery log, lifecycle hooks and WeChat subscribe messages against a fake
of WeChat's API; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from errands import Errands, Fail, TaskContext
from errands.auth import SYSTEM
from errands.clock import ManualClock
from errands.errors import InvalidRequest
from errands.model import NewTask, Status
from errands.notify.wechat import WeChatTemplate
from errands.registry import HookEvent
from errands.runtime import Runtime
from errands.server import bind, serve_asgi
from errands.service import TokenRequest
from tests.integration.conftest import RuntimeFactory, http, wait_task
from tests.integration.fakes import FakeWeChat, Receiver

T = TypeVar("T")

NOTIFY: dict[str, Any] = {
    "notify_allow_networks": "127.0.0.0/8",
    "notify_jitter": 0.0,
    "notify_poll_s": 0.05,
}


async def settle(check: Callable[[], Awaitable[T]], timeout_s: float = 10.0) -> T:
    """Wait until ``check()`` returns something truthy (the state of another process or loop)."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.01)


async def serve(app: Any) -> AsyncIterator[str]:
    sock = bind("127.0.0.1", 0)
    async with serve_asgi(app, sock):
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    async for url in serve(r.app):
        r.url = url
        yield r


def tasks_app() -> Errands:
    app = Errands()

    @app.task("echo")
    async def echo(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
        return {"echo": input}

    @app.task("boom", max_attempts=1)
    async def boom(ctx: TaskContext, input: dict[str, Any]) -> None:
        raise Fail("broken", "It broke.")

    return app


async def start(runtime_factory: RuntimeFactory, app: Errands | None = None, **overrides: Any) -> Runtime:
    return await runtime_factory(app or tasks_app(), notifier=True, **{**NOTIFY, **overrides})


async def add_endpoint(runtime: Runtime, url: str, **fields: Any) -> dict[str, Any]:
    async with http(runtime) as client:
        r = await client.post("/v1/endpoints", json={"url": url, **fields})
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


async def messages(runtime: Runtime, **query: Any) -> list[dict[str, Any]]:
    async with http(runtime) as client:
        r = await client.get("/v1/messages", params=query)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["messages"]
    return found


def owner_token(runtime: Runtime, owner: str) -> str:
    token: str = runtime.service.mint_token(TokenRequest(owner=owner), SYSTEM)["token"]
    return token


def verified(receiver: Receiver, secret: str) -> list[dict[str, Any]]:
    """Every request the receiver got, checked with the standardwebhooks package."""
    hook = Webhook(secret)
    return [hook.verify(body, headers) for _, headers, body in receiver.requests]


async def test_an_endpoint_receives_every_event_signed_and_the_task_is_marked_notified(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    runtime = await start(runtime_factory)
    endpoint = await add_endpoint(runtime, receiver.url + "/hooks", events=["task.*"], description="backend")
    assert endpoint["secret"].startswith("whsec_") and endpoint["enabled"] is True
    task = await runtime.app.submit("echo", {"n": 1}, owner="alice")
    done = await wait_task(runtime, task.id, lambda t: t.notification_sent)
    assert done.status is Status.COMPLETED
    bodies = verified(receiver, endpoint["secret"])
    assert [b["type"] for b in bodies] == ["task.created", "task.processing", "task.completed"]
    assert bodies[-1]["data"]["task"]["result"] == {"echo": {"n": 1}}
    assert {"type", "timestamp", "data"} == set(bodies[-1])
    sent = await messages(runtime, task_id=task.id)
    assert {m["state"] for m in sent} == {"delivered"}
    assert sorted(receiver.ids()) == sorted(m["id"] for m in sent)
    kinds = [e.type.value for e in await runtime.store.events(task.id)]
    assert kinds[-2:] == ["task.completed", "task.notified"]
    # task.notified is not sent to a task.* subscription (it is about the notifications).
    assert len(receiver.requests) == 3


async def test_the_receiver_down_then_up_gets_each_message_with_one_webhook_id(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    clock = ManualClock(time.time())
    runtime = await start(runtime_factory, clock=clock)
    endpoint = await add_endpoint(runtime, receiver.url, events=["task.completed"])
    receiver.script = [(500, {}), (503, {}), (502, {})]
    task = await runtime.app.submit("echo", {}, owner="alice")
    await wait_task(runtime, task.id)
    for n, delay in [(1, 5), (2, 300)]:  # the schedule: at once, 5 s, 5 min, 30 min…
        await settle(lambda n=n: _attempts(runtime, endpoint["id"], n))  # type: ignore[misc]
        await settle(lambda: _idle(runtime))
        clock.advance(delay)
        assert runtime.notifier is not None
        runtime.notifier.wake()
    await settle(lambda: _attempts(runtime, endpoint["id"], 3))
    clock.advance(1800)
    runtime.notifier.wake()
    done = await wait_task(runtime, task.id, lambda t: t.notification_sent)
    assert done.notification_sent
    assert len(receiver.requests) == 4 and len(set(receiver.ids())) == 1
    async with http(runtime) as client:
        log = (await client.get(f"/v1/endpoints/{endpoint['id']}/attempts")).json()["attempts"]
        failed = (await client.get(f"/v1/endpoints/{endpoint['id']}/attempts?status=failed")).json()
    assert [a["status_code"] for a in log] == [200, 502, 503, 500]
    assert [a["status"] for a in log] == ["succeeded", "failed", "failed", "failed"]
    assert log[0]["response"] == "ok thanks" and log[1]["response"] == "not now"
    assert all(a["latency_ms"] >= 0 for a in log)
    assert len(failed["attempts"]) == 3


async def _attempts(runtime: Runtime, endpoint_id: str, n: int) -> bool:
    return len(await runtime.store.attempts(target=endpoint_id)) >= n


async def _idle(runtime: Runtime) -> bool:
    """No message is being sent: every attempt so far has been recorded."""
    from errands.store.records import MessageQuery

    found = await runtime.store.list_messages(MessageQuery(state="pending"))
    return all(m.lease_token is None for m in found)


async def test_the_schedule_is_followed_then_the_message_is_given_up(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    clock = ManualClock(time.time())
    runtime = await start(runtime_factory, clock=clock, notify_schedule="0s,5s,5m,30m")
    endpoint = await add_endpoint(runtime, receiver.url, events=["task.completed"])
    receiver.script = [(500, {})] * 10
    task = await runtime.app.submit("echo", {}, owner="alice")
    await wait_task(runtime, task.id)
    assert runtime.notifier is not None
    waits = []
    for n, delay in enumerate([5.0, 300.0, 1800.0], start=1):
        await settle(lambda n=n: _attempts(runtime, endpoint["id"], n))  # type: ignore[misc]
        await settle(lambda: _idle(runtime))
        (message,) = await runtime.store.list_messages(_query(task.id))
        waits.append(round(message.next_at - clock.now(), 3))
        clock.advance(delay)
        runtime.notifier.wake()
    assert waits == [5.0, 300.0, 1800.0]
    failed = await settle(lambda: _state(runtime, message.id, lambda m: m.state == "failed"))
    assert failed.attempts == 4 and failed.last_status == 500
    assert len(receiver.requests) == 4
    record = await runtime.store.get(task.id)
    assert record is not None and not record.notification_sent


def _query(task_id: str) -> Any:
    from errands.store.records import MessageQuery

    return MessageQuery(task_id=task_id)


async def _state(runtime: Runtime, message_id: str, ok: Callable[[Any], bool]) -> Any:
    message = await runtime.store.get_message(message_id)
    return message if message is not None and ok(message) else None


async def test_410_disables_the_endpoint_and_recover_sends_again(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    runtime = await start(runtime_factory)
    endpoint = await add_endpoint(runtime, receiver.url, events=["task.completed"])
    receiver.script = [(410, {})]
    first = await runtime.app.submit("echo", {"n": 1}, owner="alice")
    await settle(lambda: _disabled(runtime, endpoint["id"]))
    async with http(runtime) as client:
        seen = (await client.get(f"/v1/endpoints/{endpoint['id']}")).json()
        assert seen["enabled"] is False and "410" in seen["disabled_reason"]
        (message,) = await messages(runtime, task_id=first.id)
        assert message["state"] == "failed" and message["attempts"] == 1
        # While disabled, nothing new is queued for it, and recovering is refused.
        second = await runtime.app.submit("echo", {"n": 2}, owner="alice")
        done = await wait_task(runtime, second.id)
        notifier = runtime.notifier
        assert notifier is not None

        async def fanned_out_past_it() -> bool:
            # On PostgreSQL the log is readable a moment after the commit: wait until the
            # fan-out has passed the second task's end, so that it was judged while disabled.
            await notifier.fan_out()
            return await runtime.store.notify_cursor() >= done.seq

        await settle(fanned_out_past_it)
        assert await messages(runtime, task_id=second.id) == []
        since = datetime.fromtimestamp(time.time() - 60, tz=UTC).isoformat()
        r = await client.post(f"/v1/endpoints/{endpoint['id']}/recover", json={"since": since})
        assert r.status_code == 409
        r = await client.patch(f"/v1/endpoints/{endpoint['id']}", json={"enabled": True})
        assert r.status_code == 200 and r.json()["enabled"] is True and r.json()["disabled_reason"] is None
        r = await client.post(f"/v1/endpoints/{endpoint['id']}/recover", json={"since": since})
        assert r.json() == {"recovered": 1}
    await wait_task(runtime, first.id, lambda t: t.notification_sent)
    assert receiver.ids() == [message["id"], message["id"]]


async def _disabled(runtime: Runtime, endpoint_id: str) -> bool:
    endpoint = await runtime.store.get_endpoint(endpoint_id)
    return endpoint is not None and not endpoint.enabled


async def test_retry_after_is_honoured_and_slows_the_whole_endpoint(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    clock = ManualClock(time.time())
    runtime = await start(runtime_factory, clock=clock)
    endpoint = await add_endpoint(runtime, receiver.url, events=["task.completed"])
    receiver.script = [(429, {"Retry-After": "120"})]
    first = await runtime.app.submit("echo", {"n": 1}, owner="alice")
    await settle(lambda: _attempts(runtime, endpoint["id"], 1))
    (message,) = await runtime.store.list_messages(_query(first.id))
    message = await settle(lambda: _state(runtime, message.id, lambda m: m.lease_token is None))
    assert message.next_at - clock.now() == pytest.approx(120)  # not the schedule's 5 s
    throttled = await runtime.store.get_endpoint(endpoint["id"])
    assert throttled is not None and throttled.throttled_until == pytest.approx(clock.now() + 120)
    # Another task's message to the same endpoint waits too.
    second = await runtime.app.submit("echo", {"n": 2}, owner="alice")
    await wait_task(runtime, second.id)
    assert runtime.notifier is not None
    await runtime.notifier.fan_out()
    clock.advance(60)
    assert await runtime.notifier.deliver_due() == 0
    assert len(receiver.requests) == 1
    clock.advance(61)
    runtime.notifier.wake()
    await wait_task(runtime, first.id, lambda t: t.notification_sent)
    await wait_task(runtime, second.id, lambda t: t.notification_sent)
    assert len(receiver.requests) == 3


async def test_an_endpoint_failing_longer_than_the_limit_is_disabled(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    clock = ManualClock(time.time())
    runtime = await start(
        runtime_factory, clock=clock, notify_disable_after_s=3600, notify_schedule="0s,5s,2h"
    )
    endpoint = await add_endpoint(runtime, receiver.url, events=["task.completed"])
    receiver.script = [(500, {})] * 5
    await runtime.app.submit("echo", {}, owner="alice")
    await settle(lambda: _attempts(runtime, endpoint["id"], 1))
    failing = await runtime.store.get_endpoint(endpoint["id"])
    assert failing is not None and failing.enabled and failing.failing_since == pytest.approx(clock.now())
    clock.advance(5)
    assert runtime.notifier is not None
    runtime.notifier.wake()
    await settle(lambda: _attempts(runtime, endpoint["id"], 2))
    clock.advance(7200)
    runtime.notifier.wake()
    await settle(lambda: _disabled(runtime, endpoint["id"]))
    disabled = await runtime.store.get_endpoint(endpoint["id"])
    assert disabled is not None and "failed since" in (disabled.disabled_reason or "")


async def test_a_rotated_secret_signs_with_both_during_its_grace_period(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    clock = ManualClock(time.time())
    runtime = await start(runtime_factory, clock=clock, notify_secret_grace_s=120)
    endpoint = await add_endpoint(runtime, receiver.url, events=["task.completed"])
    async with http(runtime) as client:
        r = await client.patch(f"/v1/endpoints/{endpoint['id']}", json={"rotate_secret": True})
        assert r.status_code == 200
        new_secret = r.json()["secret"]
        assert new_secret != endpoint["secret"]
        secret = (await client.get(f"/v1/endpoints/{endpoint['id']}/secret")).json()
        assert secret["secret"] == new_secret and secret["previous_secret_valid_until"] is not None
    task = await runtime.app.submit("echo", {}, owner="alice")
    await wait_task(runtime, task.id, lambda t: t.notification_sent)
    headers = receiver.requests[0][1]
    assert len(headers["webhook-signature"].split(" ")) == 2
    verified(receiver, endpoint["secret"])  # receivers still on the old secret keep working
    verified(receiver, new_secret)
    clock.advance(121)  # past the grace period, within the receiver's 5-minute window
    receiver.requests.clear()
    later = await runtime.app.submit("echo", {}, owner="alice")
    await wait_task(runtime, later.id, lambda t: t.notification_sent)
    assert len(receiver.requests[0][1]["webhook-signature"].split(" ")) == 1
    verified(receiver, new_secret)
    with pytest.raises(WebhookVerificationError):
        verified(receiver, endpoint["secret"])


async def test_filters_by_type_and_owner_and_resend_uses_the_same_id(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    runtime = await start(runtime_factory)
    await add_endpoint(
        runtime, receiver.url + "/bob-failures", events=["task.failed"], types=["boom"], owners=["bob"]
    )
    ignored = [
        await runtime.app.submit("boom", {}, owner="alice"),
        await runtime.app.submit("echo", {}, owner="bob"),
    ]
    wanted = await runtime.app.submit("boom", {}, owner="bob")
    for task in [*ignored, wanted]:
        await wait_task(runtime, task.id)
    await wait_task(runtime, wanted.id, lambda t: t.notification_sent)
    assert runtime.notifier is not None
    await runtime.notifier.fan_out()
    assert [b["data"]["task"]["id"] for b in receiver.bodies()] == [wanted.id]
    (message,) = await messages(runtime, task_id=wanted.id)
    async with http(runtime) as client:
        r = await client.post(f"/v1/messages/{message['id']}/resend")
        assert r.status_code == 200 and r.json()["state"] == "pending"
        detail = await settle(lambda: _message_detail(client, message["id"], 2))
    assert receiver.ids() == [message["id"], message["id"]]
    assert detail["state"] == "delivered" and len(detail["attempt_log"]) == 2


async def _message_detail(client: Any, message_id: str, attempts: int) -> Any:
    detail = (await client.get(f"/v1/messages/{message_id}")).json()
    return detail if len(detail["attempt_log"]) >= attempts and detail["state"] == "delivered" else None


async def test_messages_of_one_task_arrive_in_order_even_when_one_is_retried(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    clock = ManualClock(time.time())
    runtime = await start(runtime_factory, clock=clock)
    await add_endpoint(runtime, receiver.url, events=["task.*"])
    receiver.script = [(500, {})]  # the first message (task.created) fails once
    task = await runtime.app.submit("echo", {}, owner="alice")
    await wait_task(runtime, task.id)
    await settle(lambda: _count(receiver, 1))
    assert runtime.notifier is not None
    assert await runtime.notifier.deliver_due() == 0  # the later ones wait for the first
    clock.advance(5)
    runtime.notifier.wake()
    await wait_task(runtime, task.id, lambda t: t.notification_sent)
    assert [b["type"] for b in receiver.bodies()] == [
        "task.created", "task.created", "task.processing", "task.completed",
    ]  # fmt: skip


async def _count(receiver: Receiver, n: int) -> bool:
    return len(receiver.requests) >= n


async def test_a_tasks_notify_url_hears_of_its_end_signed_with_the_default_secret(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    runtime = await start(runtime_factory)
    async with http(runtime) as client:
        r = await client.post(
            "/v1/tasks", json={"type": "echo", "input": {"k": 1}, "notify_url": receiver.url + "/cb"}
        )
        assert r.status_code == 202 and r.json()["notify_url"] == receiver.url + "/cb"
        task_id = r.json()["id"]
        secret = (await client.get("/v1/notify/secret")).json()["secret"]
    await wait_task(runtime, task_id, lambda t: t.notification_sent)
    (body,) = verified(receiver, secret)
    assert body["type"] == "task.completed" and body["data"]["task"]["id"] == task_id
    assert receiver.requests[0][0] == "/cb"


async def test_notify_url_is_for_admins_and_must_be_a_public_http_url(
    runtime_factory: RuntimeFactory,
) -> None:
    runtime = await runtime_factory(tasks_app(), notifier=True)  # loopback not allowed here
    token = owner_token(runtime, "alice")
    async with http(runtime, token) as client:
        r = await client.post("/v1/tasks", json={"type": "echo", "notify_url": "https://example.com/cb"})
        assert r.status_code == 403
    async with http(runtime) as client:
        for url in ["ftp://example.com/x", "http://127.0.0.1:9/x", "http://169.254.169.254/latest",
                    "http://[::1]/x", "http://10.0.0.8/x", "http://user:pw@example.com/"]:  # fmt: skip
            r = await client.post("/v1/tasks", json={"type": "echo", "notify_url": url})
            assert r.status_code == 422, url
            assert r.json()["error"]["message"].startswith("notify_url:")
        assert (await client.get("/v1/tasks")).json()["tasks"] == []


async def test_endpoints_to_inner_addresses_are_refused(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(tasks_app(), notifier=True)  # loopback not allowed here
    async with http(runtime) as client:
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",  # a name resolving to loopback
            "http://192.168.1.20/hook",
            "http://172.16.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://0.0.0.0/hook",
            "gopher://example.com/",
        ]:
            r = await client.post("/v1/endpoints", json={"url": url})
            assert r.status_code == 422, url
        assert (await client.get("/v1/endpoints")).json() == {"endpoints": []}


async def test_bad_endpoint_requests_get_a_clear_4xx_and_change_nothing(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    runtime = await start(runtime_factory)
    owner = owner_token(runtime, "alice")
    async with http(runtime, owner) as client:
        assert (await client.post("/v1/endpoints", json={"url": receiver.url})).status_code == 403
        assert (await client.get("/v1/messages")).status_code == 403
        assert (await client.get("/v1/notify/secret")).status_code == 403
    endpoint = await add_endpoint(runtime, receiver.url)
    path = f"/v1/endpoints/{endpoint['id']}"
    async with http(runtime) as client:
        for body in [
            {"url": receiver.url, "events": ["task.exploded"]},
            {"url": receiver.url, "secret": "not-a-secret"},
            {"url": receiver.url, "events": []},
            {"url": receiver.url, "colour": "red"},
            {"events": ["task.*"]},
        ]:
            r = await client.post("/v1/endpoints", json=body)
            assert r.status_code == 422, body
        for patch in [
            {"url": None},
            {"secret": "whsec_" + "A" * 32},
            {"events": ["nope"]},
            {"enabled": "yes"},
        ]:
            r = await client.patch(path, json=patch)
            assert r.status_code == 422, patch
        assert (await client.get("/v1/endpoints/ep_00000000000000000000000000")).status_code == 404
        assert (await client.get("/v1/endpoints/nonsense")).status_code == 422
        assert (await client.post("/v1/messages/msg_00000000000000000000000000/resend")).status_code == 404
        r = await client.post(f"{path}/recover", json={"since": "yesterday"})
        assert r.status_code == 422
        assert (await client.get(path)).json() == {k: v for k, v in endpoint.items() if k != "secret"}
        assert (await client.delete(path)).status_code == 204
        assert (await client.delete(path)).status_code == 404


# -- lifecycle hooks -------------------------------------------------------------------------------


async def test_a_lifecycle_hook_runs_once_per_event_outside_the_workers(
    runtime_factory: RuntimeFactory,
) -> None:
    app = tasks_app()
    calls: list[HookEvent] = []

    @app.on("task.failed")
    async def refund(event: HookEvent) -> None:
        calls.append(event)

    runtime = await start(runtime_factory, app)
    task = await app.submit("boom", {"cost": 3}, owner="alice")
    await wait_task(runtime, task.id)
    (message,) = await settle(lambda: _delivered(runtime, task.id))
    assert runtime.notifier is not None
    await runtime.notifier.fan_out()
    await runtime.notifier.deliver_due()
    await runtime.notifier.drain()
    (event,) = calls
    assert (event.type, event.task.id, event.task.status, event.task.input) == (
        "task.failed",
        task.id,
        Status.FAILED,
        {"cost": 3},
    )
    assert event.message_id == message.id and event.attempt == 1
    record = await runtime.store.get(task.id)
    assert record is not None and record.notification_sent is False  # hooks are not notifications


async def _delivered(runtime: Runtime, task_id: str) -> Any:
    found = await runtime.store.list_messages(_query(task_id))
    return found if found and all(m.state == "delivered" for m in found) else None


async def test_a_failing_hook_is_retried_on_the_schedule(runtime_factory: RuntimeFactory) -> None:
    app = tasks_app()
    calls: list[int] = []

    @app.on("task.completed", types=["echo"])
    def record(event: HookEvent) -> None:  # a sync hook runs in a thread
        calls.append(event.attempt)
        if event.attempt == 1:
            raise RuntimeError("the credits service is down")

    clock = ManualClock(time.time())
    runtime = await start(runtime_factory, app, clock=clock)
    task = await app.submit("echo", {}, owner="alice")
    await wait_task(runtime, task.id)
    await settle(
        lambda: _state_of_task(runtime, task.id, lambda m: m.attempts == 1 and m.lease_token is None)
    )
    (message,) = await runtime.store.list_messages(_query(task.id))
    assert message.state == "pending" and message.last_error == "RuntimeError: the credits service is down"
    clock.advance(5)
    assert runtime.notifier is not None
    runtime.notifier.wake()
    await settle(lambda: _delivered(runtime, task.id))
    assert calls == [1, 2]


async def _state_of_task(runtime: Runtime, task_id: str, ok: Callable[[Any], bool]) -> Any:
    found = await runtime.store.list_messages(_query(task_id))
    return found if found and all(ok(m) for m in found) else None


async def test_a_hook_interrupted_before_it_was_recorded_runs_again(
    runtime_factory: RuntimeFactory,
) -> None:
    started = asyncio.Event()
    calls: list[int] = []
    app = tasks_app()

    @app.on("task.completed")
    async def slow(event: HookEvent) -> None:
        calls.append(event.attempt)
        if event.attempt == 1:
            started.set()
            await asyncio.Event().wait()  # the process "dies" while this runs

    clock = ManualClock(time.time())
    first = await start(runtime_factory, app, clock=clock, notify_lease_s=30, shutdown_grace_s=0)
    task = await app.submit("echo", {}, owner="alice")
    await asyncio.wait_for(started.wait(), 10)
    await first.stop()  # cancels the hook: nothing recorded it as done
    clock.advance(31)  # the lease of the interrupted attempt runs out
    second = await start(runtime_factory, app, clock=clock)
    await settle(lambda: _delivered(second, task.id))
    assert calls == [1, 2]


# -- WeChat subscribe messages ---------------------------------------------------------------------


@pytest.fixture
async def wechat() -> AsyncIterator[FakeWeChat]:
    fake = FakeWeChat("wx-app", "wx-secret", {"TPL_DONE", "TPL_FAILED"})
    async for url in serve(fake.app):
        fake.url = url  # type: ignore[attr-defined]
        yield fake


def wechat_app(fake: FakeWeChat) -> Errands:
    app = tasks_app()
    app.wechat(
        [
            WeChatTemplate(
                "TPL_DONE",
                data={"thing1": "{result[title]}", "time2": "{finished_at}", "phrase3": "{outcome}"},
                events=["task.completed"],
            ),
            WeChatTemplate(
                "TPL_FAILED",
                data={"thing1": "{type}", "thing2": "{error}", "phrase3": "{outcome}"},
                events=["task.failed"],
            ),
        ],
        appid="wx-app",
        secret="wx-secret",
        base_url=fake.url,  # type: ignore[attr-defined]
    )

    @app.task("titled")
    async def titled(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
        return {"title": input["title"]}

    return app


async def test_wechat_messages_reach_the_owner_within_the_field_limits(
    runtime_factory: RuntimeFactory, wechat: FakeWeChat
) -> None:
    app = wechat_app(wechat)
    runtime = await start(runtime_factory, app)
    long_title = "视频文案提取一部很长很长的小说的人物识别结果已经出来了"  # 26 characters
    done = await app.submit("titled", {"title": long_title}, owner="oOPENID-1")
    failed = await app.submit("boom", {}, owner="oOPENID-1")
    await wait_task(runtime, done.id, lambda t: t.notification_sent)
    await wait_task(runtime, failed.id, lambda t: t.notification_sent)
    assert wechat.token_fetches == 1  # cached for the second message
    by_template = {m["template_id"]: m for m in wechat.delivered}
    ok = by_template["TPL_DONE"]
    assert ok["touser"] == "oOPENID-1" and ok["page"] == f"pages/index/index?taskId={done.id}"
    assert ok["data"]["thing1"]["value"] == long_title[:19] + "…"
    assert ok["data"]["phrase3"]["value"] == "已完成"
    assert by_template["TPL_FAILED"]["data"]["thing2"]["value"] == "It broke."
    assert by_template["TPL_FAILED"]["data"]["phrase3"]["value"] == "失败"


async def test_wechat_refreshes_an_invalid_token_and_retries_transient_errors(
    runtime_factory: RuntimeFactory, wechat: FakeWeChat
) -> None:
    clock = ManualClock(time.time())
    runtime = await start(runtime_factory, wechat_app(wechat), clock=clock)
    first = await runtime.app.submit("titled", {"title": "one"}, owner="oA")
    await wait_task(runtime, first.id, lambda t: t.notification_sent)
    wechat.expire_token()  # WeChat no longer accepts the cached token
    wechat.busy = 1  # and is busy once
    second = await runtime.app.submit("titled", {"title": "two"}, owner="oA")
    await settle(
        lambda: _state_of_task(runtime, second.id, lambda m: m.attempts == 1 and m.lease_token is None)
    )
    (message,) = await runtime.store.list_messages(_query(second.id))
    assert message.state == "pending" and "errcode -1" in (message.last_error or "")
    assert wechat.token_fetches == 2  # refreshed at once after 40001
    clock.advance(5)
    assert runtime.notifier is not None
    runtime.notifier.wake()
    await wait_task(runtime, second.id, lambda t: t.notification_sent)
    assert [m["data"]["thing1"]["value"] for m in wechat.delivered] == ["one", "two"]


async def test_wechat_43101_is_final_and_not_retried(
    runtime_factory: RuntimeFactory, wechat: FakeWeChat
) -> None:
    wechat.refused.add("oNOSUB")
    runtime = await start(runtime_factory, wechat_app(wechat))
    task = await runtime.app.submit("titled", {"title": "x"}, owner="oNOSUB")
    await wait_task(runtime, task.id)
    (message,) = await settle(lambda: _state_of_task(runtime, task.id, lambda m: m.state == "failed"))
    assert message.attempts == 1 and "43101" in (message.last_error or "")
    assert len(wechat.sends) == 1
    record = await runtime.store.get(task.id)
    assert record is not None and not record.notification_sent


async def test_the_fake_wechat_refuses_what_breaks_the_limits(wechat: FakeWeChat) -> None:
    """The limits test above means something only if the fake enforces them."""
    import httpx

    async with httpx.AsyncClient(base_url=wechat.url) as client:  # type: ignore[attr-defined]
        token = (
            await client.post("/cgi-bin/stable_token", json={"appid": "wx-app", "secret": "wx-secret"})
        ).json()
        body = {"touser": "o", "template_id": "TPL_DONE", "data": {"thing1": {"value": "x" * 21}}}
        r = await client.post("/cgi-bin/message/subscribe/send", params=token, content=orjson.dumps(body))
    assert r.json()["errcode"] == 47003


async def test_a_name_resolving_inside_is_refused_when_sending_too(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    """The check at sending time is what holds against a name that changes its answer: here a
    task whose URL was accepted when its name resolved outside (stored directly, as the submit
    check would now refuse it) and that resolves to loopback when the message is sent."""
    runtime = await runtime_factory(tasks_app(), notifier=True, notify_poll_s=0.05)  # loopback refused
    port = receiver.url.rsplit(":", 1)[1]
    url = f"http://localhost:{port}/cb"
    with pytest.raises(InvalidRequest, match="inside the network"):
        await runtime.app.submit("echo", {}, notify_url=url)
    task, _ = await runtime.store.create(
        NewTask(id="late-name", type="echo", owner="default", input={}, priority=0, max_attempts=1,
                timeout_s=60, expires_in_s=3600, fingerprint="fp", notify_url=url)
    )  # fmt: skip
    (message,) = await settle(lambda: _state_of_task(runtime, task.id, lambda m: m.state == "failed"))
    assert message.attempts == 1 and "inside the network" in (message.last_error or "")
    assert receiver.requests == []


async def test_two_processes_deliver_each_message_once(
    runtime_factory: RuntimeFactory, receiver: Receiver
) -> None:
    one = await start(runtime_factory)
    two = await start(runtime_factory, workers=False)
    await add_endpoint(one, receiver.url, events=["task.*"])
    tasks = [await one.app.submit("echo", {"i": i}, owner="alice") for i in range(20)]
    for task in tasks:
        await wait_task(one, task.id, lambda t: t.notification_sent)
    assert len(receiver.requests) == 60 and len(set(receiver.ids())) == 60
    for task in tasks:
        kinds = [b["type"] for b in receiver.bodies() if b["data"]["task"]["id"] == task.id]
        assert kinds == ["task.created", "task.processing", "task.completed"]
    del two
