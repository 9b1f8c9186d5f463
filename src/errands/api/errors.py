"""Every failure answers ``{"error": {"code", "message"}}`` with a clear status; never a traceback."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.responses import Response

from errands.errors import ApiError, LeaseLost, StoreError, TooManyRequests
from errands.inputs import invalid, parse

__all__ = ["error_body", "error_response", "invalid", "parse", "response_for"]

log = logging.getLogger("errands.api")

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
