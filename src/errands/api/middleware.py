"""ASGI middleware that runs before any route: authentication and the body size limit."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errands.api.errors import error_body
from errands.auth import Authenticator, Principal
from errands.clock import Clock
from errands.errors import Unauthorized

PRINCIPAL = "errands.principal"

#: Paths anyone may read: liveness, the API description, the browser client.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/client/errands.js"}
)
#: Path prefixes that authenticate by other means (signed webhooks, capability URLs).
SELF_AUTHENTICATED_PREFIXES = ("/v1/hooks/",)


def credential(scope: Scope) -> str | None:
    """The bearer token from ``Authorization``, else from ``?access_token=`` (for browsers)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return str(token.strip())
            return None
    query = scope.get("query_string", b"")
    if b"access_token=" in query:
        for key, value in parse_qsl(query.decode("latin-1")):
            if key == "access_token":
                return str(value)
    return None


class AuthMiddleware:
    """Authenticates every request but the public ones, before the body is read."""

    def __init__(self, app: ASGIApp, authenticator: Callable[[], Authenticator | None], clock: Clock) -> None:
        self.app = app
        self._authenticator = authenticator
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(SELF_AUTHENTICATED_PREFIXES):
            await self.app(scope, receive, send)
            return
        authenticator = self._authenticator()
        try:
            if authenticator is None:
                raise Unauthorized("The service is starting.")
            principal: Principal = authenticator.authenticate(credential(scope), now=self._clock.now())
        except Unauthorized as exc:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401, "reason": exc.message})
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
                }
            )
            await send({"type": "http.response.body", "body": error_body(exc.code, exc.message)})
            return
        scope[PRINCIPAL] = principal
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with ``413``, by ``Content-Length`` or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 413,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                        }
                    )
                    body = error_body(
                        "payload_too_large", f"The request body is over {self.max_bytes} bytes."
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413)
            return message

        await self.app(scope, limited, send)
