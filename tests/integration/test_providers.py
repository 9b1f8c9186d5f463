"""External providers end to end, over real HTTP: the dev provider, Replicate's and Coze's fakes."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from errands import Errands, signing
from errands.auth import SYSTEM
from errands.clock import ManualClock
from errands.devprovider import DEV_SECRET, Chaos, DevProvider, dev_standard_provider
from errands.model import Status
from errands.providers.coze import CozeProvider
from errands.providers.replicate import ReplicateProvider
from errands.runtime import Runtime
from errands.server import bind, serve_asgi
from errands.waits import wait_set
from tests.conftest import ADMIN_KEY
from tests.integration.conftest import LiveFactory, wait_task
from tests.integration.fakes import FakeCoze, FakeReplicate

FAST = {"sweeper": True, "sweep_interval_s": 0.1, "retry_base_s": 0.02, "retry_cap_s": 0.1}


@pytest.fixture
async def dev() -> AsyncIterator[DevProvider]:
    provider = DevProvider(chaos=Chaos(delay_s=0.15, steps=2), seed=1)
    sock = bind("127.0.0.1", 0)
    provider.url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # type: ignore[attr-defined]
    async with serve_asgi(provider.app, sock):
        yield provider


def external_app(url: str, **options: Any) -> Errands:
    app = Errands()
    settings: dict[str, Any] = {"poll_after_s": 30, "poll_every_s": 0.1, "timeout_s": 60, "max_attempts": 2}
    settings.update(options)
    app.external("ext", provider=dev_standard_provider(url), **settings)
    return app


async def events_of(runtime: Runtime, task_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(e.to_json()) for e in await runtime.store.events(task_id)]


def signed(
    body: Any, *, at: float | None = None, message_id: str | None = None, secret: str = DEV_SECRET
) -> Any:
    raw = orjson.dumps(body)
    headers = signing.sign(
        [signing.secret_key(secret)], message_id or f"msg_{random.random()}", int(at or time.time()), raw
    )
    return raw, {**headers, "content-type": "application/json"}


async def test_an_external_task_completes_from_its_webhooks(live: LiveFactory, dev: DevProvider) -> None:
    runtime, url = await live(external_app(dev.url), **FAST)  # type: ignore[attr-defined]
    task = await runtime.app.submit("ext", {"prompt": "a cat"}, owner="alice")
    done = await wait_task(runtime, task.id)
    assert done.status is Status.COMPLETED
    assert done.result == {"echo": {"prompt": "a cat"}, "job": done.external_id}
    assert done.webhook_received is True
    kinds = [e["type"] for e in await events_of(runtime, task.id)]
    assert kinds[:3] == ["task.created", "task.processing", "task.progress"]  # the hand-off
    assert kinds.count("task.completed") == 1 and kinds[-1] == "task.completed"
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        deliveries = (await client.get("/v1/webhook-deliveries", params={"task_id": task.id})).json()[
            "deliveries"
        ]
    assert {d["outcome"] for d in deliveries} <= {"applied", "unchanged"}
    assert len(deliveries) >= 3  # two progress reports and the end
    # Times as everywhere in the API: RFC 3339, UTC, milliseconds; newest first.
    received = [d["received_at"] for d in deliveries]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r) for r in received), received
    assert received == sorted(received, reverse=True)


async def test_refused_webhooks_change_nothing(live: LiveFactory, dev: DevProvider) -> None:
    dev.chaos = Chaos(delay_s=3600, steps=1)  # the job never ends by itself
    runtime, url = await live(external_app(dev.url), **FAST)  # type: ignore[attr-defined]
    task = await runtime.app.submit("ext", {"x": 1})
    handed = await wait_task(runtime, task.id, until=lambda r: r.external_id is not None)
    job = handed.external_id
    before = await events_of(runtime, task.id)
    now = time.time()
    final = {"id": job, "status": "succeeded", "output": {"forged": True}}
    async with httpx.AsyncClient(base_url=url) as client:
        cases: list[tuple[str, bytes, dict[str, str], int]] = []
        # Far outside the 300 s window, so no machine is slow enough to bring them inside it.
        body, headers = signed(final, at=now - 3600)
        cases.append(("a replay outside the window", body, headers, 401))
        body, headers = signed(final, at=now + 3600)
        cases.append(("from the future", body, headers, 401))
        body, headers = signed(final, secret=signing.new_secret())
        cases.append(("signed with another secret", body, headers, 401))
        body, headers = signed(final)
        cases.append(
            ("no signature", body, {k: v for k, v in headers.items() if k != "webhook-signature"}, 401)
        )
        cases.append(("no id", body, {k: v for k, v in headers.items() if k != "webhook-id"}, 401))
        cases.append(("a body changed after signing", body.replace(b"succeeded", b"failed"), headers, 401))
        raw, headers = (
            b"not json",
            signing.sign([signing.secret_key(DEV_SECRET)], "m_bad", int(now), b"not json"),
        )
        cases.append(("malformed", raw, headers, 400))
        body, headers = signed({"status": "succeeded"})
        cases.append(("no job id", body, headers, 400))
        body, headers = signed({"id": "job_nobody", "status": "succeeded"})
        cases.append(("an unknown job", body, headers, 404))
        for what, body, headers, status in cases:
            r = await client.post("/v1/hooks/dev", content=body, headers=headers)
            assert r.status_code == status, (what, r.text)
            assert "error" in r.json()
        r = await client.post("/v1/hooks/nobody", content=b"{}")
        assert r.status_code == 404
        # The same delivery twice: applied once, then answered 2xx without effect.
        running_report = {"id": job, "status": "running", "progress": 60, "message": "sixty"}
        body, headers = signed(running_report, message_id="msg_once")
        assert (await client.post("/v1/hooks/dev", content=body, headers=headers)).json() == {
            "outcome": "applied"
        }
        body, headers = signed({**running_report, "progress": 70}, message_id="msg_once")
        r = await client.post("/v1/hooks/dev", content=body, headers=headers)
        assert (r.status_code, r.json()) == (200, {"outcome": "duplicate"})
    after = await events_of(runtime, task.id)
    assert len(after) == len(before) + 1  # only the one applied report
    assert after[-1]["task"]["progress"] == 60
    current = await runtime.store.get(task.id)
    assert current.status is Status.PROCESSING and current.result is None


async def test_every_refused_delivery_is_recorded_but_one_over_the_size_limit(
    live: LiveFactory, dev: DevProvider
) -> None:
    """What an operator reads in ``GET /v1/webhook-deliveries`` when a provider is set up wrong:
    a provider name errands does not know, an unsigned body, an unreadable one, an unknown job.
    A body over ``ERRANDS_MAX_BODY_BYTES`` is refused before it is read, and not recorded."""
    _, url = await live(external_app(dev.url), max_body_bytes=1024, **FAST)  # type: ignore[attr-defined]
    garbage, garbage_headers = (
        b"not json",
        signing.sign([signing.secret_key(DEV_SECRET)], "msg_garbage", int(time.time()), b"not json"),
    )
    unknown_job, unknown_job_headers = signed({"id": "job_nobody", "status": "running"})
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        sent = [
            await client.post("/v1/hooks/replicate", content=b"{}"),  # a provider this app lacks
            await client.post("/v1/hooks/dev", content=b"{}"),  # unsigned
            await client.post("/v1/hooks/dev", content=garbage, headers=garbage_headers),
            await client.post("/v1/hooks/dev", content=unknown_job, headers=unknown_job_headers),
            await client.post("/v1/hooks/dev", content=b"{" + b" " * 2048 + b"}"),
        ]
        assert [r.status_code for r in sent] == [404, 401, 400, 404, 413]
        recorded = (await client.get("/v1/webhook-deliveries")).json()["deliveries"]
    assert [(d["provider"], d["outcome"], d["status_code"]) for d in reversed(recorded)] == [
        ("replicate", "unknown_task", 404),
        ("dev", "unauthorized", 401),
        ("dev", "malformed", 400),
        ("dev", "unknown_task", 404),
    ]
    assert recorded[-1]["detail"] == "No such provider."


async def test_webhooks_signed_by_the_standardwebhooks_package_are_accepted(
    live: LiveFactory, dev: DevProvider
) -> None:
    dev.chaos = Chaos(delay_s=3600, steps=1)
    runtime, url = await live(external_app(dev.url), **FAST)  # type: ignore[attr-defined]
    task = await runtime.app.submit("ext", {})
    job = (await wait_task(runtime, task.id, until=lambda r: r.external_id is not None)).external_id
    payload = orjson.dumps({"id": job, "status": "succeeded", "output": "from the package"}).decode()
    stamp = datetime.now(tz=UTC)
    headers = {
        "webhook-id": "msg_pkg",
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": Webhook(DEV_SECRET).sign("msg_pkg", stamp, payload),
        "content-type": "application/json",
    }
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/hooks/dev", content=payload, headers=headers)
    assert r.json() == {"outcome": "applied"}
    assert (await wait_task(runtime, task.id)).result == "from the package"


async def test_the_capability_url_works_for_its_task_and_attempt_only(
    live: LiveFactory, dev: DevProvider
) -> None:
    dev.chaos = Chaos(delay_s=3600, steps=1)
    runtime, url = await live(external_app(dev.url, max_attempts=3), **FAST)  # type: ignore[attr-defined]
    one = await runtime.app.submit("ext", {"n": 1})
    two = await runtime.app.submit("ext", {"n": 2})
    first = await wait_task(runtime, one.id, until=lambda r: r.external_id is not None)
    await wait_task(runtime, two.id, until=lambda r: r.external_id is not None)
    assert next(iter(dev.jobs.values())).callback_url.endswith("/v1/hooks/dev")  # the signed endpoint
    token_one = runtime.callbacks.capability(one.id, first.attempt, first.callback_nonce).rsplit("/", 1)[1]
    async with httpx.AsyncClient(base_url=url) as client:

        async def report(token: str, body: Any) -> httpx.Response:
            return await client.post(f"/v1/hooks/callback/{token}", json=body)

        task_id, attempt, mac = token_one.split(".")
        assert (await report(f"{two.id}.{attempt}.{mac}", {"status": "succeeded"})).status_code == 401
        assert (await report("garbage", {"status": "succeeded"})).status_code == 401
        assert (await report(f"{task_id}.{attempt}.AAAA", {"status": "succeeded"})).status_code == 401
        assert (await report(token_one, {"status": "pondering"})).status_code == 400
        assert (await runtime.store.get(one.id)).status is Status.PROCESSING
        # A new attempt (the provider timed out, say) makes the old URL useless.
        from errands import model

        await runtime.store.apply(
            one.id,
            lambda r: model.fail_attempt(
                r,
                now=time.time(),
                lease_token=None,
                error=model.TaskError("timeout", "t"),
                retry=True,
                retry_delay_s=0,
            ),
        )
        second = await wait_task(
            runtime, one.id, until=lambda r: r.attempt == 2 and r.external_id is not None
        )
        assert (await report(token_one, {"status": "succeeded"})).status_code == 401
        token_now = runtime.callbacks.capability(one.id, second.attempt, second.callback_nonce).rsplit(
            "/", 1
        )[1]
        r = await report(token_now, {"status": "succeeded", "output": {"via": "capability"}})
        assert r.json() == {"outcome": "applied"}
    done = await wait_task(runtime, one.id)
    assert (done.status, done.result, done.attempt) == (Status.COMPLETED, {"via": "capability"}, 2)
    assert (await runtime.store.get(two.id)).status is Status.PROCESSING


async def test_dropped_webhooks_are_rescued_by_polling(live: LiveFactory, dev: DevProvider) -> None:
    dev.chaos = Chaos(delay_s=0.2, steps=2, drop=1.0)
    runtime, _ = await live(external_app(dev.url, poll_after_s=0.1, poll_every_s=0.1), **FAST)  # type: ignore[attr-defined]
    tasks = [await runtime.app.submit("ext", {"i": i}) for i in range(3)]
    for task in tasks:
        done = await wait_task(runtime, task.id)
        assert (done.status, done.webhook_received) == (Status.COMPLETED, False)
        assert done.result["echo"] == {"i": done.input["i"]}


async def test_a_provider_that_is_down_fails_the_task_after_its_attempts(live: LiveFactory) -> None:
    closed = bind("127.0.0.1", 0)
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    runtime, _ = await live(external_app(f"http://127.0.0.1:{port}", max_attempts=3), **FAST)
    task = await runtime.app.submit("ext", {})
    done = await wait_task(runtime, task.id)
    assert (done.status, done.attempt, done.error.code) == (Status.FAILED, 3, "provider_unavailable")
    assert "could not" in done.error.message or "did not take" in done.error.message
    kinds = [e["type"] for e in await events_of(runtime, task.id)]
    assert kinds.count("task.retrying") == 2


async def test_cancel_reaches_the_provider_and_a_late_webhook_changes_nothing(
    live: LiveFactory, dev: DevProvider
) -> None:
    dev.chaos = Chaos(delay_s=3600, steps=1)
    runtime, url = await live(external_app(dev.url), **FAST)  # type: ignore[attr-defined]
    task = await runtime.app.submit("ext", {})
    job = (await wait_task(runtime, task.id, until=lambda r: r.external_id is not None)).external_id
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        assert (await client.post(f"/v1/tasks/{task.id}/cancel")).json()["status"] == "cancelled"
        for _ in range(200):
            if dev.jobs[job].status == "canceled":
                break
            await asyncio.sleep(0.01)
        assert dev.jobs[job].status == "canceled"
        before = await events_of(runtime, task.id)
        body, headers = signed({"id": job, "status": "succeeded", "output": "too late"})
        r = await client.post("/v1/hooks/dev", content=body, headers=headers)
        assert (r.status_code, r.json()) == (200, {"outcome": "late"})
    assert await events_of(runtime, task.id) == before
    assert (await runtime.store.get(task.id)).status is Status.CANCELLED


async def test_an_external_task_past_its_deadline_times_out_and_is_cancelled_there(
    live: LiveFactory, dev: DevProvider
) -> None:
    dev.chaos = Chaos(delay_s=3600, steps=1)
    app = external_app(dev.url, timeout_s=0.3, max_attempts=1, poll_after_s=0.05, poll_every_s=0.05)  # type: ignore[attr-defined]
    runtime, _ = await live(app, **FAST)
    task = await runtime.app.submit("ext", {})
    done = await wait_task(runtime, task.id)
    assert (done.status, done.error.code) == (Status.TIMEOUT, "timeout")
    for _ in range(200):
        if dev.jobs[done.external_id].status == "canceled":
            break
        await asyncio.sleep(0.01)
    assert dev.jobs[done.external_id].status == "canceled"


async def test_chaos_every_task_ends_right_exactly_once(live: LiveFactory, dev: DevProvider) -> None:
    dev.chaos = Chaos(
        delay_s=0.2,
        steps=3,
        jitter_s=0.05,
        drop=0.3,
        duplicate=0.3,
        bad_signature=0.2,
        reorder=0.5,
        fail=0.25,
    )
    app = external_app(dev.url, poll_after_s=0.5, poll_every_s=0.2)  # type: ignore[attr-defined]
    runtime, _ = await live(app, **FAST)
    ids = [(await runtime.app.submit("ext", {"i": i})).id for i in range(40)]
    finals = [await wait_task(runtime, task_id, timeout_s=30) for task_id in ids]
    await asyncio.sleep(0.5)  # let stale, duplicated and reordered webhooks arrive: they must change nothing
    for final in finals:
        job = dev.jobs[final.external_id]
        expected = Status.COMPLETED if job.status == "succeeded" else Status.FAILED
        assert final.status is expected, (final.id, job.status)
        events = await events_of(runtime, final.id)
        assert sum(e["task"]["status"] in ("completed", "failed") for e in events) == 1, events
        assert events[-1]["task"]["status"] == expected.value  # nothing after the end
        progress = [e["task"]["progress"] for e in events if e["task"]["status"] == "processing"]
        assert progress == sorted(progress)  # never backwards


async def test_replicate_against_its_fake(live: LiveFactory) -> None:
    secret = signing.new_secret()
    fake = FakeReplicate("r8_token", secret)
    sock = bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with serve_asgi(fake.app, sock):
        provider = ReplicateProvider(
            api_token="r8_token", webhook_secret=secret, version="v123", base_url=base
        )
        app = Errands()
        app.external("paint", provider=provider, poll_after_s=30, poll_every_s=0.1, max_attempts=1)
        runtime, _ = await live(app, **FAST)
        ok = await runtime.app.submit("paint", {"prompt": "a cat"})
        bad = await runtime.app.submit("paint", {"prompt": "x", "fail": True})
        done, failed = await wait_task(runtime, ok.id), await wait_task(runtime, bad.id)
        assert (done.status, done.webhook_received) == (Status.COMPLETED, True)
        assert done.result == [f"https://replicate.delivery/{done.external_id}.png"]
        assert (failed.status, failed.error.code, failed.error.message) == (
            Status.FAILED, "provider_failed", "the model failed"
        )  # fmt: skip
        assert fake.requests[0]["version"] == "v123"
        assert fake.requests[0]["webhook"].endswith("/v1/hooks/replicate")
        assert set(fake.requests[0]["webhook_events_filter"]) >= {"start", "completed"}
        progress = [
            e["task"]["progress"] for e in await events_of(runtime, ok.id) if e["type"] == "task.progress"
        ]
        assert 66 in progress  # read from the logs' progress bar
        # A language model: its output (the tokens so far, with every "output" webhook) is the
        # task's stream "output", each token once and in order.
        tokens = [f"tok{i} " for i in range(12)]
        chat = await runtime.app.submit("paint", {"prompt": "hi", "tokens": tokens})
        said = await wait_task(runtime, chat.id)
        assert said.status is Status.COMPLETED and said.result == tokens
        streamed = [e for e in await events_of(runtime, chat.id) if e["type"] == "task.stream"]
        assert [c for e in streamed for c in e["stream"]["chunks"]] == tokens
        assert len(streamed) >= 2, "the tokens arrived while the prediction ran"
        read = await runtime.service.stream(chat.id, SYSTEM, "output", attempt=None, offset=0)
        assert read.chunks == tokens
        # Without webhooks, polling finds the end; cancel reaches the prediction.
        fake.send_webhooks = False
        polled = await runtime.app.submit("paint", {"prompt": "quiet"})
        handed = await wait_task(runtime, polled.id, until=lambda r: r.external_id is not None)
        await runtime.store.set_poll_at(polled.id, 0)
        done = await wait_task(runtime, polled.id)
        assert (done.status, done.webhook_received) == (Status.COMPLETED, False)
        fake.steps = 50
        slow = await runtime.app.submit("paint", {"prompt": "slow"})
        handed = await wait_task(runtime, slow.id, until=lambda r: r.external_id is not None)
        await runtime.service.cancel(slow.id, SYSTEM)
        for _ in range(200):
            if fake.predictions[handed.external_id]["status"] == "canceled":
                break
            await asyncio.sleep(0.01)
        assert fake.predictions[handed.external_id]["status"] == "canceled"


async def test_coze_against_its_fake(live: LiveFactory) -> None:
    fake = FakeCoze("pat_token", "7400", run_s=0.1)
    sock = bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with serve_asgi(fake.app, sock):
        provider = CozeProvider(api_token="pat_token", workflow_id="7400", base_url=base, rate_per_s=20)
        app = Errands()
        app.external("recognise", provider=provider, poll_after_s=0.05, poll_every_s=0.05, max_attempts=1)
        runtime, _ = await live(app, **FAST)
        ok = await runtime.app.submit("recognise", {"text": "chapter one"})
        bad = await runtime.app.submit("recognise", {"text": "x", "fail": True})
        done, failed = await wait_task(runtime, ok.id), await wait_task(runtime, bad.id)
        assert (done.status, done.result, done.webhook_received) == (
            Status.COMPLETED,
            {"Output": "chapter one"},
            False,
        )
        assert (failed.status, failed.error.message) == (Status.FAILED, "plugin timed out")
        parameters = fake.requests[0]["parameters"]
        assert parameters["text"] == "chapter one" and "/v1/hooks/callback/" in parameters["callback_url"]
        # A workflow ending in an HTTP node reports at once through the task's callback URL.
        fake.call_back, fake.run_s = True, 0.05
        quick = await runtime.app.submit("recognise", {"text": "chapter two"})
        done = await wait_task(runtime, quick.id)
        assert done.status is Status.COMPLETED
        assert done.result in ({"from": "http node"}, {"Output": "chapter two"})
        # The rate limit holds for every call to Coze: never more than 20 in any second.
        times = fake.request_times
        assert max(sum(1 for t in times if start <= t < start + 1) for start in times) <= 20


async def test_a_provider_streams_and_each_chunk_lands_once_in_order_whatever_its_webhooks_do(
    live: LiveFactory, dev: DevProvider
) -> None:
    """The dev provider streams text with its progress webhooks, losing, repeating and delaying
    some of them; the final report carries the whole stream. What errands keeps, and what a
    watcher receives, is the provider's stream exactly."""
    dev.chaos = Chaos(delay_s=0.6, steps=6, stream=5, drop=0.3, duplicate=0.3, jitter_s=0.05)
    runtime, url = await live(external_app(dev.url), **FAST)  # type: ignore[attr-defined]
    for n in range(4):
        task = await runtime.app.submit("ext", {"n": n})
        received: list[Any] = []
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as client:
            watch = {"after": 0, "streams": "include"}
            async with client.stream("GET", f"/v1/tasks/{task.id}/watch", params=watch) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = orjson.loads(line[6:])
                    if data["type"] == "task.stream":
                        assert data["stream"]["index"] == len(received)
                        received.extend(data["stream"]["chunks"])
                    elif data["type"] == "task.completed":
                        break
            stored = (await client.get(f"/v1/tasks/{task.id}/streams/text", params={"format": "json"})).json()
        done = await wait_task(runtime, task.id)
        job = dev.jobs[done.external_id]
        assert job.streamed == [f"chunk {i} " for i in range(30)]
        assert stored["chunks"] == job.streamed == received, n


async def test_a_report_whose_chunks_pass_the_limit_still_ends_its_task(
    live: LiveFactory, dev: DevProvider
) -> None:
    dev.chaos = Chaos(delay_s=0.3, steps=3, stream=5)
    runtime, _ = await live(external_app(dev.url), stream_max_bytes=60, **FAST)  # type: ignore[attr-defined]
    task = await runtime.app.submit("ext", {"n": 1})
    done = await wait_task(runtime, task.id)
    assert done.status is Status.COMPLETED
    read = await runtime.service.stream(task.id, SYSTEM, "text", attempt=None, offset=0)
    assert read.chunks == [f"chunk {i} " for i in range(len(read.chunks))]
    assert 0 < sum(len(orjson.dumps(c)) for c in read.chunks) <= 60


async def test_a_provider_answering_429_holds_all_its_tasks_and_fails_none(
    live: LiveFactory, dev: DevProvider
) -> None:
    clock = ManualClock(time.time())  # webhooks are signed with the real time: start from it
    dev.busy, dev.busy_retry_after_s = 1, 2
    app = external_app(dev.url, max_attempts=1)  # type: ignore[attr-defined]
    runtime, url = await live(app, clock=clock, **FAST)
    first = await runtime.app.submit("ext", {"n": 0})

    def given_back(r: Any) -> bool:
        return bool(r.status is Status.PENDING and r.seq > first.seq)

    held = await wait_task(runtime, first.id, until=given_back)
    assert held.attempt == 0 and held.message is not None and "429" in held.message
    assert held.scheduled_for == pytest.approx(clock.now() + 2)
    assert (await runtime.store.holds())["dev"] == pytest.approx(clock.now() + 2)
    others = [await runtime.app.submit("ext", {"n": i}) for i in range(1, 4)]
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        stats = (await client.get("/v1/stats")).json()
    assert list(stats["providers_held"]) == ["dev"]
    clock.advance(1.9)
    await runtime.sweeper.sweep()  # type: ignore[union-attr]
    # Nothing of the provider starts while it is held: no claim, no submission, no attempt spent.
    for task in [first, *others]:
        record = await runtime.store.get(task.id)
        assert record.status is Status.PENDING and record.attempt == 0  # type: ignore[union-attr]
    assert dev.refused == 1 and not dev.jobs
    clock.advance(0.1)
    for task in [first, *others]:
        done = await wait_task(runtime, task.id)
        assert (done.status, done.attempt) == (Status.COMPLETED, 1)  # max_attempts=1, none spent
    assert len(dev.jobs) == 4 and dev.refused == 1


async def test_retry_after_0_holds_the_provider_a_second_not_a_loop(
    live: LiveFactory, dev: DevProvider
) -> None:
    clock = ManualClock(time.time())
    dev.busy, dev.busy_retry_after_s = 1, 0
    app = external_app(dev.url, max_attempts=1)  # type: ignore[attr-defined]
    runtime, _ = await live(app, clock=clock, **FAST)
    task = await runtime.app.submit("ext", {"n": 0})

    def given_back(r: Any) -> bool:
        return bool(r.status is Status.PENDING and r.seq > task.seq)

    held = await wait_task(runtime, task.id, until=given_back)
    assert held.scheduled_for == pytest.approx(clock.now() + 1)
    clock.advance(0.9)
    await runtime.sweeper.sweep()  # type: ignore[union-attr]
    assert (await runtime.store.get(task.id)).status is Status.PENDING  # type: ignore[union-attr]
    assert dev.refused == 1 and not dev.jobs
    clock.advance(0.1)
    done = await wait_task(runtime, task.id)
    assert (done.status, done.attempt, dev.refused) == (Status.COMPLETED, 1, 1)


async def test_polls_follow_poll_every_s_not_the_sweep_interval(live: LiveFactory, dev: DevProvider) -> None:
    """Every webhook is lost and the sweeper sweeps once an hour: the polls, on a timer of their
    own, still come every poll_every_s (a second at the least) and finish the task."""
    dev.chaos = Chaos(delay_s=0.5, steps=4, drop=1.0)  # the job runs about two seconds
    settings = {**FAST, "sweep_interval_s": 3600.0}
    runtime, _ = await live(external_app(dev.url, poll_after_s=0.1, poll_every_s=1.0), **settings)  # type: ignore[attr-defined]
    task = await runtime.app.submit("ext", {"i": 1})
    done = await wait_task(runtime, task.id, timeout_s=60)
    assert (done.status, done.webhook_received) == (Status.COMPLETED, False)
    progress = [e for e in await events_of(runtime, task.id) if e["type"] == "task.progress"]
    assert progress  # a poll saw the job running, and a later one saw it done


async def test_a_provider_that_never_answers_a_poll_holds_up_no_sweep(
    live: LiveFactory, dev: DevProvider
) -> None:
    """Every webhook is lost and the provider never answers a poll (each may wait an hour): the
    round of polls stays stuck, but the sweeps go on beside it, and a task that expires meanwhile
    ends on time (before, the sweep waited for its polls)."""
    dev.chaos = Chaos(drop=1.0)
    provider = dev_standard_provider(dev.url)
    asked, never = asyncio.Event(), asyncio.Event()

    async def poll_never_answered(external_id: str) -> Any:
        asked.set()
        await never.wait()

    provider.poll = poll_never_answered  # type: ignore[method-assign]
    app = Errands()
    app.external("ext", provider=provider, poll_after_s=0.1, poll_every_s=0.1, timeout_s=600)
    runtime, _ = await live(app, **FAST, provider_timeout_s=3600.0)
    await runtime.app.submit("ext", {"i": 1})
    assert await wait_set(asked, 30)  # a round of polls is stuck on it now
    doomed = await runtime.app.submit("ext", {"i": 2}, expires_in_s=1.0)
    ended = await wait_task(runtime, doomed.id, timeout_s=30)
    assert (ended.status, ended.error.code) == (Status.TIMEOUT, "expired")
