"""The HTTP API on a real store: statuses, pagination, auth, owner isolation, bad input."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from errands import Errands, Fail, Status, Task, TaskContext
from errands.auth import SYSTEM
from errands.runtime import Runtime
from errands.service import TokenRequest
from tests.conftest import ADMIN_KEY
from tests.integration.conftest import LiveFactory, RuntimeFactory, http, log_rows, wait_task

app = Errands()


@app.task("work")
async def work(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    if input.get("fail"):
        raise Fail("nope", "failed on purpose")
    return {"echo": input}


@app.task("hold")
async def hold(ctx: TaskContext, input: dict[str, Any]) -> None:
    await asyncio.sleep(60)


@pytest.fixture
async def runtime(runtime_factory: RuntimeFactory) -> Runtime:
    return await runtime_factory(app, workers=False)


@pytest.fixture
async def admin(runtime: Runtime) -> Any:
    async with http(runtime) as client:
        yield client


async def token_for(admin: httpx.AsyncClient, owner: str, **extra: Any) -> str:
    r = await admin.post("/v1/tokens", json={"owner": owner, **extra})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


async def log_size(runtime: Runtime) -> int:
    return await log_rows(runtime.settings.db)


async def test_submit_answers_at_once_and_is_idempotent(admin: httpx.AsyncClient) -> None:
    body = {"type": "work", "input": {"a": 1}, "id": "order-1", "owner": "alice"}
    first = await admin.post("/v1/tasks", json=body)
    assert first.status_code == 202
    task = first.json()
    assert (task["id"], task["status"], task["owner"]) == ("order-1", "pending", "alice")
    assert task["seq"] > 0
    assert list(task) == [
        "id", "type", "owner", "status", "input", "result", "error", "progress", "message", "attempt",
        "max_attempts", "priority", "external_id", "webhook_received", "notification_sent", "created_at",
        "updated_at", "started_at", "finished_at", "expires_at", "scheduled_for", "waiting_for", "start_by",
        "key", "debounce_key", "notify_url", "cost", "seq",
    ]  # fmt: skip
    assert task["created_at"].endswith("Z")
    again = await admin.post("/v1/tasks", json=body)
    assert again.status_code == 200 and again.json() == task
    other = await admin.post("/v1/tasks", json={**body, "input": {"a": 2}})
    assert other.status_code == 409 and other.json()["error"]["code"] == "id_conflict"
    unknown = await admin.post("/v1/tasks", json={"type": "nope"})
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_type"
    generated = (await admin.post("/v1/tasks", json={"type": "work"})).json()
    assert len(generated["id"]) == 26


async def test_concurrent_duplicate_submits_create_one_task(
    admin: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = {"type": "work", "id": "same", "input": {"x": 1}}
    responses = await asyncio.gather(*(admin.post("/v1/tasks", json=body) for _ in range(20)))
    assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
    # The task's own log, read directly: it does not wait for other transactions on the server.
    assert [e.type.value for e in await runtime.store.events("same")] == ["task.created"]


async def test_list_is_newest_first_with_cursor_and_filters(admin: httpx.AsyncClient) -> None:
    for i in range(5):
        await admin.post("/v1/tasks", json={"type": "work", "id": f"a{i}", "owner": "alice"})
    await admin.post("/v1/tasks", json={"type": "hold", "id": "b0", "owner": "bob"})
    page = (await admin.get("/v1/tasks", params={"owner": "alice", "limit": 3})).json()
    assert [t["id"] for t in page["tasks"]] == ["a4", "a3", "a2"]
    rest = (await admin.get("/v1/tasks", params={"owner": "alice", "cursor": page["next_cursor"]})).json()
    assert [t["id"] for t in rest["tasks"]] == ["a1", "a0"] and rest["next_cursor"] is None
    everything = (await admin.get("/v1/tasks")).json()["tasks"]
    assert len(everything) == 6
    holds = (await admin.get("/v1/tasks", params={"type": "hold"})).json()["tasks"]
    assert [t["id"] for t in holds] == ["b0"]
    await admin.post("/v1/tasks/a0/cancel")
    cancelled = (await admin.get("/v1/tasks", params={"status": "cancelled"})).json()["tasks"]
    assert [t["id"] for t in cancelled] == ["a0"]


async def test_cancel_and_manual_retry_rules(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app, max_manual_retries=1)
    async with http(runtime) as admin:
        t = (
            await admin.post("/v1/tasks", json={"type": "work", "input": {"fail": True}, "max_attempts": 1})
        ).json()
        failed = await wait_task(runtime, t["id"])
        assert failed.status.value == "failed"
        assert (await admin.post(f"/v1/tasks/{t['id']}/cancel")).status_code == 409
        retried = await admin.post(f"/v1/tasks/{t['id']}/retry")
        assert retried.status_code == 200 and retried.json()["status"] == "pending"
        await wait_task(runtime, t["id"], until=lambda r: r.status.value == "failed" and r.attempt == 2)
        limit = await admin.post(f"/v1/tasks/{t['id']}/retry")
        assert limit.status_code == 409 and limit.json()["error"]["code"] == "retry_limit"
        ok = (await admin.post("/v1/tasks", json={"type": "work"})).json()
        await wait_task(runtime, ok["id"])
        assert (await admin.post(f"/v1/tasks/{ok['id']}/retry")).status_code == 409
        held = (await admin.post("/v1/tasks", json={"type": "hold"})).json()
        await wait_task(runtime, held["id"], until=lambda r: r.status.value == "processing")
        cancelled = await admin.post(f"/v1/tasks/{held['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert (await admin.post(f"/v1/tasks/{held['id']}/cancel")).status_code == 409


async def test_events_of_a_task_oldest_first(admin: httpx.AsyncClient) -> None:
    await admin.post("/v1/tasks", json={"type": "work", "id": "t1"})
    await admin.post("/v1/tasks/t1/cancel")
    events = (await admin.get("/v1/tasks/t1/events")).json()["events"]
    assert [e["type"] for e in events] == ["task.created", "task.cancelled"]
    assert events[0]["seq"] < events[1]["seq"]
    assert events[1]["task"]["status"] == "cancelled" and events[1]["task"]["seq"] == events[1]["seq"]
    later = (await admin.get("/v1/tasks/t1/events", params={"after": events[0]["seq"]})).json()["events"]
    assert [e["seq"] for e in later] == [events[1]["seq"]]


async def test_owners_are_isolated_on_every_endpoint(admin: httpx.AsyncClient, runtime: Runtime) -> None:
    await admin.post("/v1/tasks", json={"type": "work", "id": "bobs", "owner": "bob"})
    alice = await token_for(admin, "alice")
    before = await log_size(runtime)
    async with http(runtime, alice) as client:
        for method, path in [
            ("GET", "/v1/tasks/bobs"),
            ("GET", "/v1/tasks/bobs/events"),
            ("POST", "/v1/tasks/bobs/cancel"),
            ("POST", "/v1/tasks/bobs/retry"),
        ]:
            r = await client.request(method, path)
            assert r.status_code == 404, (method, path)
            assert r.json()["error"]["code"] == "not_found"
        assert (await client.get("/v1/tasks")).json()["tasks"] == []
        assert (await client.get("/v1/tasks", params={"owner": "bob"})).status_code == 403
        assert (await client.post("/v1/tasks", json={"type": "work", "owner": "bob"})).status_code == 403
        assert (await client.get("/v1/stats")).status_code == 403
        assert (await client.post("/v1/tokens", json={"owner": "bob"})).status_code == 403
        mine = await client.post("/v1/tasks", json={"type": "work"})
        assert mine.status_code == 202 and mine.json()["owner"] == "alice"
        assert (await client.get(f"/v1/tasks/{mine.json()['id']}")).status_code == 200
    assert await log_size(runtime) == before + 1


async def test_every_endpoint_needs_a_valid_token(runtime: Runtime) -> None:
    for token in (None, "wrong", "eto_forged.sig", ADMIN_KEY + "x"):
        async with http(runtime, token) as client:
            for method, path in [
                ("POST", "/v1/tasks"),
                ("GET", "/v1/tasks"),
                ("GET", "/v1/tasks/x"),
                ("POST", "/v1/tasks/x/cancel"),
                ("POST", "/v1/tasks/x/retry"),
                ("GET", "/v1/tasks/x/events"),
                ("GET", "/v1/stats"),
                ("POST", "/v1/tokens"),
                ("GET", "/metrics"),
            ]:
                r = await client.request(method, path, json={"type": "work"} if method == "POST" else None)
                assert r.status_code == 401, (token, method, path)
                assert r.headers["www-authenticate"] == "Bearer"
                assert ADMIN_KEY not in r.text
    async with http(runtime, None) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
    assert await log_size(runtime) == 0


async def test_scoped_and_read_only_tokens(admin: httpx.AsyncClient) -> None:
    for task_id in ("t1", "t2"):
        await admin.post("/v1/tasks", json={"type": "work", "id": task_id, "owner": "alice"})
    scoped = await token_for(admin, "alice", task_id="t1", scopes=["read"])
    transport = admin._transport  # the same ASGI app
    async with httpx.AsyncClient(transport=transport, base_url="http://errands") as client:
        assert (await client.get("/v1/tasks/t1", params={"access_token": scoped})).status_code == 200
        assert (await client.get("/v1/tasks/t2", params={"access_token": scoped})).status_code == 404
        listed = (await client.get("/v1/tasks", params={"access_token": scoped})).json()["tasks"]
        assert [t["id"] for t in listed] == ["t1"]
        r = await client.post("/v1/tasks/t1/cancel", params={"access_token": scoped})
        assert r.status_code == 403


DEEP: Any = 1
for _ in range(40):
    DEEP = [DEEP]

BAD_INPUTS: list[tuple[str, Any, int, str]] = [
    ("not JSON", b"{nope", 400, "bad_request"),
    ("JSON nested beyond the parser", b'{"type": "work", "input": ' + b"[" * 100_000, 400, "bad_request"),
    ("a JSON array", [], 422, "invalid_request"),
    ("no type", {"input": {}}, 422, "invalid_request"),
    ("unknown field", {"type": "work", "colour": "red"}, 422, "invalid_request"),
    ("type not a string", {"type": 5}, 422, "invalid_request"),
    ("type with spaces", {"type": "a b"}, 422, "invalid_request"),
    ("unknown type", {"type": "nope"}, 422, "unknown_type"),
    ("input not an object", {"type": "work", "input": [1]}, 422, "invalid_request"),
    ("input too deep", {"type": "work", "input": {"a": DEEP}}, 422, "invalid_request"),
    ("id with a slash", {"type": "work", "id": "a/b"}, 422, "invalid_request"),
    ("id too long", {"type": "work", "id": "x" * 65}, 422, "invalid_request"),
    ("empty id", {"type": "work", "id": ""}, 422, "invalid_request"),
    ("priority as a string", {"type": "work", "priority": "5"}, 422, "invalid_request"),
    ("priority as a bool", {"type": "work", "priority": True}, 422, "invalid_request"),
    ("priority out of range", {"type": "work", "priority": 10**9}, 422, "invalid_request"),
    ("negative timeout", {"type": "work", "timeout_s": -1}, 422, "invalid_request"),
    ("zero attempts", {"type": "work", "max_attempts": 0}, 422, "invalid_request"),
    ("expiry too far", {"type": "work", "expires_in_s": 10**9}, 422, "invalid_request"),
    ("empty owner", {"type": "work", "owner": ""}, 422, "invalid_request"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "body", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_submissions_get_a_clear_4xx_and_change_nothing(
    admin: httpx.AsyncClient, runtime: Runtime, what: str, body: Any, status: int, code: str
) -> None:
    if isinstance(body, bytes):
        r = await admin.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    else:
        r = await admin.post("/v1/tasks", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert await log_size(runtime) == 0


BAD_QUERIES = [
    ("/v1/tasks?status=done", 422, "invalid_request"),
    ("/v1/tasks?limit=0", 422, "invalid_request"),
    ("/v1/tasks?limit=100000", 422, "invalid_request"),
    ("/v1/tasks?limit=many", 422, "invalid_request"),
    ("/v1/tasks?cursor=garbage", 400, "invalid_cursor"),
    ("/v1/tasks?type=a%20b", 422, "invalid_request"),
    ("/v1/tasks/a%20b", 422, "invalid_request"),
    ("/v1/tasks/" + "x" * 65, 422, "invalid_request"),
    ("/v1/tasks/missing", 404, "not_found"),
    ("/v1/tasks/missing/events?after=-1", 422, "invalid_request"),
    ("/v1/nothing-here", 404, "not_found"),
]


@pytest.mark.parametrize(("path", "status", "code"), BAD_QUERIES)
async def test_bad_queries_get_a_clear_4xx(
    admin: httpx.AsyncClient, path: str, status: int, code: str
) -> None:
    r = await admin.get(path)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_bodies_over_the_limit_are_refused(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app, workers=False, max_body_bytes=4096)
    async with http(runtime) as admin:
        big = {"type": "work", "input": {"blob": "x" * 5000}}
        r = await admin.post("/v1/tasks", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        async def chunks() -> Any:  # no Content-Length: counted while reading
            yield b'{"type": "work", "input": {"blob": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}}'

        r = await admin.post("/v1/tasks", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
    assert await log_size(runtime) == 0


async def test_max_pending_per_owner_answers_429_with_retry_after(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app, workers=False, max_pending_per_owner=2)
    async with http(runtime) as admin:
        for _ in range(2):
            assert (await admin.post("/v1/tasks", json={"type": "work", "owner": "alice"})).status_code == 202
        r = await admin.post("/v1/tasks", json={"type": "work", "owner": "alice"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "too_many_pending"
        assert (await admin.post("/v1/tasks", json={"type": "work", "owner": "bob"})).status_code == 202


async def test_stats_health_and_openapi(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app)
    async with http(runtime) as admin:
        ids = [(await admin.post("/v1/tasks", json={"type": "work"})).json()["id"] for _ in range(3)]
        for task_id in ids:
            await wait_task(runtime, task_id)
        stats = (await admin.get("/v1/stats")).json()
        assert stats["by_status"]["completed"] == 3
        assert stats["by_type"] == {"work": {"completed": 3}}
        assert stats["queue_wait_s"]["n"] == 3 and stats["run_time_s"]["p95"] is not None
        ready = await admin.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        spec = (await admin.get("/openapi.json")).json()
        assert {"/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/cancel", "/v1/stats"} <= set(
            spec["paths"]
        )


async def test_readyz_reports_a_closed_store(runtime: Runtime) -> None:
    async with http(runtime) as admin, http(runtime, None) as probe:
        await runtime.store.close()
        r = await admin.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and r.json()["problems"]
        r = await probe.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False}
        assert (await admin.get("/v1/tasks/x")).status_code == 503
        await runtime.store.open()


async def test_readyz_answers_a_probe_without_a_token_and_tells_it_nothing_more(runtime: Runtime) -> None:
    owner = runtime.service.mint_token(TokenRequest(owner="alice"), SYSTEM)["token"]
    for token in (None, "not-a-token", owner):
        async with http(runtime, token) as client:
            r = await client.get("/readyz")
            assert r.status_code == 200 and r.json() == {"ready": True}, token
    async with http(runtime) as admin:
        details = (await admin.get("/readyz")).json()
    assert details["ready"] is True and details["problems"] == [] and details["loops"]


async def test_the_api_document_is_served_from_errands_own_files(runtime: Runtime) -> None:
    async with http(runtime, None) as client:
        page = await client.get("/docs")
        assert page.status_code == 200 and "https://" not in page.text and "http://" not in page.text
        for name, kind in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
            asset = await client.get(f"/docs/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert len(asset.content) > 10_000
        for wrong in ("swagger-editor.js", "index.css", "LICENSE"):
            assert (await client.get(f"/docs/{wrong}")).status_code == 404
        assert (await client.get("/docs/..%2F..%2Fconfig.py")).status_code in (401, 404)
        spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_a_batch_answers_each_item_in_one_transaction(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app, workers=False, max_pending_per_owner=995)
    async with http(runtime) as admin:
        first = await admin.post("/v1/tasks", json={"type": "hold", "id": "taken", "input": {"a": 1}})
        assert first.status_code == 202
        before = await log_size(runtime)
        items: list[Any] = [{"type": "hold", "id": f"b{i}", "owner": "carol"} for i in range(990)]
        items += [
            {"type": "hold", "id": "b7", "owner": "carol"},  # the same request twice in the batch
            {"type": "hold", "id": "b8", "owner": "dave"},  # the id again, another request
            {"type": "hold", "id": "taken", "input": {"a": 1}},  # accepted before: answered as such
            {"type": "hold", "id": "taken", "input": {"a": 2}},  # taken by another request
            {"type": "nope"},  # an unknown type
            {"type": "hold", "priority": "high"},  # not a valid body
            "not an object",
        ]
        r = await admin.post("/v1/tasks/batch", json={"tasks": items})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(items)
        assert [x["status"] for x in results[:990]] == [202] * 990
        assert [x["status"] for x in results[990:]] == [200, 409, 200, 409, 422, 422, 422]
        assert results[992]["task"]["id"] == "taken" and results[990]["task"]["id"] == "b7"
        assert all(x["error"]["code"] for x in results[991:] if x["status"] >= 400)
        assert await log_size(runtime) == before + 990  # one created event per new task
        # The same batch again: nothing new, every item answered as before.
        again = (await admin.post("/v1/tasks/batch", json={"tasks": items})).json()["results"]
        assert [x["status"] for x in again] == [200] * 991 + [409, 200, 409, 422, 422, 422]
        assert await log_size(runtime) == before + 990
        # The owner's limit (995 pending): of 10 more for carol, 5 fit; a repeat takes no room.
        more = [{"type": "hold", "id": f"m{i}", "owner": "carol"} for i in range(10)] + [items[0]]
        limited = (await admin.post("/v1/tasks/batch", json={"tasks": more})).json()["results"]
        assert [x["status"] for x in limited] == [202] * 5 + [429] * 5 + [200]
        assert limited[-2]["error"]["code"] == "too_many_pending"
        # The size limit, and bodies that are not a batch.
        for body, status in (
            ({"tasks": [{"type": "hold"}] * 1001}, 422),
            ({"tasks": []}, 422),
            ({"tasks": {"type": "hold"}}, 422),
            ({"items": []}, 422),
        ):
            r = await admin.post("/v1/tasks/batch", json=body)
            assert r.status_code == status, (body, r.text)
        assert await log_size(runtime) == before + 995
        # The route's name is no task's id: GET /v1/tasks/batch is not a task.
        reserved = await admin.post("/v1/tasks", json={"type": "hold", "id": "batch"})
        assert reserved.status_code == 422 and "reserved" in reserved.json()["error"]["message"]
        r = await admin.get("/v1/tasks/batch")
        assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_submit_many_in_the_python_api_and_the_sdk(live: LiveFactory) -> None:
    from errands import AsyncClient, IdConflict, InvalidRequest

    _, url = await live(app, workers=False)
    answers = await app.submit_many(
        [{"type": "hold", "id": "p1"}, {"type": "hold", "id": "p1", "priority": 3}]
    )
    assert isinstance(answers[0], Task) and answers[0].id == "p1"
    assert isinstance(answers[1], IdConflict)
    with pytest.raises(InvalidRequest):
        await app.submit_many([])
    async with AsyncClient(url, ADMIN_KEY) as client:
        got = await client.submit_many(
            [{"type": "hold", "id": "s1"}, {"type": "nope"}, {"type": "hold", "id": "p1"}]
        )
        assert isinstance(got[0], Task) and got[0].id == "s1" and got[0].status is Status.PENDING
        assert got[1].code == "unknown_type" and got[1].status_code == 422  # type: ignore[union-attr]
        assert isinstance(got[2], Task) and got[2].id == "p1"


async def test_the_document_describes_the_websocket_and_the_streams(runtime: Runtime) -> None:
    async with http(runtime, None) as client:
        spec = (await client.get("/openapi.json")).json()
    socket = spec["x-websockets"]["/v1/ws"]
    assert '"op": "subscribe"' in socket["description"] and socket["security"] == [{"bearer": []}]
    watch = next(t for t in spec["tags"] if t["name"] == "watch")
    assert "/v1/ws" in watch["description"]
    assert "text/event-stream" in spec["paths"]["/v1/watch"]["get"]["responses"]["200"]["content"]


async def test_the_access_log_writes_paths_and_never_a_capability_url(
    runtime_factory: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = await runtime_factory(app, workers=False, access_log=True)
    caplog.set_level(logging.INFO, logger="errands.access")
    async with http(runtime) as admin:
        await admin.get("/v1/tasks", params={"access_token": "eto_secret.in.query"})
        await admin.post("/v1/hooks/callback/t1.1.c2VjcmV0LW1hYw", json={"status": "succeeded"})
    lines = [r.getMessage() for r in caplog.records if r.name == "errands.access"]
    assert any(line.startswith("GET /v1/tasks 200 ") for line in lines), lines
    assert any(line.startswith("POST /v1/hooks/callback/[redacted] 401 ") for line in lines), lines
    assert not any("c2VjcmV0" in line or "eto_secret" in line for line in lines)
