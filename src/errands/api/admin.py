"""Health, readiness, stats, owner tokens, the JavaScript client and the API's own document."""

from __future__ import annotations

import functools
import importlib.util
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import HTMLResponse, Response

from errands.api.middleware import credential
from errands.api.routing import Call, PathParam, Route, file_response
from errands.api.schemas import Health, Readiness, SeriesOut, StatsOut, TokenOut
from errands.errors import Forbidden, NotFound, Unauthorized
from errands.service import TokenRequest


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


_CLIENT_JS = resources.files("errands").joinpath("static/errands.js").read_bytes()
_CLIENT_TYPES = resources.files("errands").joinpath("static/errands.d.ts").read_bytes()


async def client_js(call: Call) -> Response:
    """``watchTask`` / ``watchTasks`` for browsers and mini-programs (an ES module); no token needed."""
    del call
    headers = {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"}
    return Response(_CLIENT_JS, media_type="text/javascript; charset=utf-8", headers=headers)


async def client_types(call: Call) -> Response:
    """The TypeScript declarations of errands.js."""
    del call
    headers = {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"}
    return Response(_CLIENT_TYPES, media_type="application/typescript; charset=utf-8", headers=headers)


async def healthz(call: Call) -> Response:
    """The process is up (no token needed)."""
    del call
    return _json({"status": "ok"})


async def readyz(call: Call) -> Response:
    """The store is reachable and every background loop is alive: ``200``, else ``503``. No
    token needed (a load balancer's probe), and then it says only that; with the admin key it
    lists the problems and the loops too."""
    health = await call.runtime.health()
    status = 200 if health["ready"] else 503
    if _is_admin(call):
        return _json(health, status)
    return _json({"ready": health["ready"]}, status)


def _is_admin(call: Call) -> bool:
    """Whether a public route's caller gave the admin key (the guard checks no token there)."""
    authenticator = call.runtime.authenticator
    if authenticator is None:
        return False
    try:
        principal = authenticator.authenticate(credential(call.scope), now=call.runtime.clock.now())
    except Unauthorized:
        return False
    return principal.admin


async def stats(call: Call) -> Response:
    """Counts by status and type, and queue wait and run time p50/p95 over a recent window (admin)."""
    return _json(await call.runtime.service.stats(call.principal))


class SeriesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    window: Annotated[
        Literal["hour", "day"], Field(description="The last hour (in steps of a minute) or day (15 minutes).")
    ] = "hour"


async def series(call: Call) -> Response:
    """Tasks submitted, completed and failed (or timed out) per step over the window, and queue
    wait and run time p50/p95 by type (admin)."""
    return _json(await call.runtime.overview.series(call.principal, call.query(SeriesQuery).window))


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


# Swagger UI's files come with the swagger-ui-py package: /docs needs no internet. No validator
# (it would send the document to swagger.io); the bearer scheme of the document lets a reader
# authorize with a key or token.
_DOCS = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>errands API</title>
<link rel="icon" href="/docs/favicon-32x32.png">
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", validatorUrl: null,
  deepLinking: true, persistAuthorization: false});</script>
</body></html>"""
_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


@functools.cache
def _asset(name: str) -> bytes:
    spec = importlib.util.find_spec("swagger_ui")  # located, not imported
    if spec is None or spec.origin is None:
        raise NotFound("The Swagger UI files are not installed (pip install swagger-ui-py).")
    return (Path(spec.origin).parent / "static" / name).read_bytes()


async def docs(call: Call) -> Response:
    """The API document, to read and try (Swagger UI)."""
    del call
    return HTMLResponse(_DOCS)


async def docs_asset(call: Call) -> Response:
    """A file of Swagger UI (no token needed)."""
    headers = {"Cache-Control": "public, max-age=86400"}
    return file_response(call.path_params["asset"], _ASSETS, _asset, headers)


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
        "GET",
        "/client/errands.d.ts",
        client_types,
        "The JavaScript client's TypeScript declarations",
        "clients",
        media_type="application/typescript",
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
        answers={503: ("Not ready (with the admin key: the problems are listed).", Readiness)},
        errors=(),
        auth="public",
    ),
    Route("GET", "/v1/stats", stats, "Queue statistics", "admin", response=StatsOut, errors=(401, 403)),
    Route(
        "GET",
        "/v1/stats/series",
        series,
        "Tasks per minute and timings by type (admin)",
        "admin",
        query=SeriesQuery,
        response=SeriesOut,
        errors=(401, 403, 422),
    ),
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
    Route(
        "GET",
        "/docs/{asset}",
        docs_asset,
        "A file of Swagger UI",
        "docs",
        path_params=(PathParam("asset", None, "The file's name."),),
        media_type="text/plain",
        errors=(404,),
        auth="public",
        documented=False,
    ),
]
