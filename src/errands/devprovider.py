"""``errands dev-provider``: a fake AI service for development, tests and benchmarks.

It speaks what :class:`errands.providers.standard.StandardProvider` expects:

* ``POST /jobs`` ``{"input", "callback_url", "metadata"?}`` → ``{"id", "status": "queued"}``;
  the job then runs for ``delay_s``, reporting progress and its end by signed webhook
  (Standard Webhooks) to ``callback_url``, retrying a delivery that is not answered ``2xx``;
* ``GET /jobs/{id}`` → ``{"id", "status", "progress", "message", "output", "error", "stream"?}``;
* with ``stream`` (chunks per step), the job streams text: each progress webhook carries the
  chunks made since the one before (``{"name": "text", "index", "chunks"}``), the final webhook
  and the status all of them, so errands keeps each chunk once whatever was lost;
* ``POST /jobs/{id}/cancel`` → the job ends ``canceled`` (and says so by webhook).

On request it misbehaves, by probability per webhook (``drop``, ``duplicate``, ``bad_signature``),
per job (``fail``, ``reorder``: a stale progress report sent after the final one) and with
``jitter_s`` of random delay per webhook. A job may override any of these with
``input["_dev"] = {"fail": true, "delay_s": 0.2, …}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from errands import signing
from errands.providers.standard import StandardProvider

log = logging.getLogger("errands.devprovider")

#: The development secret both sides use unless told otherwise. Not a secret: never use it in production.
DEV_SECRET = "whsec_" + base64.b64encode(b"errands development secret, public").decode()


@dataclass(frozen=True, slots=True)
class Chaos:
    delay_s: float = 1.0
    steps: int = 3
    jitter_s: float = 0.0
    drop: float = 0.0
    duplicate: float = 0.0
    bad_signature: float = 0.0
    reorder: float = 0.0
    fail: float = 0.0
    stream: int = 0  # text chunks made per step

    def override(self, values: Any) -> Chaos:
        if not isinstance(values, dict):
            return self
        known = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key in known and isinstance(value, int | float) and not isinstance(value, bool):
                changes[key] = int(value) if key in ("steps", "stream") else float(value)
            elif key in ("fail", "reorder", "drop", "duplicate", "bad_signature") and isinstance(value, bool):
                changes[key] = 1.0 if value else 0.0
        return replace(self, **changes)


@dataclass(eq=False)
class Job:
    id: str
    input: Any
    callback_url: str
    chaos: Chaos
    status: str = "queued"
    progress: int = 0
    message: str | None = None
    output: Any = None
    error: str | None = None
    sent: list[str] = field(default_factory=list)
    streamed: list[str] = field(default_factory=list)

    def report(self, stream_from: int = 0) -> dict[str, Any]:
        report = {
            "id": self.id,
            "status": self.status,
            "progress": self.progress,
            "message": self.message,
            "output": self.output,
            "error": self.error,
        }
        if self.streamed:
            report["stream"] = {"name": "text", "index": stream_from, "chunks": self.streamed[stream_from:]}
        return report


class DevProvider:
    """The fake service; ``app`` is its ASGI app."""

    def __init__(
        self, secret: str = DEV_SECRET, chaos: Chaos | None = None, *, seed: int | None = None
    ) -> None:
        self._key = signing.secret_key(secret)
        self._wrong_key = secrets.token_bytes(24)
        self.chaos = chaos or Chaos()
        self.jobs: dict[str, Job] = {}
        self._rng = random.Random(seed)  # noqa: S311 - chaos, not security
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self.webhooks_sent = 0
        #: The next this many job submissions are refused with HTTP 429 and ``Retry-After``.
        self.busy = 0
        self.busy_retry_after_s = 2
        self.refused = 0
        self.app = Starlette(
            routes=[
                Route("/jobs", self._create, methods=["POST"]),
                Route("/jobs/{job_id}", self._status, methods=["GET"]),
                Route("/jobs/{job_id}/cancel", self._cancel, methods=["POST"]),
                Route("/healthz", self._health, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.aclose()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- HTTP ---------------------------------------------------------------------------------

    @staticmethod
    def _json(data: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(data), status_code=status, media_type="application/json")

    async def _health(self, request: Request) -> Response:
        return self._json({"status": "ok", "jobs": len(self.jobs), "webhooks_sent": self.webhooks_sent})

    async def _create(self, request: Request) -> Response:
        if self.busy > 0:
            self.busy -= 1
            self.refused += 1
            retry_after = {"Retry-After": str(self.busy_retry_after_s)}
            return Response(
                b'{"error": "too many requests"}', 429, retry_after, media_type="application/json"
            )
        try:
            body = orjson.loads(await request.body())
            callback_url = str(body["callback_url"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return self._json({"error": "expected {input, callback_url}"}, 400)
        job_input = body.get("input")
        overrides = job_input.get("_dev") if isinstance(job_input, dict) else None
        job = Job("job_" + secrets.token_hex(8), job_input, callback_url, self.chaos.override(overrides))
        self.jobs[job.id] = job
        self._spawn(self._run(job))
        return self._json({"id": job.id, "status": job.status}, 201)

    async def _status(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        return self._json(job.report()) if job else self._json({"error": "no such job"}, 404)

    async def _cancel(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            return self._json({"error": "no such job"}, 404)
        if job.status in ("queued", "running"):
            job.status, job.error = "canceled", "canceled by request"
            self._spawn(self._deliver(job, job.report()))
        return self._json(job.report())

    # -- jobs ---------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job) -> None:
        chaos = job.chaos
        job.status = "running"
        stale: dict[str, Any] | None = None
        steps = max(1, chaos.steps)
        for step in range(1, steps + 1):
            await asyncio.sleep(chaos.delay_s / (steps + 1))
            if job.status != "running":
                return  # canceled meanwhile
            job.progress, job.message = step * 100 // (steps + 1), f"step {step} of {steps}"
            made = len(job.streamed)
            job.streamed.extend([f"chunk {made + i} " for i in range(chaos.stream)])
            report = job.report(stream_from=made)
            stale = report
            await self._deliver(job, report)
        await asyncio.sleep(chaos.delay_s / (steps + 1))
        if job.status != "running":
            return
        if self._rng.random() < chaos.fail:
            job.status, job.error = "failed", "the fake model gave up"
        else:
            job.status, job.progress = "succeeded", 100
            clean = (
                {k: v for k, v in job.input.items() if k != "_dev"}
                if isinstance(job.input, dict)
                else job.input
            )
            job.output = {"echo": clean, "job": job.id}
        await self._deliver(job, job.report())
        if stale is not None and self._rng.random() < chaos.reorder:
            await self._deliver(job, stale)  # arrives after the end: must change nothing

    async def _deliver(self, job: Job, report: dict[str, Any]) -> None:
        chaos = job.chaos
        if chaos.jitter_s:
            await asyncio.sleep(self._rng.random() * chaos.jitter_s)
        if self._rng.random() < chaos.drop:
            return
        times = 2 if self._rng.random() < chaos.duplicate else 1
        body = orjson.dumps(report)
        message_id = "msg_" + secrets.token_hex(8)
        key = self._wrong_key if self._rng.random() < chaos.bad_signature else self._key
        for _ in range(times):
            await self._post(job.callback_url, message_id, key, body)

    async def _post(self, url: str, message_id: str, key: bytes, body: bytes) -> None:
        """Deliver one message, retrying (with the same id) until it is answered 2xx."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10)
        delay = 0.05
        for _ in range(6):
            headers = signing.sign([key], message_id, int(time.time()), body)
            headers["content-type"] = "application/json"
            with contextlib.suppress(httpx.HTTPError):
                response = await self._client.post(url, content=body, headers=headers)
                self.webhooks_sent += 1
                if response.status_code < 300:
                    return
                if response.status_code in (400, 401, 403):
                    return  # a sender does not retry what the receiver refuses outright
            await asyncio.sleep(delay)
            delay *= 2


def dev_standard_provider(url: str, *, name: str = "dev", secret: str = DEV_SECRET) -> StandardProvider:
    """A :class:`StandardProvider` pointed at a dev provider running at ``url``."""
    base = url.rstrip("/")
    return StandardProvider(
        name,
        submit_url=f"{base}/jobs",
        status_url=f"{base}/jobs/{{id}}",
        cancel_url=f"{base}/jobs/{{id}}/cancel",
        secret=secret,
    )
