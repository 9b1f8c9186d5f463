"""errands' logs: one format for errands and uvicorn alike, the context of each line, and
credentials kept out.

``configure`` installs one handler on the root logger, in the format of ``ERRANDS_LOG_FORMAT``:
``text`` (``time LEVEL logger: message [request=… task=… attempt=…]``) or ``json`` (one object per
line: ``time``, ``level``, ``logger``, ``message`` and, where there is one, ``request_id``,
``task_id``, ``attempt``, ``exc_info``). The context comes from context variables: the API sets
the request id for each request (``X-Request-Id`` when the client sent a usable one), the worker
sets the task id and attempt for everything an attempt logs (its handler's lines included).

errands never logs a token or a query string itself, but the libraries it runs on log request
lines (uvicorn every WebSocket handshake with its query string, where browsers put
``?access_token=``; websockets, at DEBUG, the request it read). A filter on every handler rewrites
such records before they are written: request lines lose their query string, and whatever looks
like a credential anywhere else is replaced. The HTTP client's loggers (``httpx`` names whole
URLs, and an endpoint's or a provider's may hold a key) are set to WARNING, so its request lines
are not written whatever ``ERRANDS_LOG_LEVEL`` says.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from errands.clock import iso_text

_SECRETS = re.compile(r"(access_token=)[^&\s\"']+|\b(ek[ao]_|eto_)[A-Za-z0-9_\-.]+|(Bearer\s+)[^\s\"']+")
#: A request line's target (``GET /path?query``, ``"WebSocket /path?query"``, ``GET http://host/path?query``)
#: up to its query string, and the query string.
_REQUEST_QUERY = re.compile(
    r"\b((?:WebSocket|GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (?:https?://[^/\s?\"']+)?/[^\s?\"']*)\?[^\s\"']*"
)

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("errands_request_id", default=None)
task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("errands_task_id", default=None)
attempt: contextvars.ContextVar[int | None] = contextvars.ContextVar("errands_attempt", default=None)
_CONTEXT = (("request_id", request_id), ("task_id", task_id), ("attempt", attempt))
#: What libraries put on their records that a JSON line does not need (uvicorn's colours).
_DROPPED = frozenset({"color_message"})


def redact(text: str) -> str:
    """``text`` with every token, admin key and ``access_token`` value replaced."""
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)


def without_queries(text: str) -> str:
    """``text`` with the query string of every request line in it dropped."""
    return _REQUEST_QUERY.sub(r"\1", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message when it holds a request line's query string or a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(without_queries(message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class ContextFields(logging.Filter):
    """Puts the request id, task id and attempt of the context on each record (a value given
    with ``extra=`` is kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        context = [
            f"{label}={value}"
            for label, value in (
                ("request", getattr(record, "request_id", None)),
                ("task", getattr(record, "task_id", None)),
                ("attempt", getattr(record, "attempt", None)),
            )
            if value is not None
        ]
        return f"{line} [{' '.join(context)}]" if context else line


class JsonLines(JsonFormatter):
    """One JSON object per line; context fields only where there is a value."""

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_text(record.created) or ""  # each record's own moment: not worth a cache entry

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in log_data.items() if (v is not None or k == "message") and k not in _DROPPED}


_FILTER = RedactSecrets()
_FIELDS = ContextFields()


def configure(level: int, fmt: str) -> None:
    """One handler on the root logger for every logger (uvicorn's too), in format ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else TextFormatter())
    handler.addFilter(_FIELDS)
    handler.addFilter(_FILTER)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The HTTP client names whole URLs at INFO (an endpoint's or a provider's may hold a key).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def protect(*logger_names: str) -> None:
    """Attach the filter to the handlers of the root logger and of ``logger_names``."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", *logger_names):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def in_task(task: str, number: int) -> contextvars.Context:
    """A copy of the current context in which lines are logged for ``task``'s attempt ``number``."""
    context = contextvars.copy_context()
    context.run(task_id.set, task)
    context.run(attempt.set, number)
    return context
