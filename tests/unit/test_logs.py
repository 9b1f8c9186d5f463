"""Log lines: the JSON and text formats, the context of each line, credentials kept out."""

from __future__ import annotations

import json
import logging

import pytest

from errands.logs import ContextFields, JsonLines, RedactSecrets, TextFormatter, in_task, request_id


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
    assert "eto_abc" not in line["message"] and "eka_secret" not in line["message"]
    assert line["message"].count("[redacted]") == 2


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
