"""Local fakes of real providers, speaking their documented wire formats (see each docstring)."""

from __future__ import annotations

import asyncio
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
        await asyncio.sleep(0.05)
        if prediction["status"] != "processing":
            return
        if prediction["input"].get("fail"):
            prediction.update(status="failed", error="the model failed")
        else:
            prediction.update(
                status="succeeded", output=[f"https://replicate.delivery/{prediction['id']}.png"]
            )
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
