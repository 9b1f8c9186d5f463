"""The ASGI app: the route table of every module, behind the guard (and CORS when configured)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from errands.api import admin, console, credits, inbound, notify, openapi, schedules, streams, tasks, watch
from errands.api.middleware import GuardMiddleware, OriginPolicy
from errands.api.routing import Call, Route, Router

if TYPE_CHECKING:
    from errands.runtime import Runtime

TITLE = "errands"
SUMMARY = "Long-running jobs: submit, run, watch live, notify, rescue."


def routes() -> list[Route]:
    """Every route of the API, in the order the document lists them."""
    return [
        *tasks.ROUTES,
        *streams.ROUTES,
        *watch.ROUTES,
        *inbound.ROUTES,
        *notify.ROUTES,
        *schedules.ROUTES,
        *credits.ROUTES,
        *admin.ROUTES,
        *console.ROUTES,
    ]


def create_api(runtime: Runtime) -> ASGIApp:
    """The HTTP API of ``runtime`` (which the caller starts and stops)."""
    table = routes()
    rendered: list[bytes] = []

    async def openapi_json(call: Call) -> Response:
        """This document."""
        del call
        if not rendered:  # made once, on first use: it names the app's task types
            spec = openapi.document(
                table, title=TITLE, version="1", summary=SUMMARY, task_types=list(runtime.app.task_types)
            )
            rendered.append(orjson.dumps(spec))
        return Response(rendered[0], media_type="application/json")

    table.append(
        Route(
            "GET",
            "/openapi.json",
            openapi_json,
            "The OpenAPI document",
            "docs",
            errors=(),
            auth="public",
            documented=False,
        )
    )
    router = Router(runtime, table)
    origins = [o.strip() for o in runtime.settings.cors_origins.split(",") if o.strip()]
    app: ASGIApp = GuardMiddleware(
        router,
        authenticator=lambda: runtime.authenticator,
        clock=runtime.clock,
        max_bytes=runtime.settings.max_body_bytes,
        origins=OriginPolicy(origins, runtime.settings.public_url),
        needs_token=router.needs_token,
        access_log=runtime.settings.access_log,
    )
    if origins:
        # Outermost, so preflight requests (which carry no token) are answered before the guard.
        app = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-Id"],
            expose_headers=["X-Request-Id"],
            max_age=600,
        )
    return app
