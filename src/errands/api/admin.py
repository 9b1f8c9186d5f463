"""Health, readiness, stats, owner tokens, the JavaScript client and the API's own document."""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import HTMLResponse, Response

from errands.api.routing import Call, Route
from errands.api.schemas import Health, Readiness, StatsOut, TokenOut
from errands.errors import Forbidden
from errands.service import TokenRequest


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


_CLIENT_JS = resources.files("errands").joinpath("static/errands.js").read_bytes()


async def client_js(call: Call) -> Response:
    """``watchTask`` / ``watchTasks`` for browsers and mini-programs (an ES module); no token needed."""
    del call
    headers = {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"}
    return Response(_CLIENT_JS, media_type="text/javascript; charset=utf-8", headers=headers)


async def healthz(call: Call) -> Response:
    """The process is up (no token needed)."""
    del call
    return _json({"status": "ok"})


async def readyz(call: Call) -> Response:
    """The store is reachable and every background loop is alive: ``200``, else ``503`` with the
    problems. Any valid token may ask."""
    assert call.principal  # the guard let only authenticated callers through
    health = await call.runtime.health()
    return _json(health, 200 if health["ready"] else 503)


async def stats(call: Call) -> Response:
    """Counts by status and type, and queue wait and run time p50/p95 over a recent window (admin)."""
    return _json(await call.runtime.service.stats(call.principal))


async def metrics(call: Call) -> Response:
    """This process's Prometheus metrics (admin; ``ERRANDS_METRICS_LISTEN`` serves them on a
    private port without a key)."""
    if not call.principal.admin:
        raise Forbidden("Only an admin may read the metrics.")
    return Response(await call.runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def mint_token(call: Call) -> Response:
    """A signed, expiring token that acts only for ``owner`` (and only ``task_id`` if set)."""
    body = await call.json(TokenRequest)
    return _json(call.runtime.service.mint_token(body, call.principal), 201)


_DOCS = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>errands API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


async def docs(call: Call) -> Response:
    """The API document, to read and try (Swagger UI)."""
    del call
    return HTMLResponse(_DOCS)


ROUTES = [
    Route(
        "GET",
        "/client/errands.js",
        client_js,
        "The JavaScript client (an ES module)",
        "clients",
        media_type="text/javascript",
        response={"type": "string"},
        errors=(),
        auth="public",
    ),
    Route(
        "GET", "/healthz", healthz, "The process is up", "health", response=Health, errors=(), auth="public"
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
        "The store is reachable and every loop is alive",
        "health",
        response=Readiness,
        answers={503: ("Not ready: the problems are listed.", Readiness)},
        errors=(401,),
    ),
    Route("GET", "/v1/stats", stats, "Queue statistics", "admin", response=StatsOut, errors=(401, 403)),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics of this process (admin)",
        "admin",
        media_type=CONTENT_TYPE_LATEST,
        response={"type": "string"},
        errors=(401, 403),
    ),
    Route(
        "POST",
        "/v1/tokens",
        mint_token,
        "Mint an owner token",
        "admin",
        status=201,
        body=TokenRequest,
        response=TokenOut,
        errors=(400, 401, 403, 413, 422),
    ),
    Route(
        "GET",
        "/docs",
        docs,
        "The API document, to read and try",
        "docs",
        media_type="text/html",
        errors=(),
        auth="public",
        documented=False,
    ),
]
