"""Bad input, class by class, on every route and both stores.

Each case answers its documented 4xx with an error body, changes nothing (every table that holds
tasks, events, endpoints and messages reads the same before and after), writes no traceback or
error to the log, and never answers 5xx. The classes: integers beyond 64 bits or out of range,
NUL characters in text errands stores, JSON that cannot be kept faithfully (NaN, Infinity, huge
integers), addresses inside the network in every notation, and existence oracles. Besides the
table, every integer and string parameter of every operation in the OpenAPI document is walked
with the same values, so a route added later is covered without a new line here.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errands import Errands, TaskContext, model, signing
from errands.inputs import MAX_INT64
from errands.providers.standard import StandardProvider
from errands.runtime import Runtime
from tests.integration.conftest import RuntimeFactory, database_state, http

WEBHOOK_SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"  # 24 bytes of base64
HUGE = 2**63  # one past the largest 64-bit integer
HUGE_TEXT = "1" + "0" * 400  # too long for any integer type, not for Python's int()

app = Errands()


@app.task("work")
async def work(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


provider = StandardProvider(
    "dev",
    submit_url="http://127.0.0.1:9/jobs",  # never called: the test hands the task off itself
    status_url="http://127.0.0.1:9/jobs/{id}",
    secret=WEBHOOK_SECRET,
)
app.external("ext", provider=provider, poll_after_s=3600)


@dataclass
class World:
    runtime: Runtime
    admin: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    endpoint_id: str
    message_id: str = "msg_00000000000000000000000000"
    ext_token: str = ""  # the capability token of the handed-off task's current attempt
    ext_record: Any = None
    owner_token: str = ""
    notes: list[str] = field(default_factory=list)

    async def state(self) -> dict[str, list[tuple[Any, ...]]]:
        return await database_state(self.runtime.settings.db)


@pytest.fixture
async def world(runtime_factory: RuntimeFactory) -> AsyncIterator[World]:
    runtime = await runtime_factory(app, workers=False)
    async with http(runtime) as admin, http(runtime, None) as anonymous:
        assert (
            await admin.post("/v1/tasks", json={"type": "work", "id": "t1", "owner": "alice"})
        ).status_code == 202
        s1 = {"name": "s1", "type": "work", "cron": "0 9 * * *"}
        assert (await admin.post("/v1/schedules", json=s1)).status_code == 201
        r = await admin.post("/v1/endpoints", json={"url": "https://93.184.215.14/hook"})
        assert r.status_code == 201, r.text
        await runtime.app.submit("ext", {"x": 1}, id="ext-1", owner="alice")
        now = runtime.clock.now()
        await runtime.store.apply(
            "ext-1",
            lambda r: model.start_attempt(
                r, now=now, worker_id="w", lease_token="lease", lease_s=60, callback_nonce="nonce"
            ),
        )
        record = await runtime.store.apply(
            "ext-1",
            lambda r: model.hand_off(
                r, now=now, lease_token="lease", external_id="job_1", poll_at=now + 3600
            ),
        )
        assert runtime.capabilities is not None
        token = runtime.capabilities.token("ext-1", record.attempt, "nonce")
        owner = (await admin.post("/v1/tokens", json={"owner": "alice"})).json()["token"]
        yield World(
            runtime, admin, anonymous, r.json()["id"], ext_token=token, ext_record=record, owner_token=owner
        )


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


@dataclass(frozen=True)
class Signed:
    """A webhook body, signed with the provider's secret when it is sent (not when the table is
    built: the signature's timestamp must be fresh)."""

    content: bytes

    def send(self) -> dict[str, Any]:
        stamp, message_id = int(time.time()), f"msg_{time.time_ns()}"
        headers = signing.sign([signing.secret_key(WEBHOOK_SECRET)], message_id, stamp, self.content)
        return {"content": self.content, "headers": {**headers, "content-type": "application/json"}}


def signed(body: Any = None, *, raw: bytes | None = None) -> Signed:
    import json

    return Signed(raw if raw is not None else json.dumps(body).encode())


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


@dataclass(frozen=True)
class Case:
    what: str
    method: str
    path: str
    status: int
    code: str | None = None
    params: dict[str, Any] | None = None
    json: Any = None
    send: dict[str, Any] | Signed | None = None  # content and headers, for bodies JSON cannot encode
    anonymous: bool = False


CASES: list[Case] = [
    # -- integers beyond 64 bits or out of range ------------------------------------------------
    Case("events after 2^63", "GET", "/v1/tasks/t1/events", 422, "invalid_request", params={"after": HUGE}),
    Case("events after 400 digits", "GET", "/v1/tasks/t1/events", 422, params={"after": HUGE_TEXT}),
    Case("events after 1e400", "GET", "/v1/tasks/t1/events", 422, params={"after": "1e400"}),
    Case("events after NaN", "GET", "/v1/tasks/t1/events", 422, params={"after": "NaN"}),
    Case("events limit 2^63", "GET", "/v1/tasks/t1/events", 422, params={"limit": HUGE}),
    Case("list limit 2^64", "GET", "/v1/tasks", 422, params={"limit": 2**64}),
    Case("attempts before 2^63", "GET", "/v1/endpoints/{endpoint}/attempts", 422, params={"before": HUGE}),
    Case("deliveries limit huge", "GET", "/v1/webhook-deliveries", 422, params={"limit": HUGE_TEXT}),
    Case("priority 2^63", "POST", "/v1/tasks", 422, "invalid_request", json={"type": "work", "priority": HUGE}),
    Case("priority 1e400", "POST", "/v1/tasks", 422, send=raw_json('{"type": "work", "priority": 1e400}')),
    Case("max_attempts 2^64", "POST", "/v1/tasks", 422, json={"type": "work", "max_attempts": 2**64}),
    Case("timeout_s 1e400", "POST", "/v1/tasks", 422, send=raw_json('{"type": "work", "timeout_s": 1e400}')),
    Case("timeout_s NaN", "POST", "/v1/tasks", 422, send=raw_json('{"type": "work", "timeout_s": NaN}')),
    Case("input with an integer beyond 64 bits", "POST", "/v1/tasks", 422, "invalid_request",
         json={"type": "work", "input": {"n": 999999999999999999999999999999}}),
    Case("input with -2^63-1", "POST", "/v1/tasks", 422, json={"type": "work", "input": {"n": [-(2**63) - 1]}}),
    Case("input with NaN", "POST", "/v1/tasks", 422, send=raw_json('{"type": "work", "input": {"n": NaN}}')),
    Case("input with Infinity", "POST", "/v1/tasks", 422,
         send=raw_json('{"type": "work", "input": {"n": -Infinity}}')),
    Case("input with 1e400", "POST", "/v1/tasks", 422, send=raw_json('{"type": "work", "input": {"n": 1e400}}')),
    Case("ttl_s 10^30", "POST", "/v1/tokens", 422, json={"owner": "a", "ttl_s": 10**30}),
    Case("webhook-timestamp of 400 digits, no credentials", "POST", "/v1/hooks/dev", 401, "unauthorized",
         send={"content": b"{}", "headers": {"webhook-id": "m", "webhook-timestamp": "9" * 400,
                                              "webhook-signature": "v1,AAAA"}}, anonymous=True),
    Case("webhook-timestamp negative", "POST", "/v1/hooks/dev", 401, anonymous=True,
         send={"content": b"{}", "headers": {"webhook-id": "m", "webhook-timestamp": "-5",
                                              "webhook-signature": "v1,AAAA"}}),
    Case("webhook progress 1e400", "POST", "/v1/hooks/dev", 400, "bad_request", anonymous=True,
         send=signed(None, raw=b'{"id": "job_1", "status": "running", "progress": 1e400}')),
    Case("webhook output beyond 64 bits", "POST", "/v1/hooks/dev", 400, anonymous=True,
         send=signed({"id": "job_1", "status": "succeeded", "output": {"n": 2**64 + 1}})),
    Case("webhook output of 30 digits", "POST", "/v1/hooks/dev", 400, anonymous=True,
         send=signed(None, raw=b'{"id": "job_1", "status": "succeeded", "output": 999999999999999999999999999999}')),
    Case("callback attempt of 400 digits", "POST", "/v1/hooks/callback/ext-1.{huge}.mac", 401, "unauthorized",
         json={"status": "succeeded"}, anonymous=True),
    Case("content-length of 400 digits", "POST", "/v1/tasks", 400, "bad_request",
         send={"content": b"{}", "headers": {"content-length": "9" * 400, "content-type": "application/json"}}),
    Case("cursor with a time of 1e400", "GET", "/v1/tasks", 400, "invalid_cursor",
         params={"cursor": _cursor(b'[1e400, "a"]')}),
    Case("cursor with an integer of 400 digits", "GET", "/v1/tasks", 422, "invalid_request",
         params={"cursor": _cursor(b"[" + b"9" * 400 + b', "a"]')}),
    # -- when a task may run --------------------------------------------------------------------
    Case("run_at without an offset", "POST", "/v1/tasks", 422, "invalid_request",
         json={"type": "work", "run_at": "2030-01-01T09:00:00"}),
    Case("run_at not a time", "POST", "/v1/tasks", 422, json={"type": "work", "run_at": "tomorrow"}),
    Case("run_at month 13", "POST", "/v1/tasks", 422, json={"type": "work", "run_at": "2030-13-01T00:00:00Z"}),
    Case("run_at a number", "POST", "/v1/tasks", 422, json={"type": "work", "run_at": 1900000000}),
    Case("run_at of 400 digits", "POST", "/v1/tasks", 422, json={"type": "work", "run_at": HUGE_TEXT}),
    Case("run_at with NUL", "POST", "/v1/tasks", 422, json={"type": "work", "run_at": "2030-01-01T00:00:00Z\x00"}),
    Case("run_at past the last day allowed", "POST", "/v1/tasks", 422, "invalid_request",
         json={"type": "work", "run_at": "9999-12-31T23:59:00-14:00"}),
    Case("run_at and delay_s both", "POST", "/v1/tasks", 422, "invalid_request",
         json={"type": "work", "run_at": "2030-01-01T00:00:00Z", "delay_s": 5}),
    Case("delay_s negative", "POST", "/v1/tasks", 422, json={"type": "work", "delay_s": -1}),
    Case("delay_s 1e400", "POST", "/v1/tasks", 422, send=raw_json('{"type": "work", "delay_s": 1e400}')),
    Case("delay_s NaN", "POST", "/v1/tasks", 422, send=raw_json('{"type": "work", "delay_s": NaN}')),
    Case("delay_s beyond a year", "POST", "/v1/tasks", 422, json={"type": "work", "delay_s": 400 * 86400}),
    Case("delay_s as text", "POST", "/v1/tasks", 422, json={"type": "work", "delay_s": "5"}),
    Case("start_within_s zero", "POST", "/v1/tasks", 422, json={"type": "work", "start_within_s": 0}),
    Case("key empty", "POST", "/v1/tasks", 422, json={"type": "work", "key": ""}),
    Case("key too long", "POST", "/v1/tasks", 422, json={"type": "work", "key": "k" * 257}),
    Case("key a number", "POST", "/v1/tasks", 422, json={"type": "work", "key": 42}),
    Case("key with NUL", "POST", "/v1/tasks", 422, json={"type": "work", "key": "a\u0000b"}),
    Case("key a list", "POST", "/v1/tasks", 422, json={"type": "work", "key": ["a"]}),
    Case("debounce_s without a key", "POST", "/v1/tasks", 422, json={"type": "work", "debounce_s": 5}),
    Case("debounce_s and delay_s", "POST", "/v1/tasks", 422,
         json={"type": "work", "debounce_key": "k", "debounce_s": 5, "delay_s": 5}),
    Case("debounce_s zero", "POST", "/v1/tasks", 422, json={"type": "work", "debounce_key": "k", "debounce_s": 0}),
    Case("debounce_s beyond a day", "POST", "/v1/tasks", 422,
         json={"type": "work", "debounce_key": "k", "debounce_s": 86401}),
    Case("debounce_key empty", "POST", "/v1/tasks", 422, json={"type": "work", "debounce_key": ""}),
    Case("debounce_key with NUL", "POST", "/v1/tasks", 422, json={"type": "work", "debounce_key": "a\u0000"}),
    Case("start_within_s 2^64", "POST", "/v1/tasks", 422, json={"type": "work", "start_within_s": 2**64}),
    # -- selections: lists, counts, bulk actions ---------------------------------------------
    *[
        Case(f"{path} {name}={value!r}", "GET", path, 422, params={name: value})
        for path in ("/v1/tasks", "/v1/tasks/count")
        for name, value in (
            ("created_before", "0.5"),
            ("created_after", "1e9"),
            ("created_after", "2026-12-04T09:00:00"),  # no offset
            ("created_before", "soon"),
            ("id_prefix", "a b"),
            ("id_prefix", "x" * 65),
            ("status", "done"),
        )
    ],
    Case("count by owner", "GET", "/v1/tasks/count", 422, params={"by": "owner"}),
    Case("bulk without an action", "POST", "/v1/tasks/bulk", 422, json={"selection": {}}),
    Case("bulk delete", "POST", "/v1/tasks/bulk", 422, json={"action": "delete"}),
    Case("bulk limit 501", "POST", "/v1/tasks/bulk", 422, json={"action": "cancel", "limit": 501}),
    Case("bulk limit 0", "POST", "/v1/tasks/bulk", 422, json={"action": "cancel", "limit": 0}),
    Case("bulk created_before a number", "POST", "/v1/tasks/bulk", 422,
         json={"action": "retry", "selection": {"created_before": 0}}),
    Case("bulk bad cursor", "POST", "/v1/tasks/bulk", 400, json={"action": "retry", "cursor": "nope"}),
    Case("series of a week", "GET", "/v1/stats/series", 422, params={"window": "week"}),
    # -- schedules -----------------------------------------------------------------------------
    *[
        Case(f"schedule {what}", "POST", "/v1/schedules", status, code,
             json={"name": "s2", "type": "work", "cron": "0 9 * * *", **fields})
        for what, fields, status, code in (
            ("cron minute 61", {"cron": "61 * * * *"}, 422, "invalid_request"),
            ("cron of three fields", {"cron": "* * *"}, 422, "invalid_request"),
            ("cron on February 30th", {"cron": "0 0 30 2 *"}, 422, "invalid_request"),
            ("cron with NUL", {"cron": "0 9 * * *\x00"}, 422, "invalid_request"),
            ("tz unknown", {"tz": "Mars/Olympus"}, 422, "invalid_request"),
            ("tz a path", {"tz": "../../../etc/passwd"}, 422, "invalid_request"),
            ("tz with NUL", {"tz": "Asia/Shanghai\x00"}, 422, "invalid_request"),
            ("type unknown", {"type": "nope"}, 422, None),
            ("name with a space", {"name": "a b"}, 422, "invalid_request"),
            ("name of 41 characters", {"name": "n" * 41}, 422, "invalid_request"),
            ("name missing", {"name": None}, 422, "invalid_request"),
            ("missed unknown", {"missed": "sometimes"}, 422, "invalid_request"),
            ("grace_s 0", {"grace_s": 0}, 422, "invalid_request"),
            ("priority 2^63", {"priority": 2**63}, 422, "invalid_request"),
            ("input beyond 64 bits", {"input": {"n": 2**64}}, 422, "invalid_request"),
            ("an unknown field", {"every": "day"}, 422, "invalid_request"),
            ("s1 with another definition", {"name": "s1", "cron": "0 10 * * *"}, 409, "schedule_exists"),
        )
    ],
    Case("schedule next=1000", "GET", "/v1/schedules/s1", 422, params={"next": 1000}),
    Case("schedule next=-1", "GET", "/v1/schedules/s1", 422, params={"next": -1}),
    Case("schedule next 2^64", "GET", "/v1/schedules/s1", 422, params={"next": 2**64}),
    Case("schedule put naming another", "PUT", "/v1/schedules/s1", 422, "invalid_request",
         json={"name": "s3", "type": "work", "cron": "0 9 * * *"}),
    Case("schedule put bad cron", "PUT", "/v1/schedules/s1", 422, json={"type": "work", "cron": "0 9 * *"}),
    Case("pause an unknown schedule", "POST", "/v1/schedules/nope/pause", 404, "not_found"),
    Case("delete an unknown schedule", "DELETE", "/v1/schedules/nope", 404, "not_found"),
    # -- NUL characters in text errands stores as text -----------------------------------------
    Case("owner with NUL", "POST", "/v1/tasks", 422, "invalid_request", json={"type": "work", "owner": "a\x00b"}),
    Case("list ?owner= with NUL", "GET", "/v1/tasks", 422, params={"owner": "a\x00b"}),
    Case("token owner with NUL", "POST", "/v1/tokens", 422, json={"owner": "a\x00"}),
    Case("notify_url with NUL", "POST", "/v1/tasks", 422, json={"type": "work", "notify_url": "https://e.x/\x00"}),
    Case("endpoint description with NUL", "POST", "/v1/endpoints", 422,
         json={"url": "https://93.184.215.14/h", "description": "a\x00"}),
    Case("endpoint owners with NUL", "POST", "/v1/endpoints", 422,
         json={"url": "https://93.184.215.14/h", "owners": ["a\x00"]}),
    Case("endpoint patch description with NUL", "PATCH", "/v1/endpoints/{endpoint}", 422,
         json={"description": "\x00"}),
    Case("capability path with NUL, no credentials", "POST", "/v1/hooks/callback/ext%00-1.1.mac", 401,
         "unauthorized", json={"status": "succeeded"}, anonymous=True),
    Case("provider path with NUL", "POST", "/v1/hooks/d%00ev", 404, "not_found", json={}, anonymous=True),
    Case("webhook message with NUL", "POST", "/v1/hooks/dev", 400, "bad_request", anonymous=True,
         send=signed({"id": "job_1", "status": "running", "message": "half\x00way"})),
    Case("webhook error with NUL", "POST", "/v1/hooks/dev", 400, anonymous=True,
         send=signed({"id": "job_1", "status": "failed", "error": {"code": "x\x00", "message": "m"}})),
    Case("webhook job id with NUL", "POST", "/v1/hooks/dev", 400, anonymous=True,
         send=signed({"id": "job\x00_1", "status": "succeeded"})),
    Case("callback report message with NUL", "POST", "/v1/hooks/callback/{ext_token}", 400, anonymous=True,
         json={"status": "running", "message": "\x00"}),
    Case("cursor with NUL in its id", "GET", "/v1/tasks", 400, "invalid_cursor",
         params={"cursor": _cursor(b'[1, "a\\u0000b"]')}),
    Case("messages ?task_id= with NUL", "GET", "/v1/messages", 422, params={"task_id": "t\x00"}),
    Case("deliveries ?task_id= with NUL", "GET", "/v1/webhook-deliveries", 422, params={"task_id": "t\x00"}),
    # -- addresses inside the network, in every notation, at submit and at registration --------
    *[
        Case(f"notify_url {host}", "POST", "/v1/tasks", 422, "invalid_request",
             json={"type": "work", "notify_url": f"http://{host}/hook"})
        for host in ("localhost", "127.1", "2130706433", "0x7f.1", "[64:ff9b::a9fe:a9fe]", "[2002:7f00:1::]",
                     "[::127.0.0.1]", "[::ffff:0:7f00:1]", "[::ffff:169.254.169.254]", "10.0.0.1")
    ],
    *[
        Case(f"endpoint url {host}", "POST", "/v1/endpoints", 422, "invalid_request",
             json={"url": f"http://{host}/hook"})
        for host in ("localhost", "127.1", "2130706433", "[64:ff9b::a9fe:a9fe]", "[2002:7f00:1::]",
                     "[::127.0.0.1]")
    ],
]  # fmt: skip


def _fill(path: str, w: World) -> str:
    return (
        path.replace("{endpoint}", w.endpoint_id)
        .replace("{ext_token}", w.ext_token)
        .replace("{huge}", HUGE_TEXT)
    )


async def _send(w: World, case: Case) -> httpx.Response:
    client = w.anonymous if case.anonymous else w.admin
    if isinstance(case.send, Signed):
        extra = case.send.send()
    else:
        extra = case.send or ({"json": case.json} if case.json is not None else {})
    return await client.request(case.method, _fill(case.path, w), params=case.params, **extra)


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
async def test_each_bad_input_gets_its_4xx_and_changes_nothing(
    world: World, case: Case, no_errors_logged: None
) -> None:
    before = await world.state()
    r = await _send(world, case)
    assert r.status_code == case.status, r.text
    error = r.json()["error"]
    assert error["message"] and (case.code is None or error["code"] == case.code)
    assert await world.state() == before


async def test_a_bad_capability_url_says_the_same_whether_its_task_exists_or_not(
    world: World, no_errors_logged: None
) -> None:
    """No credentials are needed to call a capability URL, so its answers must not tell which
    task ids are taken (client-chosen ids could otherwise be enumerated)."""
    attempt, mac = world.ext_token.split(".")[1:]
    answers = set()
    for token in (
        f"ext-1.{attempt}.x",  # an existing task, a wrong MAC
        f"nobody.{attempt}.x",  # no such task
        f"ext-1.{int(attempt) + 1}.{mac}",  # an existing task, another attempt
        f"t1.{attempt}.{mac}",  # an existing task of another kind
        "nobody.1.x",
        "garbage",
    ):
        r = await world.anonymous.post(f"/v1/hooks/callback/{token}", json={"status": "succeeded"})
        answers.add((r.status_code, r.text, r.headers.get("content-type")))
    assert len(answers) == 1 and next(iter(answers))[0] == 401
    assert (await world.runtime.store.get("ext-1")).status.value == "processing"


# -- the OpenAPI walk: every integer and string parameter of every operation --------------------

INTEGER_VALUES = [HUGE, -(2**63) - 1, HUGE_TEXT, "1e400", "NaN", "-Infinity", "1.5"]
STRING_VALUES = ["a\x00b"]


def _walk_cases(schema: dict[str, Any], w: World) -> list[tuple[str, str, dict[str, Any], str]]:
    cases = []
    for template, operations in schema["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "access_token":
                    continue  # a credential, read before any route (tests/integration/test_api.py)
                kind = _kind(parameter.get("schema", {}))
                values = INTEGER_VALUES if kind == "integer" else STRING_VALUES if kind == "string" else []
                for value in values:
                    cases.append((method.upper(), template, parameter, value))
    return cases


def _kind(schema: dict[str, Any]) -> str | None:
    if "type" in schema:
        return str(schema["type"])
    for option in schema.get("anyOf", []):
        if option.get("type") not in (None, "null"):
            return str(option["type"])
    return None


def _path_for(template: str, w: World, override: tuple[str, Any] | None) -> str:
    defaults = {"task_id": "t1", "endpoint_id": w.endpoint_id, "message_id": w.message_id,
                "token": w.ext_token, "provider": "dev"}  # fmt: skip
    path = template
    for name, default in defaults.items():
        value = override[1] if override is not None and override[0] == name else default
        path = path.replace("{" + name + "}", quote(str(value), safe=""))
    return path


async def test_every_parameter_of_every_operation_refuses_bad_integers_and_nul(
    world: World, no_errors_logged: None
) -> None:
    schema = (await world.anonymous.get("/openapi.json")).json()
    cases = _walk_cases(schema, world)
    assert len(cases) > 40  # the walk reaches the document's parameters
    before = await world.state()
    for method, template, parameter, value in cases:
        where, name = parameter["in"], parameter["name"]
        params, headers = {}, {}
        override = None
        if where == "query":
            params[name] = value
        elif where == "header":
            headers[name] = str(value).replace("\x00", "%00")  # HTTP headers cannot carry NUL
        elif where == "path":
            override = (name, value)
        body = {"json": {}} if method in ("POST", "PATCH") else {}
        path = _path_for(template, world, override)
        # A stream (the watch routes) would stay open if the value were wrongly accepted.
        async with world.admin.stream(method, path, params=params, headers=headers, **body) as r:
            text = (await r.aread()).decode() if r.status_code != 200 else ""
        assert 400 <= r.status_code < 500, (method, template, name, value, r.status_code, text)
        assert "error" in orjson.loads(text), (method, template, name)
    assert await world.state() == before


# -- JSON input: kept faithfully or refused, never altered ---------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def _faithful(value: Any) -> bool:
    """Whether errands promises to keep ``value`` as it is (see :mod:`errands.inputs`)."""
    if isinstance(value, dict):
        return all(_faithful(v) for v in value.values())
    if isinstance(value, list):
        return all(_faithful(v) for v in value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, int):
        return -(2**63) <= value <= MAX_INT64
    return math.isfinite(value)


def _encode(value: Any) -> bytes:
    """JSON text for any value, NaN and Infinity written as JavaScript does (as clients send them)."""
    import json

    return json.dumps(value, allow_nan=True).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
async def test_task_input_is_stored_faithfully_or_refused_with_422(world: World, value: Any) -> None:
    body = b'{"type": "work", "input": {"v": %s}}' % _encode(value)
    r = await world.admin.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    if _faithful(value):
        assert r.status_code == 202, r.text
        stored = (await world.admin.get(f"/v1/tasks/{r.json()['id']}")).json()["input"]["v"]
        assert stored == value and _encode(stored) == _encode(value)
    else:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_request"
