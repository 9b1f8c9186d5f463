"""The ASGI middleware that runs before any route: authentication and the body size limit."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl, urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errands.api.errors import error_body
from errands.api.routing import PRINCIPAL
from errands.auth import Authenticator
from errands.clock import Clock
from errands.errors import Unauthorized
from errands.logs import request_id


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


class OriginPolicy:
    """Which web pages may open a watch: the origins in ``ERRANDS_CORS_ORIGINS`` (``*`` for any),
    and errands' own (the request's ``Host``, or ``ERRANDS_PUBLIC_URL``'s).

    Browsers enforce it for SSE through CORS; they do not for WebSocket, so the guard checks a
    handshake's ``Origin`` itself. Clients that are not web pages (the SDK, the CLI, mini-programs)
    send no ``Origin`` and are not concerned.
    """

    def __init__(self, allowed: Sequence[str], public_url: str | None) -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(o.rstrip("/").lower() for o in allowed if o != "*")
        parts = urlsplit(public_url) if public_url else None
        self.public_host = parts.netloc.lower() if parts is not None and parts.netloc else None

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self.any:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self.allowed:
            return True
        netloc = urlsplit(origin).netloc
        return bool(netloc) and netloc in {host.lower() if host else None, self.public_host}


class GuardMiddleware:
    """Runs before any route: authenticates the caller, then holds the body to ``max_bytes``.

    Both happen before the body is read, so an unauthenticated or oversized request costs
    nothing more. One middleware rather than two: every ASGI layer costs time on every request.
    A WebSocket handshake is refused with an HTTP answer (401, or 403 for a page of another
    origin) like any request, where the server supports it; else it is closed with 4401/4403.
    """

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Callable[[], Authenticator | None],
        clock: Clock,
        max_bytes: int,
        origins: OriginPolicy,
        needs_token: Callable[[str], bool],
        access_log: bool = False,
    ) -> None:
        self.app = app
        self._access_log = access_log
        self._needs_token = needs_token
        self._authenticator = authenticator
        self._clock = clock
        self.max_bytes = max_bytes
        self._origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # Each request is served in a task of its own: the id names its log lines (errands.logs).
        given = _header(scope, b"x-request-id")
        rid = given if given is not None and _REQUEST_ID.fullmatch(given) else secrets.token_hex(8)
        request_id.set(rid)
        if kind == "http":
            send = _with_request_id(send, rid.encode())
        if self._access_log:
            send = _logged(scope, send)
        path: str = scope["path"]
        if kind == "websocket" and not self._origins.allows(
            _header(scope, b"origin"), _header(scope, b"host")
        ):
            message = "This page's origin may not open a watch (see ERRANDS_CORS_ORIGINS)."
            await _refuse_handshake(scope, send, 403, error_body("forbidden", message), [])
            return
        if self._needs_token(path):
            authenticator = self._authenticator()
            try:
                if authenticator is None:
                    raise Unauthorized("The service is starting.")
                scope[PRINCIPAL] = authenticator.authenticate(credential(scope), now=self._clock.now())
            except Unauthorized as exc:
                body = error_body(exc.code, exc.message)
                challenge = [(b"www-authenticate", b"Bearer")]
                if kind == "websocket":
                    await _refuse_handshake(scope, send, 401, body, challenge)
                else:
                    await _respond(send, 401, body, challenge)
                return
        if kind == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and (not value.isdigit() or len(value) > 18):
                    await _respond(
                        send, 400, error_body("bad_request", "Content-Length is not valid."),
                        [(b"connection", b"close")],
                    )  # fmt: skip
                    return
                if name == b"content-length" and int(value) > self.max_bytes:
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


access = logging.getLogger("errands.access")
_CAPABILITY = "/v1/hooks/callback/"

#: A request id a client may give (``X-Request-Id``), else errands makes one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _with_request_id(send: Send, rid: bytes) -> Send:
    """``send``, answering with the request's id in ``X-Request-Id``."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid)]}
        await send(message)

    return sending


def _logged(scope: Scope, send: Send) -> Send:
    """``send``, logging the request once answered: method, path (never the query, where
    browsers put tokens), status and time taken (for a stream: until it ended)."""
    started = time.perf_counter()
    method = scope.get("method", "WEBSOCKET")
    status = [0]
    path: str = scope["path"]
    if path.startswith(_CAPABILITY):
        path = _CAPABILITY + "[redacted]"  # the path itself is the secret

    async def sending(message: Message) -> None:
        kind = message["type"]
        await send(message)
        if kind in ("http.response.start", "websocket.http.response.start"):
            status[0] = message["status"]
        elif kind == "websocket.accept":
            access.info("%s %s 101", method, path)
        elif kind in ("http.response.body", "websocket.http.response.body") and not message.get("more_body"):
            took_ms = (time.perf_counter() - started) * 1000
            access.info("%s %s %d %.1f ms", method, path, status[0], took_ms)

    return sending


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _refuse_handshake(
    scope: Scope, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Answer a WebSocket handshake with an HTTP error (the ASGI denial-response extension)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *headers],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 4000 + status})


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
