"""The OpenAPI document, made from the route table (:mod:`errands.api.routing`).

Every route contributes what it declared: its path parameters with their patterns, its query
model as parameters, the headers it reads, its body model, its answers (the success, the errors
it may give, and any others), how it authenticates. Models become components through pydantic's
own JSON Schema. The document also says what only the running service knows: the task types it
accepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from errands.api.routing import Route
from errands.api.schemas import ErrorBody

_REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "The request is malformed (not JSON, a bad header or cursor).",
    401: "No valid token (or, for a webhook, no valid signature).",
    402: "The owner's credits do not cover the task's cost; nothing was written.",
    403: "The token may not do this.",
    404: "No such resource (another owner's task is not found either).",
    405: "The method is not allowed on this path.",
    409: "The request conflicts with the current state.",
    410: "The task finished and was purged.",
    413: "The body is too large.",
    416: "The range asked for starts past the end (Content-Range says the size).",
    422: "A value is not valid; the message says which.",
    429: "Too many requests or watches; try again after Retry-After.",
    503: "The store is unavailable; try again shortly.",
}


def _models(routes: Sequence[Route]) -> list[tuple[type[BaseModel], str]]:
    found: dict[tuple[type[BaseModel], str], None] = {(ErrorBody, "serialization"): None}
    for route in routes:
        for model, mode in (
            (route.query, "validation"),
            (route.body, "validation"),
            (route.response, "serialization"),
        ):
            if isinstance(model, type) and issubclass(model, BaseModel):
                found[(model, mode)] = None
        for answer in [*(a for _, a in route.answers.values()), *route.more_media.values()]:
            if isinstance(answer, type) and issubclass(answer, BaseModel):
                found[(answer, "serialization")] = None
    return list(found)


def document(
    routes: Iterable[Route], *, title: str, version: str, summary: str, task_types: Sequence[str]
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    documented = [r for r in routes if r.documented]
    keys = _models(documented)
    refs, top = models_json_schema(keys, ref_template=_REF)  # type: ignore[arg-type]
    schemas: dict[str, Any] = dict(top.get("$defs", {}))

    def ref(model: type[BaseModel] | Mapping[str, Any], mode: str) -> Any:
        if isinstance(model, type):
            return refs[(model, mode)]  # type: ignore[index]
        return dict(model)

    paths: dict[str, dict[str, Any]] = {}
    for route in documented:
        operation: dict[str, Any] = {
            "tags": [route.tag],
            "summary": route.summary,
            "operationId": route.endpoint.__name__,
        }
        if route.description:
            operation["description"] = route.description
        parameters = [
            {
                "name": p.name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", **({"pattern": p.pattern} if p.pattern else {})},
                "description": p.description,
            }
            for p in route.path_params
        ]
        if route.query is not None:
            parameters.extend(_query_parameters(route.query, schemas))
        parameters.extend(
            {
                "name": h.name,
                "in": "header",
                "required": False,
                "schema": dict(h.schema),
                "description": h.description,
            }
            for h in route.headers
        )
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            body_schema = ref(route.body, "validation")
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        responses: dict[str, Any] = {}
        success: dict[str, Any] = {"description": _success(route)}
        if route.response is not None:
            success["content"] = {route.media_type: {"schema": ref(route.response, "serialization")}}
            for media_type, schema in route.more_media.items():
                success["content"][media_type] = {"schema": ref(schema, "serialization")}
        responses[str(route.status)] = success
        for status, (description, answer) in route.answers.items():
            entry: dict[str, Any] = {"description": description}
            if answer is not None:
                media_type = route.media_type if 200 <= status < 300 else "application/json"
                entry["content"] = {media_type: {"schema": ref(answer, "serialization")}}
            responses[str(status)] = entry
        error_schema = ref(ErrorBody, "serialization")
        for status in sorted({*route.errors, 405, 503}):
            answer_of: dict[str, Any] = {
                "description": _ERRORS[status],
                "content": {"application/json": {"schema": error_schema}},
            }
            if status == 405:
                answer_of["headers"] = {
                    "Allow": {"schema": {"type": "string"}, "description": "The methods allowed."}
                }
            if status == 429:
                answer_of["headers"] = {
                    "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}
                }
            responses.setdefault(str(status), answer_of)
        operation["responses"] = responses
        operation["security"] = [{"bearer": []}] if route.auth == "token" else []
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    _name_task_types(schemas, task_types)
    sockets = {r.path: _websocket(r) for r in routes if r.websocket}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "summary": summary},
        "tags": [{"name": "watch", "description": _WATCH_TAG + "".join(sockets.values())}],
        "paths": paths,
        # OpenAPI has no WebSocket operations: each is described here and in the tag above.
        "x-websockets": {
            r.path: {
                "summary": r.summary,
                "description": " ".join(r.description.split()),
                "security": [{"bearer": []}],
            }
            for r in routes
            if r.websocket
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key (eka_…) or an owner token (eto_…, from POST /v1/tokens). "
                    "Browsers that cannot set headers may pass it as ?access_token=.",
                }
            },
        },
    }


_WATCH_TAG = (
    "Live updates, pushed: Server-Sent Events on the GET routes below (resume with Last-Event-ID or "
    "`after`, gap-free), and one WebSocket for any number of watches."
)


def _websocket(route: Route) -> str:
    return (
        f"\n\n**WebSocket `{route.path}`** ({route.summary}): open `ws(s)://<host>{route.path}` with "
        "`Authorization: Bearer …` or `?access_token=…` (browsers). " + " ".join(route.description.split())
    )


def _success(route: Route) -> str:
    return {200: "OK.", 201: "Created.", 202: "Accepted: stored, and answered at once.", 204: "Done."}.get(
        route.status, "OK."
    )


def _query_parameters(model: type[BaseModel], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    schemas.update(schema.get("$defs", {}))
    required = set(schema.get("required", []))
    out = []
    for name, declared in schema.get("properties", {}).items():
        prop = dict(declared)
        description = prop.pop("description", None)
        prop.pop("title", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        out.append(parameter)
    return out


def _name_task_types(schemas: dict[str, Any], task_types: Sequence[str]) -> None:
    """A submission's (and a schedule's) ``type`` is one of the types this service runs: say which."""
    for name in ("SubmitRequest", "ScheduleRequest"):
        body = schemas.get(name)
        if body is not None and task_types:
            body["properties"]["type"] = {
                "type": "string",
                "enum": sorted(task_types),
                "description": "A task type this service runs (a handler's or a provider's).",
            }
