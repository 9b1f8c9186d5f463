"""One route table: every route is declared once, as a :class:`Route`, and that declaration is
what serves it, what the guard reads to know whether it needs a token, and what the OpenAPI
document describes (:mod:`errands.api.openapi`).

The router is small on purpose. Task submission, webhooks and watches are paid for on every task
and every event, and a framework's per-request machinery (dependency injection, exit stacks,
response models) cost as much again as the work itself; here a request costs a regex match, the
validation of what the route declared (path parameters, the query model) and the endpoint.
Every error, raised anywhere, is answered by one mapping (:func:`errands.api.errors.response_for`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from errands.api.errors import error_response, invalid, parse, response_for
from errands.auth import Principal
from errands.errors import InvalidRequest, NotFound, Unauthorized

if TYPE_CHECKING:
    from errands.runtime import Runtime

PRINCIPAL = "errands.principal"
M = TypeVar("M", bound=BaseModel)
#: An endpoint answers an HTTP request with a response; a WebSocket one speaks through ``call.send``.
Endpoint = Callable[["Call"], Awaitable[Any]]
#: ``token``: an admin key or owner token; ``public``: anyone; ``self``: the request proves itself
#: (signed webhooks, capability URLs) and bearer tokens play no part.
Auth = Literal["token", "public", "self"]


@dataclass(frozen=True, slots=True)
class PathParam:
    """A path segment: its name, the pattern it must match, and what it is."""

    name: str
    pattern: str | None
    description: str


@dataclass(frozen=True, slots=True)
class Header:
    """A request header a route reads (documented; the endpoint parses it)."""

    name: str
    schema: Mapping[str, Any]
    description: str


@dataclass(frozen=True, slots=True)
class Route:
    """One operation of the API, as served and as documented."""

    method: str
    path: str
    endpoint: Endpoint
    summary: str
    tag: str
    status: int = 200
    path_params: tuple[PathParam, ...] = ()
    query: type[BaseModel] | None = None
    headers: tuple[Header, ...] = ()
    body: type[BaseModel] | None = None
    response: type[BaseModel] | Mapping[str, Any] | None = None
    media_type: str = "application/json"
    #: The success answer's other content types, each with its schema (a model or a schema).
    more_media: Mapping[str, type[BaseModel] | Mapping[str, Any]] = field(default_factory=dict)
    errors: tuple[int, ...] = (400, 401, 403, 404, 413, 422, 429)
    auth: Auth = "token"
    #: More documented answers: ``{status: (description, model or schema or None)}``.
    answers: Mapping[int, tuple[str, type[BaseModel] | Mapping[str, Any] | None]] = field(
        default_factory=dict
    )
    websocket: bool = False
    #: Listed in the OpenAPI document (the document itself and its viewer are not).
    documented: bool = True

    @property
    def description(self) -> str:
        return (self.endpoint.__doc__ or "").strip()


class Call:
    """One request as an endpoint sees it: the runtime, the caller, and what the route declared,
    already validated."""

    __slots__ = ("_body", "_query", "path_params", "receive", "route", "runtime", "scope", "send")

    def __init__(
        self,
        runtime: Runtime,
        route: Route,
        scope: Scope,
        receive: Receive,
        path_params: dict[str, str],
        query: BaseModel | None,
        send: Send | None = None,
    ) -> None:
        self.runtime = runtime
        self.route = route
        self.scope = scope
        self.receive = receive
        self.send = send  # for WebSocket endpoints, which answer through it
        self.path_params = path_params
        self._query = query
        self._body: bytes | None = None

    @property
    def principal(self) -> Principal:
        """The caller, authenticated by the guard before the route ran."""
        principal = self.scope.get(PRINCIPAL)
        if not isinstance(principal, Principal):
            raise Unauthorized()
        return principal

    def query(self, model: type[M]) -> M:
        """The route's query parameters, validated as ``model`` (the route's ``query``)."""
        assert isinstance(self._query, model), "the route declares this query model"
        return self._query

    def header(self, name: bytes) -> str | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return str(value.decode("latin-1"))
        return None

    async def body(self) -> bytes:
        """The whole request body (the guard's receive raises once it passes the size limit)."""
        if self._body is None:
            chunks: list[bytes] = []
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    break
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            self._body = b"".join(chunks)
        return self._body

    async def json(self, model: type[M]) -> M:
        """The body, parsed and validated as ``model`` (strict; unknown fields refused)."""
        return parse(model, await self.body())


_SEGMENT = re.compile(r"\{([a-z_]+)\}")


def file_response(
    name: str, media_types: Mapping[str, str], read: Callable[[str], bytes], headers: Mapping[str, str]
) -> Response:
    """One of a fixed set of files (``media_types``: name to type); any other name is ``404``."""
    media_type = media_types.get(name)
    if media_type is None:
        raise NotFound("No such file.")
    return Response(read(name), media_type=media_type, headers=dict(headers))


def _pattern(path: str, *, named: bool) -> str:
    """A regex for a path template: literal parts escaped, each ``{name}`` one segment."""
    parts = _SEGMENT.split(path)  # literal, name, literal, name, …
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"(?P<{part}>[^/]+)" if named else "[^/]+")
        else:
            out.append(re.escape(part))
    return "".join(out)


class _Compiled:
    __slots__ = ("checks", "regex", "route")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.regex = re.compile("^" + _pattern(route.path, named=True) + "$")
        names = _SEGMENT.findall(route.path)
        declared = {p.name: p for p in route.path_params}
        if set(names) != set(declared):
            raise ValueError(f"{route.path}: declare exactly its path parameters")
        self.checks = [
            (p.name, re.compile(p.pattern), p.pattern) for p in route.path_params if p.pattern is not None
        ]


class Router:
    """The ASGI app of the route table (see the module docstring)."""

    def __init__(self, runtime: Runtime, routes: Sequence[Route]) -> None:
        self.runtime = runtime
        self.routes = tuple(routes)
        self._http: list[_Compiled] = []
        self._ws: list[_Compiled] = []
        seen: set[tuple[str, str]] = set()
        for route in routes:
            if (route.method, route.path) in seen:
                raise ValueError(f"{route.method} {route.path} is declared twice")
            seen.add((route.method, route.path))
            (self._ws if route.websocket else self._http).append(_Compiled(route))
        # A path without parameters wins over a template it also matches (/v1/tasks/batch is
        # not the task "batch", which is why no task may have that id).
        self._literal = {c.route.path: [d for d in self._http if d.route.path == c.route.path]
                         for c in self._http if "{" not in c.route.path}  # fmt: skip
        open_paths = [_pattern(r.path, named=False) for r in routes if r.auth != "token"]
        self._open = re.compile("^(?:" + "|".join(open_paths or ["(?!)"]) + ")$")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                response = await self._serve(scope, receive)
            except Exception as exc:
                response = response_for(exc)
            await response(scope, receive, send)
        elif scope["type"] == "websocket":
            for compiled in self._ws:
                match = compiled.regex.match(scope["path"])
                if match is not None:
                    call = Call(self.runtime, compiled.route, scope, receive, match.groupdict(), None, send)
                    await compiled.route.endpoint(call)
                    return
            await send({"type": "websocket.close", "code": 4404})

    async def _serve(self, scope: Scope, receive: Receive) -> Response:
        path, method = scope["path"], scope["method"]
        allowed: list[str] = []
        for compiled in self._literal.get(path, self._http):
            match = compiled.regex.match(path)
            if match is None:
                continue
            route = compiled.route
            if route.method != method:
                allowed.append(route.method)
                continue
            params = match.groupdict()
            for name, regex, pattern in compiled.checks:
                if not regex.match(params[name]):
                    raise InvalidRequest(f"{name}: must match {pattern}")
            query = None
            if route.query is not None:
                pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
                try:
                    query = route.query.model_validate(dict(pairs))
                except ValidationError as exc:
                    raise invalid(list(exc.errors())) from None
            response: Response = await route.endpoint(
                Call(self.runtime, route, scope, receive, params, query)
            )
            return response
        if allowed:
            allow = ", ".join(sorted(set(allowed)))
            return error_response(
                405, "method_not_allowed", f"{method} is not allowed here.", headers={"Allow": allow}
            )
        return error_response(404, "not_found", "No such route.")

    def needs_token(self, path: str) -> bool:
        """Whether a request for ``path`` must carry a token (read by the guard, before routing):
        not for public routes, nor for those whose requests prove themselves (webhooks)."""
        return self._open.match(path) is None
