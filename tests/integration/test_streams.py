"""Output streams on both stores, over real HTTP: live delivery, exact resume, retries, isolation."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import orjson
import pytest

from errands import Errands, Retry, StreamLimit, TaskContext, model
from errands.auth import SYSTEM
from errands.model import Status
from errands.service import SubmitRequest, TokenRequest
from tests.conftest import ADMIN_KEY
from tests.integration.conftest import LiveFactory, RuntimeFactory, sse, wait_task

app = Errands()


@app.task("chatter", max_attempts=2)
async def chatter(ctx: TaskContext, input: dict[str, Any]) -> str:
    n = input["n"] // 2 if input.get("fail_first") and ctx.attempt == 1 else input["n"]
    for i in range(n):
        if i % 3 == 0:
            await ctx.stream("pages", {"page": i, "attempt": ctx.attempt})
        await ctx.stream("text", f"{i},")
        if i % 50 == 49:
            await asyncio.sleep(0.001)  # let time pass, so the chunks go out in many writes
    if n < input["n"]:
        raise Retry(after_s=0)
    return "done"


@app.task("flood")
async def flood(ctx: TaskContext, input: dict[str, Any]) -> str:
    try:
        while True:
            await ctx.stream("text", "x" * 100)
    except StreamLimit as exc:
        return exc.code


@app.task("sync_streamer")
def sync_streamer(ctx: TaskContext, input: dict[str, Any]) -> None:
    for i in range(input["n"]):
        ctx.stream("text", f"{i};")


def auth(token: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def stored(client: httpx.AsyncClient, task_id: str, attempt: int, name: str = "text") -> list[Any]:
    r = await client.get(f"/v1/tasks/{task_id}/streams/{name}", params={"attempt": attempt, "format": "json"})
    assert r.status_code == 200, r.text
    chunks: list[Any] = r.json()["chunks"]
    return chunks


async def watch_with_cuts(
    client: httpx.AsyncClient, task_id: str, rng: random.Random
) -> dict[tuple[str, int], list[Any]]:
    """Watch the task from its start, hanging up after a random number of messages each time and
    resuming with Last-Event-ID, until it ends: every chunk received, per (stream, attempt)."""
    got: dict[tuple[str, int], list[Any]] = {}
    last: int | None = 0  # from the first event of the log
    ended = False
    reconnects = 0
    while not ended:
        budget = rng.randint(1, 40)
        headers = {} if last is None else {"Last-Event-ID": str(last)}
        path = f"/v1/tasks/{task_id}/watch"
        async for message in sse(client, path, headers=headers, params={"streams": "include"}):
            data = orjson.loads(message.data)
            if message.event == "task.stream":
                part = data["stream"]
                chunks = got.setdefault((part["name"], part["attempt"]), [])
                assert part["index"] == len(chunks), "a gap or a repeat in the stream"
                chunks.extend(part["chunks"])
            if message.id is not None:
                last = int(message.id)
            if message.event in ("task.completed", "task.failed"):
                ended = True
                break
            budget -= 1
            if budget == 0:
                break
        reconnects += 1
    assert reconnects > 3
    return got


async def test_watchers_cut_at_random_points_receive_every_chunk_once(live: LiveFactory) -> None:
    runtime, url = await live(app, stream_flush_s=0.002)
    n = 10_000
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
        r = await client.post(
            "/v1/tasks", json={"type": "chatter", "id": "long", "input": {"n": n, "fail_first": True}}
        )
        assert r.status_code == 202
        results = await asyncio.gather(
            *(watch_with_cuts(client, "long", random.Random(seed)) for seed in range(3))
        )
        done = await wait_task(runtime, "long", timeout_s=60)
        assert done.status is Status.COMPLETED and done.attempt == 2
        first, second = await stored(client, "long", 1), await stored(client, "long", 2)
        assert first == [f"{i}," for i in range(n // 2)]
        assert second == [f"{i}," for i in range(n)]
        pages = await stored(client, "long", 2, "pages")
        assert pages == [{"page": i, "attempt": 2} for i in range(0, n, 3)]
        for got in results:
            assert got[("text", 1)] == first and got[("text", 2)] == second
            assert got[("pages", 2)] == pages
        # The whole text, and what is left from an offset, as plain text.
        whole = await client.get("/v1/tasks/long/streams/text")
        assert whole.headers["content-type"].startswith("text/plain")
        assert whole.text == "".join(second) and whole.headers["x-errands-attempt"] == "2"
        tail = await client.get("/v1/tasks/long/streams/text", params={"offset": n - 2})
        assert tail.text == f"{n - 2},{n - 1}," and tail.headers["x-errands-next-offset"] == str(n)
        lines = await client.get("/v1/tasks/long/streams/pages")
        assert lines.headers["content-type"].startswith("application/x-ndjson")
        assert [orjson.loads(x) for x in lines.text.splitlines()] == pages
        listed = (await client.get("/v1/tasks/long/streams")).json()["streams"]
        assert {(s["name"], s["attempt"], s["chunks"]) for s in listed} == {
            ("text", 1, n // 2), ("pages", 1, len(range(0, n // 2, 3))),
            ("text", 2, n), ("pages", 2, len(pages)),
        }  # fmt: skip
        # Far fewer writes than chunks: the log holds a few events per hundred chunks.
        params = {"limit": 1000, "streams": "include"}
        events = (await client.get("/v1/tasks/long/events", params=params)).json()["events"]
        assert len(events) < 1000
        assert sum(e["type"] == "task.stream" for e in events) > 20
        # The log leaves output out unless asked, or gives only it (and the end).
        plain = (await client.get("/v1/tasks/long/events")).json()["events"]
        assert [e["seq"] for e in plain] == [e["seq"] for e in events if e["type"] != "task.stream"]
        only = (await client.get("/v1/tasks/long/events", params={"streams": "only"})).json()["events"]
        assert {e["type"] for e in only} == {"task.stream", "task.completed"}


async def test_a_page_that_opens_late_loads_the_past_then_watches_exactly_the_rest(live: LiveFactory) -> None:
    runtime, url = await live(app)
    gate = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
        r = await client.post("/v1/tasks", json={"type": "chatter", "id": "late", "input": {"n": 3000}})
        assert r.status_code == 202
        await wait_task(runtime, "late", until=lambda t: t.seq > 0 and t.status is Status.PROCESSING)
        past = await client.get("/v1/tasks/late/streams/text", params={"format": "json"})
        body = past.json()
        chunks = list(body["chunks"])
        gate.set()
        async for message in sse(
            client, "/v1/tasks/late/watch", params={"after": body["seq"], "streams": "only"}
        ):
            if message.event == "task.stream":
                part = orjson.loads(message.data)["stream"]
                if part["name"] == "text":
                    assert part["index"] == len(chunks)
                    chunks.extend(part["chunks"])
            else:
                assert message.event == "task.completed"  # streams=only: nothing but chunks and the end
                break
        assert chunks == [f"{i}," for i in range(3000)]


async def test_streams_can_be_left_out_of_a_watch_and_reach_a_set_watch_only_when_asked(
    live: LiveFactory,
) -> None:
    _, url = await live(app)
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
        watched = {
            "task": sse(client, "/v1/tasks/quiet/watch", params={"streams": "none"}),
        }
        r = await client.post("/v1/tasks", json={"type": "chatter", "id": "quiet", "input": {"n": 200}})
        assert r.status_code == 202
        kinds = []
        async for message in watched["task"]:
            kinds.append(message.event)
            if message.event == "task.completed":
                break
        assert "task.stream" not in kinds and kinds[-1] == "task.completed"
        # Replayed from the log, a set watch leaves streams out unless it asks.
        for streams, expected in (("none", False), ("include", True)):
            seen = []
            async for message in sse(client, "/v1/watch", params={"after": 0, "streams": streams}):
                seen.append(message.event)
                if message.event == "task.completed":
                    break
            assert ("task.stream" in seen) is expected


async def test_the_size_limit_ends_the_stream_with_a_clear_error(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app, stream_max_bytes=10_000)
    await runtime.service.submit(SubmitRequest(type="flood", id="flood"), SYSTEM)
    done = await wait_task(runtime, "flood", timeout_s=30)
    assert done.status is Status.COMPLETED and done.result == "stream_too_large"
    read = await runtime.service.stream("flood", SYSTEM, "text", attempt=None, offset=0)
    assert sum(len(orjson.dumps(c)) for c in read.chunks) <= 10_000
    assert len(read.chunks) == 10_000 // 102


async def test_a_sync_handler_streams_from_its_thread(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app)
    await runtime.service.submit(SubmitRequest(type="sync_streamer", id="s", input={"n": 500}), SYSTEM)
    done = await wait_task(runtime, "s", timeout_s=30)
    assert done.status is Status.COMPLETED
    read = await runtime.service.stream("s", SYSTEM, "text", attempt=None, offset=0)
    assert read.chunks == [f"{i};" for i in range(500)]


async def test_stream_routes_keep_owners_apart(live: LiveFactory) -> None:
    runtime, url = await live(app)
    await runtime.service.submit(
        SubmitRequest(type="chatter", id="mine", owner="alice", input={"n": 10}), SYSTEM
    )
    await runtime.service.submit(
        SubmitRequest(type="chatter", id="other", owner="alice", input={"n": 10}), SYSTEM
    )
    await wait_task(runtime, "mine")
    bob = runtime.service.mint_token(TokenRequest(owner="bob"), SYSTEM)["token"]
    alice = runtime.service.mint_token(TokenRequest(owner="alice"), SYSTEM)["token"]
    scoped = runtime.service.mint_token(TokenRequest(owner="alice", task_id="other"), SYSTEM)["token"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for path in ("/v1/tasks/mine/streams", "/v1/tasks/mine/streams/text"):
            assert (await client.get(path, headers=auth(bob))).status_code == 404
            assert (await client.get(path, headers=auth(scoped))).status_code in (403, 404)
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers=auth(alice))).status_code == 200
        ok = await client.get("/v1/tasks/mine/streams/text", headers=auth(alice))
        assert ok.text == "".join(f"{i}," for i in range(10))


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/tasks/mine/streams/bad name", {}),
        ("/v1/tasks/mine/streams/-x", {}),
        ("/v1/tasks/mine/streams/text", {"offset": "-1"}),
        ("/v1/tasks/mine/streams/text", {"attempt": "0"}),
        ("/v1/tasks/mine/streams/text", {"format": "xml"}),
        ("/v1/tasks/mine/watch", {"streams": "some"}),
        ("/v1/watch", {"streams": "all"}),
    ],
)
async def test_bad_stream_requests_are_refused(live: LiveFactory, path: str, params: dict[str, str]) -> None:
    runtime, url = await live(app)
    await runtime.service.submit(SubmitRequest(type="chatter", id="mine", input={"n": 1}), SYSTEM)
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
        r = await client.get(path, params=params)
        assert r.status_code in (404, 422), r.text
        assert r.json()["error"]["code"]


async def test_compact_events_carry_only_what_changed_and_merge_into_the_task(live: LiveFactory) -> None:
    runtime, url = await live(app, workers=False)
    await runtime.service.submit(SubmitRequest(type="chatter", id="p", input={"n": 1}), SYSTEM)
    store, now = runtime.store, runtime.clock.now()
    await store.apply(
        "p", lambda r: model.start_attempt(r, now=now, worker_id="w", lease_token="l", lease_s=600)
    )
    for step in range(1, 21):
        await store.apply(
            "p",
            lambda r, s=step: model.report_progress(
                r, now=now, lease_token="l", progress=s * 4, message=f"{s}"
            ),
        )
    await store.apply("p", lambda r: model.complete(r, now=now, lease_token="l", result={"ok": 1}))
    sizes: dict[bool, int] = {}
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
        final = (await client.get("/v1/tasks/p")).json()
        for compact in (False, True):
            merged: dict[str, Any] = {}
            sizes[compact] = 0
            async for message in sse(client, "/v1/tasks/p/watch", params={"after": 0, "compact": compact}):
                assert message.data is not None
                sizes[compact] += len(message.data)
                task = orjson.loads(message.data)["task"]
                if compact and merged:
                    changed = {
                        "progress",
                        "message",
                        "updated_at",
                        "started_at",
                        "attempt",
                        "result",
                        "finished_at",
                    }
                    assert set(task) <= {"id", "status", "seq", *changed}, task
                merged.update(task)
                if message.event == "task.completed":
                    break
            assert merged == final
    assert sizes[True] * 3 < sizes[False], sizes


async def test_a_page_with_part_of_the_text_asks_for_the_rest_by_byte_range(live: LiveFactory) -> None:
    runtime, url = await live(app)
    await runtime.service.submit(SubmitRequest(type="chatter", id="r", input={"n": 20}), SYSTEM)
    await wait_task(runtime, "r")
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
        whole = await client.get("/v1/tasks/r/streams/text")
        assert whole.headers["accept-ranges"] == "bytes"
        text = whole.content
        rest = await client.get("/v1/tasks/r/streams/text", headers={"Range": "bytes=10-"})
        assert rest.status_code == 206 and rest.content == text[10:]
        assert rest.headers["content-range"] == f"bytes 10-{len(text) - 1}/{len(text)}"
        middle = await client.get("/v1/tasks/r/streams/text", headers={"Range": "bytes=2-5"})
        assert middle.status_code == 206 and middle.content == text[2:6]
        past = await client.get("/v1/tasks/r/streams/text", headers={"Range": f"bytes={len(text)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(text)}"
        assert past.json()["error"]["code"] == "range_not_satisfiable"
        for ignored in ("bytes=-5", "items=0-", "bytes=5-2", "bytes=x-"):
            r = await client.get("/v1/tasks/r/streams/text", headers={"Range": ignored})
            assert r.status_code == 200 and r.content == text, ignored


async def test_the_sdk_reads_a_finished_stream_and_stops(live: LiveFactory) -> None:
    from errands import AsyncClient

    runtime, url = await live(app)
    await runtime.service.submit(SubmitRequest(type="chatter", id="f", input={"n": 30}), SYSTEM)
    done = await wait_task(runtime, "f")
    async with AsyncClient(url, ADMIN_KEY) as client:
        async with asyncio.timeout(20):
            chunks = [c async for c in client.stream("f", "text")]
            assert [c.value for c in chunks] == [f"{i}," for i in range(30)]
            assert [c.index for c in chunks] == list(range(30)) and {c.attempt for c in chunks} == {1}
            # Resuming after the end: nothing more, and it returns rather than waits.
            assert [c async for c in client.stream("f", "text", after=done.seq)] == []
