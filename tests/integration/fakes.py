"""Local fakes of real providers, speaking their documented wire formats (see each docstring)."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from errands import signing


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class FakeReplicate:
    """Replicate's predictions API: POST /v1/predictions, GET /v1/predictions/{id},
    POST /v1/predictions/{id}/cancel; webhooks are prediction objects signed the Standard
    Webhooks way, sent for the events in ``webhook_events_filter``."""

    def __init__(self, token: str, secret: str, *, send_webhooks: bool = True, steps: int = 2) -> None:
        self.token = token
        self._key = signing.secret_key(secret)
        self.send_webhooks = send_webhooks
        self.steps = steps
        self.predictions: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/predictions", self._create, methods=["POST"]),
                Route("/v1/predictions/{pid}", self._get, methods=["GET"]),
                Route("/v1/predictions/{pid}/cancel", self._cancel, methods=["POST"]),
            ]
        )

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    async def _create(self, request: Request) -> Response:
        if not self._authorised(request):
            return _json({"detail": "Unauthenticated"}, 401)
        body = orjson.loads(await request.body())
        self.requests.append(body)
        pid = secrets.token_hex(10)
        prediction = {"id": pid, "version": body.get("version"), "status": "starting", "input": body["input"],
                      "output": None, "error": None, "logs": None, "metrics": {}}  # fmt: skip
        self.predictions[pid] = prediction
        task = asyncio.create_task(
            self._run(prediction, body.get("webhook"), body.get("webhook_events_filter") or [])
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _json(prediction, 201)

    async def _get(self, request: Request) -> Response:
        prediction = self.predictions.get(request.path_params["pid"])
        return _json(prediction) if prediction else _json({"detail": "Not found"}, 404)

    async def _cancel(self, request: Request) -> Response:
        prediction = self.predictions.get(request.path_params["pid"])
        if prediction is None:
            return _json({"detail": "Not found"}, 404)
        if prediction["status"] in ("starting", "processing"):
            prediction["status"] = "canceled"
        return _json(prediction)

    async def _run(self, prediction: dict[str, Any], webhook: str | None, events: list[str]) -> None:
        await self._send(webhook, prediction, "start" in events)
        prediction["status"] = "processing"
        for step in range(1, self.steps + 1):
            await asyncio.sleep(0.05)
            if prediction["status"] != "processing":
                return
            prediction["logs"] = f"step {step}\n{step * 100 // (self.steps + 1)}%|###"
            await self._send(webhook, prediction, "logs" in events)
            tokens = prediction["input"].get("tokens")
            if tokens:  # a language model: the output so far, with every "output" webhook
                prediction["output"] = tokens[: len(tokens) * step // (self.steps + 1)]
                await self._send(webhook, prediction, "output" in events)
        await asyncio.sleep(0.05)
        if prediction["status"] != "processing":
            return
        if prediction["input"].get("fail"):
            prediction.update(status="failed", error="the model failed")
        else:
            tokens = prediction["input"].get("tokens")
            output = tokens or [f"https://replicate.delivery/{prediction['id']}.png"]
            prediction.update(status="succeeded", output=output)
        await self._send(webhook, prediction, True)

    async def _send(self, url: str | None, prediction: dict[str, Any], wanted: bool) -> None:
        if not (url and wanted and self.send_webhooks):
            return
        body = orjson.dumps(prediction)
        headers = signing.sign([self._key], "msg_" + secrets.token_hex(6), int(time.time()), body)
        async with httpx.AsyncClient() as client:
            await client.post(url, content=body, headers={**headers, "content-type": "application/json"})


class FakeCoze:
    """Coze's async workflow run: POST /v1/workflow/run with is_async → execute_id; status from
    GET /v1/workflows/{workflow_id}/run_histories/{execute_id} (``{code, msg, data: [run]}``).
    No webhook: a workflow may end with an HTTP node posting to a callback URL parameter."""

    def __init__(self, token: str, workflow_id: str, *, call_back: bool = False, run_s: float = 0.2) -> None:
        self.token = token
        self.workflow_id = workflow_id
        self.call_back = call_back
        self.run_s = run_s
        self.runs: dict[str, dict[str, Any]] = {}
        self.request_times: list[float] = []
        self.requests: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/workflow/run", self._run, methods=["POST"]),
                Route("/v1/workflows/{wid}/run_histories/{eid}", self._history, methods=["GET"]),
            ]
        )

    async def _run(self, request: Request) -> Response:
        self.request_times.append(time.monotonic())
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return _json({"code": 4100, "msg": "authentication is invalid"})
        body = orjson.loads(await request.body())
        self.requests.append(body)
        if body.get("workflow_id") != self.workflow_id or body.get("is_async") is not True:
            return _json({"code": 4000, "msg": "bad request"})
        eid = str(secrets.randbelow(10**18))
        now = int(time.time())
        run = {
            "execute_id": eid,
            "execute_status": "Running",
            "output": "",
            "error_code": 0,
            "error_message": "",
            "run_mode": 2,
            "logid": "x",
            "create_time": now,
            "update_time": now,
        }
        self.runs[eid] = run
        task = asyncio.create_task(self._finish(run, body.get("parameters") or {}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _json(
            {"code": 0, "msg": "", "execute_id": eid, "debug_url": "https://www.coze.com/work_flow?x"}
        )

    async def _finish(self, run: dict[str, Any], parameters: dict[str, Any]) -> None:
        await asyncio.sleep(self.run_s)
        if parameters.get("fail"):
            run.update(execute_status="Fail", error_code=720701013, error_message="plugin timed out")
        else:
            run.update(
                execute_status="Success", output=orjson.dumps({"Output": parameters.get("text", "")}).decode()
            )
        callback = parameters.get("callback_url")
        if self.call_back and callback and run["execute_status"] == "Success":
            async with httpx.AsyncClient() as client:
                await client.post(callback, json={"status": "succeeded", "output": {"from": "http node"}})

    async def _history(self, request: Request) -> Response:
        self.request_times.append(time.monotonic())
        run = self.runs.get(request.path_params["eid"])
        if run is None or request.path_params["wid"] != self.workflow_id:
            return _json({"code": 4200, "msg": "not found"})
        return _json({"code": 0, "msg": "", "data": [run]})


class Receiver:
    """A webhook receiver on a real local server: records every request and answers with the
    scripted ``(status, headers)`` in order, then ``200``; ``hold`` keeps requests waiting."""

    def __init__(self) -> None:
        self.url = ""  # set by whoever serves it
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.hold: asyncio.Event | None = None
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append((request.url.path, dict(request.headers), body))
        if self.hold is not None:
            await self.hold.wait()
        if self.script:
            status, headers = self.script.pop(0)
            return Response(b"not now", status_code=status, headers=headers)
        return Response(b"ok thanks", status_code=200)

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        return [orjson.loads(b) for p, _, b in self.requests if path is None or p == path]

    def ids(self) -> list[str]:
        return [h["webhook-id"] for _, h, _ in self.requests]


#: WeChat's documented limits, as the fake enforces them (errcode 47003 when broken).
_WECHAT_CHECKS = {
    "thing": lambda v: len(v) <= 20,
    "phrase": lambda v: len(v) <= 5 and all("\u4e00" <= c <= "\u9fff" for c in v),
    "name": lambda v: len(v) <= 10,
    "character_string": lambda v: len(v) <= 32 and v.isascii(),
    "number": lambda v: len(v) <= 32 and v.replace(".", "", 1).isdigit(),
    "time": lambda v: bool(re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", v)),
}


class FakeWeChat:
    """WeChat's server API for subscribe messages: ``POST /cgi-bin/stable_token`` and
    ``POST /cgi-bin/message/subscribe/send?access_token=…``, with its error codes: 40013 (bad
    appid or secret), 40001 (the token is not valid), 47003 (data breaks a field's limits),
    43101 (the user has no subscription left), -1 (system busy)."""

    def __init__(self, appid: str, secret: str, templates: set[str]) -> None:
        self.appid = appid
        self.secret = secret
        self.templates = templates
        self.refused: set[str] = set()  # openids with no subscription left
        self.busy = 0  # answer -1 to this many sends first
        self.token_fetches = 0
        self.sends: list[dict[str, Any]] = []  # every send request, accepted or not
        self.delivered: list[dict[str, Any]] = []
        self._token: str | None = None
        self.app = Starlette(
            routes=[
                Route("/cgi-bin/stable_token", self._stable_token, methods=["POST"]),
                Route("/cgi-bin/message/subscribe/send", self._send, methods=["POST"]),
            ]
        )

    def expire_token(self) -> None:
        """The current token stops working (it expired, or was force-refreshed elsewhere)."""
        self._token = None

    async def _stable_token(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.token_fetches += 1
        if body.get("appid") != self.appid or body.get("secret") != self.secret:
            return _json({"errcode": 40013, "errmsg": "invalid appid"})
        if self._token is None or body.get("force_refresh"):
            self._token = f"tok-{self.token_fetches}-{secrets.token_hex(4)}"
        return _json({"access_token": self._token, "expires_in": 7200})

    async def _send(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.sends.append(body)
        if self._token is None or request.query_params.get("access_token") != self._token:
            return _json({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"})
        if self.busy > 0:
            self.busy -= 1
            return _json({"errcode": -1, "errmsg": "system error"})
        if body.get("template_id") not in self.templates:
            return _json({"errcode": 40037, "errmsg": "invalid template_id"})
        for key, item in (body.get("data") or {}).items():
            kind = re.sub(r"\d+$", "", key)
            check = _WECHAT_CHECKS.get(kind)
            if check is not None and not check(str(item.get("value", ""))):
                return _json({"errcode": 47003, "errmsg": f"argument invalid! data.{key}.value invalid"})
        if body.get("touser") in self.refused:
            return _json({"errcode": 43101, "errmsg": "user refuse to accept the msg"})
        self.delivered.append(body)
        return _json({"errcode": 0, "errmsg": "ok", "msgid": len(self.delivered)})
