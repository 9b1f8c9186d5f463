"""Log lines: the JSON and text formats, the context of each line, credentials kept out."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from errands.logs import (
    ContextFields,
    JsonLines,
    RedactSecrets,
    TextFormatter,
    configure,
    in_task,
    request_id,
)


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    made = logging.LogRecord("errands.worker", logging.WARNING, __file__, 1, message, args, exc_info)
    made.created = 1796400000.25
    for each in (ContextFields(), RedactSecrets()):
        each.filter(made)
    return made


def test_a_json_line_has_level_logger_time_and_the_task_of_its_context() -> None:
    def log_it() -> logging.LogRecord:
        return record("lease of %s lost", "t1")

    made = in_task("t1", 2).run(log_it)
    line = json.loads(JsonLines().format(made))
    assert line == {
        "time": "2026-12-04T16:00:00.250Z",
        "level": "WARNING",
        "logger": "errands.worker",
        "message": "lease of t1 lost",
        "task_id": "t1",
        "attempt": 2,
    }
    assert TextFormatter().format(made).endswith("errands.worker: lease of t1 lost [task=t1 attempt=2]")


def test_a_line_outside_any_request_or_task_has_no_context_fields() -> None:
    line = json.loads(JsonLines().format(record("started")))
    assert set(line) == {"time", "level", "logger", "message"}
    assert TextFormatter().format(record("started")).endswith(": started")


def test_the_request_id_of_the_context_is_on_each_line_and_secrets_are_redacted() -> None:
    token = request_id.set("req-7")
    try:
        made = record('"WebSocket /v1/ws?access_token=eto_abc.def" %s', "Bearer eka_secret")
    finally:
        request_id.reset(token)
    line = json.loads(JsonLines().format(made))
    assert line["request_id"] == "req-7"
    assert line["message"] == '"WebSocket /v1/ws" Bearer [redacted]'


def test_an_exception_goes_into_the_line_as_text() -> None:
    try:
        raise ValueError("broken")
    except ValueError as exc:
        made = record("failed", exc=exc)
    line = json.loads(JsonLines().format(made))
    assert "ValueError: broken" in line["exc_info"]


def test_counting_errors_does_not_silence_an_app_that_configured_no_logging(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With no handler anywhere, Python prints errors itself (its last resort): the metrics'
    counting handler on ``errands`` must not take that away."""
    from errands.metrics import count_logged_errors

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        count_logged_errors()
        logging.getLogger("errands.worker").error("the database is gone")
        logging.getLogger("errands.notify").warning("gave up on message m1")
    finally:
        root.handlers[:] = saved
    printed = capsys.readouterr().err
    assert "the database is gone" in printed and "gave up on message m1" in printed


@pytest.mark.parametrize(
    ("template", "args", "written"),
    [
        (  # uvicorn, each WebSocket handshake
            '%s - "WebSocket %s" [accepted]',
            ("127.0.0.1:5", "/v1/ws?after=3&access_token=opaque-token"),
            '127.0.0.1:5 - "WebSocket /v1/ws" [accepted]',
        ),
        (
            '%s - "WebSocket %s" %d',
            ("127.0.0.1:5", "/v1/tasks/t1/watch?access%5Ftoken=opaque-token", 401),
            '127.0.0.1:5 - "WebSocket /v1/tasks/t1/watch" 401',
        ),
        ("< GET %s HTTP/1.1", ("/v1/ws?access_token=opaque-token",), "< GET /v1/ws HTTP/1.1"),  # websockets
        (  # httpx, should its lines be let through
            'HTTP Request: %s %s "%s %d %s"',
            ("POST", "https://hooks.example.com/in?key=opaque-token", "HTTP/1.1", 200, "OK"),
            'HTTP Request: POST https://hooks.example.com/in "HTTP/1.1 200 OK"',
        ),
        ("%s asked: why?", ("alice",), "alice asked: why?"),  # not a request line
    ],
)
def test_request_lines_are_written_without_their_query_string(
    template: str, args: tuple[object, ...], written: str
) -> None:
    """A query string may carry a credential in any spelling (``access%5Ftoken=``, a provider's
    ``?key=``): request lines lose it whole rather than have known names redacted."""
    made = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, template, args, None)
    assert RedactSecrets().filter(made)
    assert made.getMessage() == written


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """``configure`` changes process-wide logging: put back what pytest and the other tests had."""
    names = ("", "httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = [
        (logger, logger.level, logger.handlers[:], logger.propagate)
        for logger in map(logging.getLogger, names)
    ]
    yield
    for logger, level, handlers, propagate in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


@pytest.mark.usefixtures("logging_restored")
@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
def test_the_http_client_logs_no_request_urls_in_errands_logging(
    level: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """httpx logs every request with its whole URL at INFO (and httpcore its connections at
    DEBUG); an endpoint's or a provider's URL may hold a key."""
    configure(level, "text")
    with httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200))) as client:
        assert client.get("https://provider.example.com/v1/jobs/7?key=opaque-token").status_code == 200
    logging.getLogger("errands.sweeper").info("polled 1 task")
    logging.getLogger("httpx").warning("a warning is still written")
    printed = capsys.readouterr().err
    assert "polled 1 task" in printed and "a warning is still written" in printed
    assert "provider.example.com" not in printed and "opaque-token" not in printed
