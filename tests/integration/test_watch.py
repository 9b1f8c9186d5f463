"""Live watches over real HTTP (SSE and WebSocket): order, resume, isolation, limits, slow consumers."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from typing import Any

import httpx
import orjson
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errands import Errands, TaskContext, model
from errands.auth import SYSTEM
from errands.client import parse_sse
from errands.errors import StoreError
from errands.model import EventType, Status
from errands.runtime import Runtime
from errands.service import SubmitRequest
from tests.conftest import ADMIN_KEY
from tests.integration.conftest import LiveFactory, sse

app = Errands()


@app.task("work")
async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


_ids = itertools.count()


class Driver:
    """Moves tasks through their states directly through the store, as a worker would."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.store

    async def create(self, owner: str = "alice", task_type: str = "work") -> str:
        task_id = f"t{next(_ids)}"
        await self.runtime.service.submit(SubmitRequest(type=task_type, id=task_id, owner=owner), SYSTEM)
        return task_id

    async def start(self, task_id: str) -> str:
        token = f"lease-{task_id}"
        now = self.runtime.clock.now()
        await self.store.apply(
            task_id, lambda r: model.start_attempt(r, now=now, worker_id="w", lease_token=token, lease_s=600)
        )
        return token

    async def progress(self, task_id: str, token: str, step: int) -> None:
        now = self.runtime.clock.now()
        await self.store.apply(
            task_id,
            lambda r: model.report_progress(
                r, now=now, lease_token=token, progress=min(99, step), message=f"step {step}"
            ),
        )

    async def complete(self, task_id: str, token: str) -> None:
        now = self.runtime.clock.now()
        await self.store.apply(
            task_id, lambda r: model.complete(r, now=now, lease_token=token, result={"ok": 1})
        )

    async def log(self, task_id: str) -> list[dict[str, Any]]:
        return [orjson.loads(e.to_json()) for e in await self.store.events(task_id)]


def auth(token: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def served(live: LiveFactory) -> tuple[Runtime, str, Driver]:
    runtime, url = await live(app, workers=False, watch_keepalive_s=0.2)
    return runtime, url, Driver(runtime)


async def test_one_task_streams_snapshot_then_every_change_then_ends(
    served: tuple[Runtime, str, Driver],
) -> None:
    runtime, url, d = served
    task_id = await d.create()
    async with (
        httpx.AsyncClient(base_url=url, headers=auth()) as client,
        client.stream("GET", f"/v1/tasks/{task_id}/watch") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        messages = parse_sse(response.aiter_lines())
        snapshot = await anext(messages)
        assert snapshot.event == "task.snapshot"
        assert int(snapshot.id or 0) == (await runtime.store.events(task_id))[0].seq
        assert orjson.loads(snapshot.data or "")["task"]["status"] == "pending"
        token = await d.start(task_id)
        await d.progress(task_id, token, 50)
        await d.complete(task_id, token)
        rest = [m async for m in messages]
    log = await d.log(task_id)
    assert [(m.event, int(m.id or 0)) for m in rest] == [(e["type"], e["seq"]) for e in log[1:]]
    assert [orjson.loads(m.data or "") for m in rest] == log[1:]
    assert rest[-1].event == "task.completed"


async def test_resume_with_last_event_id_or_after(served: tuple[Runtime, str, Driver]) -> None:
    _runtime, url, d = served
    task_id = await d.create()
    token = await d.start(task_id)
    for step in range(3):
        await d.progress(task_id, token, step + 1)
    log = await d.log(task_id)
    async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
        for kwargs in (
            {"headers": {"Last-Event-ID": str(log[1]["seq"])}},
            {"params": {"after": log[1]["seq"]}},
        ):
            messages = sse(client, f"/v1/tasks/{task_id}/watch", **kwargs)
            replayed = [await anext(messages) for _ in range(3)]
            assert [int(m.id or 0) for m in replayed] == [e["seq"] for e in log[2:]]
            await messages.aclose()
        # Resuming after the end of an ended task returns at once with nothing.
        await d.complete(task_id, token)
        final = (await d.log(task_id))[-1]["seq"]
        done = [m async for m in sse(client, f"/v1/tasks/{task_id}/watch", params={"after": final})]
        assert done == []


async def test_keep_alive_comments(served: tuple[Runtime, str, Driver]) -> None:
    _runtime, url, d = served
    task_id = await d.create()
    async with (
        httpx.AsyncClient(base_url=url, headers=auth()) as client,
        client.stream("GET", f"/v1/tasks/{task_id}/watch") as response,
    ):
        lines = response.aiter_lines()
        seen = []
        async for line in lines:
            seen.append(line)
            if seen.count(": keep-alive") >= 2:
                break
    assert seen[0] == "retry: 2000"


async def _watch_with_cuts(url: str, task_id: str, cuts: list[int]) -> list[Any]:
    """Watch over SSE, dropping the connection after each cut and resuming with Last-Event-ID."""
    received: list[Any] = []
    last: str | None = None
    cut_iter = iter(cuts)
    async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
        while True:
            budget = next(cut_iter, None)
            headers = {"Last-Event-ID": last} if last else {}
            count, ended = 0, True
            async for message in sse(client, f"/v1/tasks/{task_id}/watch", headers=headers):
                received.append(message)
                last = message.id
                count += 1
                if budget is not None and count >= budget:
                    ended = False
                    break
            if ended:
                return received


async def _produce(d: Driver, task_id: str, n: int, rng: random.Random) -> None:
    token = await d.start(task_id)
    for step in range(n):
        await d.progress(task_id, token, step + 1)
        if rng.random() < 0.5:
            await asyncio.sleep(rng.random() * 0.003)
    await d.complete(task_id, token)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 40), cuts=st.lists(st.integers(1, 6), max_size=8), seed=st.integers(0, 2**16))
async def test_resume_over_sse_is_exact(
    served: tuple[Runtime, str, Driver], n: int, cuts: list[int], seed: int
) -> None:
    _runtime, url, d = served
    task_id = await d.create()
    producer = asyncio.create_task(_produce(d, task_id, n, random.Random(seed)))
    received = await _watch_with_cuts(url, task_id, cuts)
    await producer
    log = await d.log(task_id)
    assert received[0].event == "task.snapshot"
    start = int(received[0].id)
    events = [orjson.loads(m.data) for m in received[1:]]
    assert events == [e for e in log if e["seq"] > start]  # no gap, no duplicate, same bodies


async def _ws_with_cuts(url: str, task_id: str, cuts: list[int]) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    last: int | None = None
    cut_iter = iter(cuts)
    ws_url = url.replace("http://", "ws://") + f"/v1/ws?access_token={ADMIN_KEY}"
    while True:
        budget = next(cut_iter, None)
        async with websockets.connect(ws_url, max_queue=None) as ws:  # unread messages must not block close
            request: dict[str, Any] = {"op": "subscribe", "task_id": task_id, "sub": "a"}
            if last is not None:
                request["after"] = last
            await ws.send(orjson.dumps(request).decode())
            assert orjson.loads(await ws.recv()) == {"op": "subscribed", "sub": "a"}
            count = 0
            while True:
                message = orjson.loads(await ws.recv())
                if message.get("op") == "end":
                    return received
                assert message["sub"] == "a"
                received.append(message)
                last = message["id"]
                count += 1
                if budget is not None and count >= budget:
                    break


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 40), cuts=st.lists(st.integers(1, 6), max_size=8), seed=st.integers(0, 2**16))
async def test_resume_over_websocket_is_exact(
    served: tuple[Runtime, str, Driver], n: int, cuts: list[int], seed: int
) -> None:
    _runtime, url, d = served
    task_id = await d.create()
    producer = asyncio.create_task(_produce(d, task_id, n, random.Random(seed)))
    received = await _ws_with_cuts(url, task_id, cuts)
    await producer
    log = await d.log(task_id)
    assert received[0]["event"] == "task.snapshot"
    start = received[0]["id"]
    assert [m["data"] for m in received[1:]] == [e for e in log if e["seq"] > start]
    assert [m["event"] for m in received[1:]] == [e["type"] for e in log if e["seq"] > start]


async def test_a_rolled_back_change_is_never_seen(served: tuple[Runtime, str, Driver]) -> None:
    runtime, url, d = served
    task_id = await d.create()
    token = await d.start(task_id)
    store: Any = runtime.store
    now = runtime.clock.now()

    def decide(r: Any) -> Any:
        return model.report_progress(r, now=now, lease_token=token, progress=70, message="x")

    # The same mishap in each store's write path: a change is written, then its operation fails
    # (the savepoint, or the transaction, rolls the change back).
    async def write_then_fail(tx: Any) -> None:
        await tx.apply(task_id, decide)
        raise RuntimeError("fails after writing")

    async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
        messages = sse(client, f"/v1/tasks/{task_id}/watch")
        assert (await anext(messages)).event == "task.snapshot"
        with pytest.raises((RuntimeError, StoreError)):
            await store._write(write_then_fail)
        await d.complete(task_id, token)
        rest = [m async for m in messages]
    assert [m.event for m in rest] == ["task.completed"]
    assert "task.progress" not in [e["type"] for e in await d.log(task_id)]


async def test_a_failed_commit_publishes_nothing(served: tuple[Runtime, str, Driver]) -> None:
    runtime, _url, d = served
    task_id = await d.create()
    seen: list[EventType] = []
    runtime.hub.add_listener(lambda e: seen.append(e.type))
    store: Any = runtime.store

    async def write_then_break_the_batch(tx: Any) -> None:
        await tx.apply(task_id, lambda r: model.cancel(r, now=0))
        await tx.execute("SELECT * FROM no_such_table")  # a database error: the batch rolls back

    with pytest.raises(StoreError):
        await store._write(write_then_break_the_batch)
    await runtime.hub.catch_up()
    assert EventType.CANCELLED not in seen
    assert (await runtime.store.get(task_id)).status is Status.PENDING


async def test_snapshot_then_events_never_double_count_concurrent_commits(
    served: tuple[Runtime, str, Driver],
) -> None:
    _runtime, url, d = served
    ids = [await d.create() for _ in range(3)]
    tokens = {task_id: await d.start(task_id) for task_id in ids}

    async def churn() -> None:
        for step in range(60):
            for task_id in ids:
                await d.progress(task_id, tokens[task_id], step + 1)
            await asyncio.sleep(0)

    async def one_watch(task_id: str) -> tuple[int, list[int]]:
        async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
            messages = sse(client, f"/v1/tasks/{task_id}/watch")
            snapshot = await anext(messages)
            seqs: list[int] = []
            async for message in messages:
                seqs.append(int(message.id or 0))
                if message.event == "task.completed":
                    break
            await messages.aclose()
            return int(snapshot.id or 0), seqs

    async def set_watch() -> tuple[dict[str, int], list[tuple[str, int]]]:
        async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
            messages = sse(client, "/v1/watch", params={"owner": "alice"})
            snapshot = orjson.loads((await anext(messages)).data or "")
            covered = {t["id"]: t["seq"] for t in snapshot["tasks"]}
            got: list[tuple[str, int]] = []
            finished = 0
            async for message in messages:
                event = orjson.loads(message.data or "")
                got.append((event["task"]["id"], event["seq"]))
                finished += event["type"] == "task.completed"
                if finished == len(ids):
                    break
            await messages.aclose()
            return covered, got

    producer = asyncio.create_task(churn())
    watchers = [asyncio.create_task(one_watch(i)) for i in ids for _ in range(3)]
    set_watchers = [asyncio.create_task(set_watch()) for _ in range(3)]
    await producer
    for task_id in ids:
        await d.complete(task_id, tokens[task_id])
    logs = {task_id: [e["seq"] for e in await d.log(task_id)] for task_id in ids}
    for task_id, watcher in zip([i for i in ids for _ in range(3)], watchers, strict=True):
        start, seqs = await watcher
        assert seqs == [s for s in logs[task_id] if s > start]
    for watcher in set_watchers:
        covered, got = await watcher
        for task_id in ids:
            mine = [seq for tid, seq in got if tid == task_id]
            assert mine == [s for s in logs[task_id] if s > covered.get(task_id, 0)]


async def test_set_watch_snapshot_filters_and_resume(served: tuple[Runtime, str, Driver]) -> None:
    _runtime, url, d = served
    a1 = await d.create()
    a2 = await d.create()
    await d.create(owner="bob")
    token = await d.start(a2)
    async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
        messages = sse(client, "/v1/watch", params={"owner": "alice", "status": "processing"})
        snapshot = orjson.loads((await anext(messages)).data or "")
        assert [t["id"] for t in snapshot["tasks"]] == [a2]
        await d.progress(a2, token, 10)
        await d.progress(a2, token, 20)
        first = await anext(messages)
        assert orjson.loads(first.data or "")["task"]["progress"] == 10
        await messages.aclose()
        resumed = sse(
            client, "/v1/watch", params={"owner": "alice"}, headers={"Last-Event-ID": first.id or ""}
        )
        again = await anext(resumed)
        assert orjson.loads(again.data or "")["task"]["progress"] == 20
        await resumed.aclose()
    assert a1


async def test_resuming_from_before_the_purge_horizon_resets(served: tuple[Runtime, str, Driver]) -> None:
    runtime, url, d = served
    old = await d.create()
    await runtime.store.apply(old, lambda r: model.cancel(r, now=runtime.clock.now()))
    await runtime.store.purge(finished_before=runtime.clock.now() + 1, tombstones_before=0, limit=10)
    pending = await d.create()
    async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
        messages = sse(client, "/v1/watch", headers={"Last-Event-ID": "1"})
        reset = await anext(messages)
        snapshot = await anext(messages)
        await messages.aclose()
    assert reset.event == "reset" and reset.id is None
    assert snapshot.event == "tasks.snapshot"
    assert [t["id"] for t in orjson.loads(snapshot.data or "")["tasks"]] == [pending]


async def test_watches_are_isolated_by_owner_and_token(served: tuple[Runtime, str, Driver]) -> None:
    runtime, url, d = served
    bobs = await d.create(owner="bob")
    alices = await d.create(owner="alice")
    async with httpx.AsyncClient(base_url=url, headers=auth()) as admin:
        alice = (await admin.post("/v1/tokens", json={"owner": "alice"})).json()["token"]
        scoped = (await admin.post("/v1/tokens", json={"owner": "alice", "task_id": alices})).json()["token"]
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.get(f"/v1/tasks/{bobs}/watch", params={"access_token": alice})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await client.get(f"/v1/tasks/{bobs}/watch", params={"access_token": scoped})
        assert r.status_code == 404
        r = await client.get("/v1/watch", params={"access_token": scoped})
        assert r.status_code == 403
        r = await client.get("/v1/watch", params={"access_token": alice, "owner": "bob"})
        assert r.status_code == 403
        assert (await client.get(f"/v1/tasks/{alices}/watch")).status_code == 401
        messages = sse(client, "/v1/watch", params={"access_token": alice})
        snapshot = orjson.loads((await anext(messages)).data or "")
        assert [t["owner"] for t in snapshot["tasks"]] == ["alice"]
        await runtime.store.apply(bobs, lambda r: model.cancel(r, now=runtime.clock.now()))
        await runtime.store.apply(alices, lambda r: model.cancel(r, now=runtime.clock.now()))
        event = orjson.loads((await anext(messages)).data or "")
        assert event["task"]["id"] == alices  # bob's change never reached alice's stream
        await messages.aclose()
    async with websockets.connect(url.replace("http", "ws") + f"/v1/ws?access_token={alice}") as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "task_id": bobs}).decode())
        reply = orjson.loads(await ws.recv())
        assert reply["op"] == "error" and reply["error"]["code"] == "not_found"
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(url.replace("http", "ws") + "/v1/ws"):
            pass


async def test_watch_limits_answer_429(live: LiveFactory) -> None:
    runtime, url = await live(app, workers=False, max_watches_per_owner=2, max_watches=3)
    d = Driver(runtime)
    task_id = await d.create()
    async with httpx.AsyncClient(base_url=url, headers=auth()) as admin:
        alice = (await admin.post("/v1/tokens", json={"owner": "alice"})).json()["token"]
    async with httpx.AsyncClient(base_url=url, params={"access_token": alice}) as client:
        open_streams = [sse(client, f"/v1/tasks/{task_id}/watch") for _ in range(2)]
        for stream in open_streams:
            await anext(stream)
        r = await client.get(f"/v1/tasks/{task_id}/watch")
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_watches"
        async with httpx.AsyncClient(base_url=url, headers=auth()) as admin:
            third = sse(admin, "/v1/watch")
            await anext(third)
            r = await admin.get("/v1/watch")
            assert r.status_code == 429
            await third.aclose()
        for stream in open_streams:
            await stream.aclose()
    for _ in range(100):
        if runtime.hub.watch_count == 0:
            break
        await asyncio.sleep(0.01)
    assert runtime.hub.watch_count == 0  # closed streams release their watches


async def _collect(messages: Any) -> list[Any]:
    return [m async for m in messages]


async def test_a_slow_consumer_is_cut_off_without_delaying_a_fast_one(live: LiveFactory) -> None:
    runtime, url = await live(app, workers=False, watch_buffer=50)
    d = Driver(runtime)
    task_id = await d.create()
    token = await d.start(task_id)
    host, port = url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(
        f"GET /v1/tasks/{task_id}/watch HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\n\r\n".encode()
    )
    try:
        async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
            fast = sse(client, f"/v1/tasks/{task_id}/watch")
            assert (await anext(fast)).event == "task.snapshot"
            reader = asyncio.create_task(_collect(fast))
            big = "x" * 900
            for step in range(3000):
                now = runtime.clock.now()
                await runtime.store.apply(
                    task_id,
                    lambda r, s=step, t=now: model.report_progress(
                        r, now=t, lease_token=token, progress=None, message=f"{s} {big}"
                    ),
                )
            await d.complete(task_id, token)
            received = await asyncio.wait_for(reader, 30)
        assert len(received) == 3001 and received[-1].event == "task.completed"
        assert runtime.hub.watch_count == 0  # the slow one overflowed and was closed
    finally:
        slow.close()


async def test_shutdown_ends_open_streams(live: LiveFactory) -> None:
    runtime, url = await live(app, workers=False)
    task_id = await Driver(runtime).create()
    async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
        messages = sse(client, f"/v1/tasks/{task_id}/watch")
        await anext(messages)
        runtime.hub.close_watches()
        assert [m async for m in messages] == []


async def test_websocket_protocol(served: tuple[Runtime, str, Driver]) -> None:
    runtime, url, d = served
    t1 = await d.create()
    t2 = await d.create()
    async with websockets.connect(url.replace("http", "ws") + f"/v1/ws?access_token={ADMIN_KEY}") as ws:
        await ws.send('{"op": "ping"}')
        assert orjson.loads(await ws.recv()) == {"op": "pong"}
        await ws.send("not json")
        assert orjson.loads(await ws.recv())["error"]["code"] == "bad_request"
        await ws.send('{"op": "subscribe"}')
        assert orjson.loads(await ws.recv())["error"]["code"] == "bad_request"
        await ws.send(orjson.dumps({"op": "subscribe", "task_id": t1}).decode())
        assert orjson.loads(await ws.recv()) == {"op": "subscribed", "sub": "s1"}
        await ws.send(orjson.dumps({"op": "subscribe", "filter": {"owner": "alice"}, "sub": "all"}).decode())
        messages = [orjson.loads(await ws.recv()) for _ in range(3)]
        assert {(m.get("sub"), m.get("event") or m.get("op")) for m in messages} == {
            ("s1", "task.snapshot"),
            ("all", "subscribed"),
            ("all", "tasks.snapshot"),
        }
        await runtime.store.apply(t2, lambda r: model.cancel(r, now=runtime.clock.now()))
        event = orjson.loads(await ws.recv())
        assert (event["sub"], event["event"], event["data"]["task"]["id"]) == ("all", "task.cancelled", t2)
        await ws.send('{"op": "unsubscribe", "sub": "all"}')
        assert orjson.loads(await ws.recv()) == {"op": "unsubscribed", "sub": "all"}
        await runtime.store.apply(t1, lambda r: model.cancel(r, now=runtime.clock.now()))
        event = orjson.loads(await ws.recv())
        assert (event["sub"], event["event"]) == ("s1", "task.cancelled")
        assert orjson.loads(await ws.recv()) == {"op": "end", "sub": "s1"}


async def test_websocket_answers_bad_frames_with_an_error_and_stays_open(
    served: tuple[Runtime, str, Driver],
) -> None:
    runtime, url, d = served
    task_id = await d.create()
    async with websockets.connect(url.replace("http", "ws") + f"/v1/ws?access_token={ADMIN_KEY}") as ws:
        bad_frames: list[str | bytes] = [
            b'{"op": "ping"}',  # a binary frame
            orjson.dumps({"op": "subscribe", "task_id": task_id, "after": 2**63}).decode(),
            '{"op": "subscribe", "task_id": "t", "after": 1e400}',
            '{"op": "subscribe", "task_id": "t", "after": -1}',
            orjson.dumps({"op": "subscribe", "filter": {"owner": "a\x00b"}}).decode(),
            orjson.dumps({"op": "subscribe", "task_id": "a\x00"}).decode(),
            '{"op": "subscribe", "task_id": "t", "after": NaN}',
        ]
        for frame in bad_frames:
            await ws.send(frame)
            reply = orjson.loads(await ws.recv())
            assert reply["op"] == "error" and reply["error"]["code"] in ("bad_request", "invalid_request")
        await ws.send('{"op": "ping"}')
        assert orjson.loads(await ws.recv()) == {"op": "pong"}
        await ws.send(orjson.dumps({"op": "subscribe", "task_id": task_id, "after": 2**63 - 1}).decode())
        assert orjson.loads(await ws.recv()) == {"op": "subscribed", "sub": "s1"}
    assert await _until_no_watches(runtime)  # the subscription ended with its socket


async def _until_no_watches(runtime: Runtime) -> bool:
    async with asyncio.timeout(10):
        while runtime.hub.watch_count:  # noqa: ASYNC110 - the hub has no event for it
            await asyncio.sleep(0.01)
    return True


async def test_websocket_handshakes_are_refused_with_http_answers_and_the_origin_policy(
    live: LiveFactory,
) -> None:
    _runtime, url = await live(app, workers=False, cors_origins="https://app.example")
    ws_url = url.replace("http", "ws") + "/v1/ws"
    for token in ("wrong", "eto_forged.sig", None):
        query = f"?access_token={token}" if token else ""
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(ws_url + query):
                pass
        assert refused.value.response.status_code == 401
        assert orjson.loads(refused.value.response.body)["error"]["code"] == "unauthorized"
    authorised = ws_url + f"?access_token={ADMIN_KEY}"
    for origin in ("https://evil.example", "null", "http://app.example"):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(authorised, origin=origin):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403, origin
    for origin in ("https://app.example", url, None):  # allowed, the service's own, not a browser
        async with websockets.connect(authorised, origin=origin) as ws:  # type: ignore[arg-type]
            await ws.send('{"op": "ping"}')
            assert orjson.loads(await ws.recv()) == {"op": "pong"}


async def test_sdk_watch_and_wait_follow_a_real_worker(live: LiveFactory) -> None:
    from errands import AsyncClient

    worker_app = Errands()

    @worker_app.task("steps")
    async def steps(ctx: TaskContext, input: dict[str, Any]) -> str:
        for i in range(5):
            await ctx.progress(i * 20, f"step {i}")
            await asyncio.sleep(0.02)
        return "done"

    runtime, url = await live(worker_app, progress_interval_s=0.0)
    async with AsyncClient(url, ADMIN_KEY) as client:
        task = await client.submit("steps")
        events = [e async for e in client.watch(task.id)]
        assert events[0].type == "task.snapshot"
        assert events[-1].type == "task.completed" and events[-1].task.result == "done"
        log = [e.seq for e in await runtime.store.events(task.id)]
        assert [e.seq for e in events[1:]] == [s for s in log if s > events[0].seq]
        second = await client.submit("steps")
        finished = await client.wait(second.id, timeout_s=10)
        assert finished.status is Status.COMPLETED
        ended = await client.wait(task.id, timeout_s=5)
        assert ended.result == "done"


async def test_sdk_falls_back_to_polling_when_streaming_is_blocked(runtime_factory: Any) -> None:
    """A proxy in front of errands that refuses event streams: the SDK polls instead."""
    import uvicorn

    from errands import AsyncClient
    from errands.api import create_api
    from errands.server import bind

    runtime = await runtime_factory(app, workers=False)
    api = create_api(runtime)

    async def no_streams(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/watch"):
            body = b'{"error": {"code": "not_found", "message": "No such route."}}'
            await send(
                {"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        await api(scope, receive, send)

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(no_streams, lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn only has a flag
            await asyncio.sleep(0.01)
        d = Driver(runtime)
        task_id = await d.create()
        token = await d.start(task_id)
        async with AsyncClient(f"http://127.0.0.1:{sock.getsockname()[1]}", ADMIN_KEY) as client:
            watching = client.watch(task_id, poll_s=0.05)
            first = await anext(watching)
            assert first.type == "task.snapshot"
            await d.progress(task_id, token, 40)
            await d.complete(task_id, token)
            rest = [e async for e in watching]
        assert [e.type for e in rest] == [EventType.PROGRESS.value, EventType.COMPLETED.value]
    finally:
        server.should_exit = True
        await serving


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/watch?status=done", {}, 422, "invalid_request"),
        ("/v1/watch?after=-1", {}, 422, "invalid_request"),
        ("/v1/watch?after=soon", {}, 422, "invalid_request"),
        ("/v1/watch?type=a%20b", {}, 422, "invalid_request"),
        ("/v1/watch", {"Last-Event-ID": "abc"}, 400, "bad_request"),
        ("/v1/tasks/a%20b/watch", {}, 422, "invalid_request"),
        ("/v1/tasks/missing/watch", {}, 404, "not_found"),
    ],
)
async def test_bad_watch_requests_get_a_clear_4xx(
    served: tuple[Runtime, str, Driver], path: str, headers: dict[str, str], status: int, code: str
) -> None:
    runtime, url, _ = served
    async with httpx.AsyncClient(base_url=url, headers=auth()) as client:
        r = await client.get(path, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert runtime.hub.watch_count == 0


async def test_the_stream_endpoints_are_in_the_openapi_document(served: tuple[Runtime, str, Driver]) -> None:
    _, url, _ = served
    async with httpx.AsyncClient(base_url=url) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert "text/event-stream" in paths["/v1/tasks/{task_id}/watch"]["get"]["responses"]["200"]["content"]
    assert {p["name"] for p in paths["/v1/watch"]["get"]["parameters"]} >= {
        "type",
        "status",
        "after",
        "Last-Event-ID",
    }
