"""The ASGI middleware that runs before any route: authentication and the body size limit."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errands.api.errors import error_body
from errands.auth import Authenticator
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


class GuardMiddleware:
    """Runs before any route: authenticates the caller, then holds the body to ``max_bytes``.

    Both happen before the body is read, so an unauthenticated or oversized request costs
    nothing more. One middleware rather than two: every ASGI layer costs time on every request.
    """

    def __init__(
        self, app: ASGIApp, authenticator: Callable[[], Authenticator | None], clock: Clock, max_bytes: int
    ) -> None:
        self.app = app
        self._authenticator = authenticator
        self._clock = clock
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path not in PUBLIC_PATHS and not path.startswith(SELF_AUTHENTICATED_PREFIXES):
            authenticator = self._authenticator()
            try:
                if authenticator is None:
                    raise Unauthorized("The service is starting.")
                scope[PRINCIPAL] = authenticator.authenticate(credential(scope), now=self._clock.now())
            except Unauthorized as exc:
                if kind == "websocket":
                    await send({"type": "websocket.close", "code": 4401, "reason": exc.message})
                else:
                    await _respond(
                        send, 401, error_body(exc.code, exc.message), [(b"www-authenticate", b"Bearer")]
                    )
                return
        if kind == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    message = f"The request body is over {self.max_bytes} bytes."
                    await _respond(
                        send, 413, error_body("payload_too_large", message), [(b"connection", b"close")]
                    )
                    return
            receive = self._limited(receive)
        await self.app(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        """Count the body as it arrives, for requests without (or lying about) Content-Length."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413)
            return message

        return limited


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
