"""Health, readiness, stats and owner tokens."""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import Response

from errands.api.deps import PrincipalDep, RuntimeDep
from errands.api.tasks import ERRORS
from errands.service import TokenRequest

router = APIRouter()


class TokenOut(BaseModel):
    token: str
    owner: str
    scopes: list[str]
    task_id: str | None
    expires_at: str


class Summary(BaseModel):
    n: int
    p50: float | None
    p95: float | None


class StatsOut(BaseModel):
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    window_s: float
    queue_wait_s: Summary
    run_time_s: Summary


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


_CLIENT_JS = resources.files("errands").joinpath("static/errands.js").read_bytes()


@router.get("/client/errands.js", tags=["clients"], summary="The JavaScript client (an ES module)")
async def client_js() -> Response:
    """``watchTask`` / ``watchTasks`` for browsers and mini-programs; no token needed."""
    headers = {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"}
    return Response(_CLIENT_JS, media_type="text/javascript; charset=utf-8", headers=headers)


@router.get("/healthz", tags=["health"], summary="The process is up")
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get("/readyz", tags=["health"], summary="The store is reachable and every loop is alive")
async def readyz(runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    del principal  # any valid token may ask
    health = await runtime.health()
    return _json(health, 200 if health["ready"] else 503)


@router.get(
    "/v1/stats", tags=["admin"], response_model=StatsOut, responses=ERRORS, summary="Queue statistics"
)
async def stats(runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """Counts by status and type, and queue wait and run time p50/p95 over a recent window (admin)."""
    return _json(await runtime.service.stats(principal))


@router.post(
    "/v1/tokens",
    tags=["admin"],
    status_code=201,
    response_model=TokenOut,
    responses=ERRORS,
    summary="Mint an owner token",
)
async def mint_token(body: TokenRequest, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """A signed, expiring token that acts only for ``owner`` (and only ``task_id`` if set)."""
    return _json(runtime.service.mint_token(body, principal), 201)
