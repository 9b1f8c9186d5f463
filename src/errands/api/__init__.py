"""The ASGI app: tasks, tokens, stats and health over HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from errands.api import admin, errors, hooks, notify, tasks, watch
from errands.api.direct import OPENAPI_PATHS, DirectRoutes
from errands.api.middleware import GuardMiddleware, OriginPolicy

if TYPE_CHECKING:
    from errands.runtime import Runtime


def create_api(runtime: Runtime) -> FastAPI:
    """The HTTP API of ``runtime`` (which the caller starts and stops)."""
    api = FastAPI(
        title="errands",
        version="1",
        summary="Long-running jobs: submit, run, watch live, notify, rescue.",
        redoc_url=None,
    )
    api.state.runtime = runtime
    errors.install(api)
    api.include_router(tasks.router)
    api.include_router(watch.router)
    api.include_router(hooks.router)
    api.include_router(notify.router)
    api.include_router(admin.router)
    origins = [o.strip() for o in runtime.settings.cors_origins.split(",") if o.strip()]
    # Innermost first: the direct routes (submit, SSE watches) run after the guard.
    api.add_middleware(DirectRoutes, runtime=runtime)
    api.add_middleware(
        GuardMiddleware,
        authenticator=lambda: runtime.authenticator,
        clock=runtime.clock,
        max_bytes=runtime.settings.max_body_bytes,
        origins=OriginPolicy(origins, runtime.settings.public_url),
    )
    if origins:
        # Outermost, so preflight requests (which carry no token) are answered before the guard.
        api.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            max_age=600,
        )
    _document_streams(api)
    return api


def _document_streams(api: FastAPI) -> None:
    """Add the SSE endpoints, which are served outside FastAPI's routing, to /openapi.json."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = build()
            schema["paths"].update(OPENAPI_PATHS)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it
