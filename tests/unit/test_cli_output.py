"""What the CLI prints of a task: its times as the API writes them (UTC, three digits)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from errands.cli_client import _task_json, _when
from errands.model import Status, Task, TaskError, TaskRecord

CREATED = 1796404800.004  # 2026-12-04T17:20:00.004Z


def test_a_task_printed_as_json_is_the_api_s_task_object() -> None:
    record = TaskRecord(
        id="order-42", type="photography", owner="user-7", status=Status.FAILED,
        input={"prompt": "a cat"}, priority=0, max_attempts=3, timeout_s=600.0,
        created_at=CREATED, updated_at=CREATED + 2.1209, expires_at=CREATED + 86400,
        fingerprint="f", error=TaskError("bad_input", "A prompt is required."), attempt=1,
        started_at=CREATED + 0.5, finished_at=CREATED + 2.1209,
    )  # fmt: skip
    api = record.public()
    assert api["updated_at"] == "2026-12-04T17:20:02.124Z"
    # The CLI reads the API's JSON into a Task (as the SDK does) and prints it back.
    assert _task_json(Task.model_validate(api)) == api


def test_a_time_for_people_is_written_as_the_api_writes_it_whatever_its_zone() -> None:
    moment = datetime(2026, 12, 5, 1, 20, 0, 4999, tzinfo=timezone(timedelta(hours=8)))
    assert _when(moment) == "2026-12-04T17:20:00.004Z"
