"""The wire of the Python SDK: the exception for each error the API answers, and Server-Sent
Events read from a stream of lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from errands import errors

_BY_STATUS: dict[int, type[errors.ApiError]] = {
    400: errors.BadRequest,
    401: errors.Unauthorized,
    402: errors.InsufficientCredits,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    410: errors.Gone,
    413: errors.PayloadTooLarge,
    422: errors.InvalidRequest,
    429: errors.TooManyRequests,
    503: errors.Unavailable,
}
_BY_CODE: dict[str, type[errors.ApiError]] = {
    "id_conflict": errors.IdConflict,
    "invalid_state": errors.InvalidTransition,
    "unknown_type": errors.UnknownTaskType,
    "invalid_cursor": errors.InvalidCursor,
}


def raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {response.status_code}"
    try:
        retry_after = float(response.headers.get("retry-after", "1"))
    except ValueError:
        retry_after = 1.0
    raise api_error(response.status_code, code, message, retry_after)


def api_error(status: int, code: str, message: str, retry_after_s: float = 1.0) -> errors.ApiError:
    """The exception for an error the API answered (``status``, ``{code, message}``)."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, errors.ApiError)
    if cls is errors.TooManyRequests:
        return errors.TooManyRequests(message, retry_after_s=retry_after_s, code=code)
    error = cls(message, code=code)
    error.status_code = status
    return error


class StreamingUnavailable(errors.ErrandsError):
    """The server (or a proxy) does not stream events; the client polls instead."""


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str
    id: str | None
    data: str | None


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseMessage]:
    """Server-Sent Events from a stream of lines (the WHATWG format: fields, blank-line ends)."""
    event, last_id = "", None
    data: list[str] = []
    async for line in lines:
        if not line:
            if data or event:
                yield SseMessage(event or "message", last_id, "\n".join(data) if data else None)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
