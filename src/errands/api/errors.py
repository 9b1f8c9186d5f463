"""Every failure answers ``{"error": {"code", "message"}}`` with a clear status; never a traceback."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from errands.errors import ApiError, BadRequest, InvalidRequest, LeaseLost, StoreError, TooManyRequests

log = logging.getLogger("errands.api")

M = TypeVar("M", bound=BaseModel)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        error_body(code, message), status_code=status, media_type="application/json", headers=headers
    )


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    where = ".".join(loc)
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{where}: unknown field" if where else "unknown field"
    if kind == "missing":
        return f"{where}: required" if where else "a JSON object body is required"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def invalid(errors: list[Any]) -> ApiError:
    """The API error for pydantic validation errors: malformed JSON is a 400, the rest 422."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return BadRequest("The body is not valid JSON.")
    return InvalidRequest("; ".join(_describe(e) for e in errors[:5]))


def parse(model: type[M], body: bytes) -> M:
    """Validate a JSON body against ``model`` (strict, no recursion limit issues) or raise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid(list(exc.errors())) from None


def http_error_response(exc: HTTPException) -> Response:
    """The answer to one of Starlette's own HTTP errors (no route, unreadable body…)."""
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 404:
        message = "No such route."
    elif exc.status_code == 400:
        message = "The body could not be read as JSON."
    elif exc.status_code == 413:
        message = "The request body is too large."
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


def response_for(exc: Exception) -> Response:
    """The answer to an exception raised while serving a request, wherever it is served."""
    if isinstance(exc, ApiError):
        headers = None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        if exc.status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(exc.status_code, exc.code, exc.message, headers)
    if isinstance(exc, HTTPException):
        return http_error_response(exc)
    if isinstance(exc, StoreError):
        log.error("store error while serving a request: %s", exc, exc_info=exc.__cause__)
        return error_response(503, "unavailable", "The task store is unavailable; try again shortly.")
    if isinstance(exc, LeaseLost):
        return error_response(409, "invalid_state", "The task changed meanwhile; try again.")
    log.error("unexpected error while serving a request", exc_info=exc)
    return error_response(500, "internal_error", "Something went wrong on our side.")
