"""Small pure helpers: ids, cursors, JSON depth, percentiles, progress validation, settings."""

from __future__ import annotations

import re

import orjson
import pytest

from errands.config import load_settings
from errands.context import TaskContext
from errands.errors import ConfigError, InvalidCursor
from errands.inputs import new_task_id, new_task_ids
from errands.model import EventType
from errands.service import decode_cursor, percentile
from errands.store.base import Hint, hints
from errands.store.postgres.notices import notification_hint


def test_generated_ids_are_valid_client_ids_and_sort_by_time() -> None:
    ids = [new_task_id() for _ in range(200)]
    ids += new_task_ids(500) + new_task_ids(1) + [new_task_id()]
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)  # ULID's alphabet
    assert len(set(ids)) == len(ids)
    prefixes = [i[:10] for i in ids]
    assert prefixes == sorted(prefixes)
    assert new_task_ids(0) == []


def test_ids_made_at_once_differ_in_their_random_part() -> None:
    ids = new_task_ids(1000)
    assert len({i[:10] for i in ids}) <= 2  # the same millisecond (or the next)
    assert len({i[10:] for i in ids}) == 1000


@pytest.mark.parametrize("cursor", ["", "nope", "W10", "WyJhIiwxXQ", "e30"])
def test_bad_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0


class _Sink:
    def __init__(self) -> None:
        self.reports: list[tuple[int | None, str | None]] = []

    def report(self, progress: int | None, message: str | None) -> None:
        self.reports.append((progress, message))


def _ctx(sink: _Sink) -> TaskContext:
    return TaskContext(task_id="t", type="x", owner="o", attempt=1, max_attempts=1, sink=sink)


@pytest.mark.parametrize("bad", [-1, 101, float("nan"), True, "50"])
def test_progress_must_be_a_number_from_0_to_100(bad: object) -> None:
    sink = _Sink()
    with pytest.raises(ValueError):
        _ctx(sink).progress(bad)  # type: ignore[arg-type]
    assert sink.reports == []


async def test_progress_is_awaitable_and_plain_callable() -> None:
    sink = _Sink()
    ctx = _ctx(sink)
    await ctx.progress(10, "a")
    ctx.progress(20.7)
    ctx.progress(message="x" * 5000)
    assert sink.reports[:2] == [(10, "a"), (20, None)]
    assert sink.reports[2][1] is not None and len(sink.reports[2][1]) == 1000


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRANDS_CONCURRENCY", "7")
    monkeypatch.setenv("ERRANDS_LEASE_S", "12.5")
    settings = load_settings(port=9000)
    assert (settings.concurrency, settings.lease_s, settings.port) == (7, 12.5, 9000)
    assert load_settings(concurrency=3).concurrency == 3


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRANDS_CONCURRENCY", "many")
    with pytest.raises(ConfigError, match="ERRANDS_CONCURRENCY"):
        load_settings()


@pytest.mark.parametrize(
    "line",
    [
        '127.0.0.1:5 - "WebSocket /v1/ws?access_token=eto_abc.def" [accepted]',
        "GET /v1/tasks/x/watch?after=3&access_token=SECRET123 HTTP/1.1",
        "Authorization: Bearer whatever-it-is",
        "the key eka_Zm9vYmFy-_. was used",
    ],
)
def test_credentials_are_redacted_from_log_lines(line: str) -> None:
    from errands.logs import redact

    cleaned = redact(line)
    assert "[redacted]" in cleaned
    for secret in ("eto_abc", "SECRET123", "whatever-it-is", "Zm9vYmFy"):
        assert secret not in cleaned


def test_the_log_filter_rewrites_records(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from errands.logs import RedactSecrets

    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "%s - %s", ("ws", "/v1/ws?access_token=tok"), None
    )
    assert RedactSecrets().filter(record)
    assert record.getMessage() == "ws - /v1/ws?access_token=[redacted]"


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        ([], Hint.NONE),
        ([EventType.PROCESSING, EventType.PROGRESS, EventType.NOTIFIED], Hint.NONE),
        ([EventType.CREATED], Hint.WORK),
        ([EventType.COMPLETED], Hint.ENDED),
        ([EventType.CANCELLED], Hint.ENDED | Hint.STOPPED),
        ([EventType.RETRYING], Hint.WORK | Hint.STOPPED | Hint.ENDED),  # it left its slot
        ([EventType.CREATED, EventType.TIMEOUT], Hint.WORK | Hint.ENDED | Hint.STOPPED),
    ],
)
def test_a_commits_hints_come_from_its_event_types(types: list[EventType], expected: Hint) -> None:
    assert hints((t, False) for t in types) == expected


def test_a_change_that_leaves_its_task_waiting_hints_later_not_work() -> None:
    # A delayed task's creation, a retry into backoff: nothing to claim now, a timer to reset.
    assert hints([(EventType.CREATED, True)]) == Hint.LATER
    assert hints([(EventType.RETRYING, True)]) == Hint.STOPPED | Hint.ENDED | Hint.LATER
    assert hints([(EventType.CREATED, True), (EventType.CREATED, False)]) == Hint.WORK | Hint.LATER


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("123/0/0/", (Hint.NONE, 123, {})),
        ("123/1/8/a=5,b.c:d=3", (Hint.WORK, 123, {"a": 5, "b.c:d": 3})),
        ("123/1/8/a=5", (Hint.WORK, 123, {"a": 5, "": 3})),  # types left out: any type
        ("123/1/8/", (Hint.WORK, 123, {"": 8})),
        (f"123/{(Hint.ENDED | Hint.STOPPED).value}/0/", (Hint.ENDED | Hint.STOPPED, 123, {})),
        # Nodes of earlier versions ("123/1/8", "123/1", "123+", "123"), or anything unreadable.
        ("123/1/8", (Hint.WORK, 123, {"": 8})),
        ("123/1", (Hint.WORK, 123, {"": 1})),
        ("123/0", (Hint.NONE, 123, {})),
        ("123+", (Hint.ALL, None, {"": 1})),
        ("123", (Hint.ALL, None, {"": 1})),
        ("123/x", (Hint.ALL, None, {"": 1})),
        ("123/1/x/", (Hint.ALL, None, {"": 1})),
        ("123/1/-4/", (Hint.ALL, None, {"": 1})),
        ("123/1_0/2/", (Hint.ALL, None, {"": 1})),
        ("123/1/2/a=-1", (Hint.ALL, None, {"": 1})),
        ("123/4096/0/", (Hint.ALL, None, {"": 1})),
        ("x/1/1/", (Hint.ALL, None, {"": 1})),
        ("1/1/1/a=1/b", (Hint.ALL, None, {"": 1})),
    ],
)
def test_a_notifications_hints_seq_and_work_are_read_safely(
    payload: str, expected: tuple[Hint, int | None, dict[str, int]]
) -> None:
    assert notification_hint(payload) == expected


def test_a_notification_says_how_much_work_of_each_type_or_of_any() -> None:
    from errands.store.postgres.notices import payload

    assert payload(Hint.WORK, {"a": 2, "b": 1}) == "1/3/a=2,b=1"
    assert notification_hint("9/" + payload(Hint.WORK, {"a": 2, "b": 1})) == (Hint.WORK, 9, {"a": 2, "b": 1})
    many = {f"type-{i}": 1 for i in range(500)}  # too long to tell: any type
    assert notification_hint("9/" + payload(Hint.WORK, many)) == (Hint.WORK, 9, {"": 500})


def test_workers_that_share_the_work_claim_as_seldom_together_as_one_would() -> None:
    from errands.worker.pace import claim_share

    # Alone: it takes what is announced, and claims after the shortest gap.
    assert claim_share(1.0, announced=5, claimed=5, free=20) == 1.0
    # One of four: it takes a quarter; the estimate moves halfway each claim, towards four.
    share = 1.0
    for _ in range(8):
        share = claim_share(share, announced=40, claimed=10, free=20)
    assert 3.9 < share <= 4.0
    # Others took everything: it backs off, up to a bound.
    for _ in range(20):
        share = claim_share(share, announced=8, claimed=0, free=20)
    assert share == 16.0
    # A claim that filled every slot says nothing about the others.
    assert claim_share(3.0, announced=100, claimed=20, free=20) == 3.0
    # A claim with nothing announced (a timer, a freed slot) brings it back towards one.
    assert claim_share(16.0, announced=0, claimed=3, free=20) == 8.0
    assert claim_share(1.5, announced=0, claimed=0, free=20) == 1.0


@pytest.mark.parametrize(
    "body",
    [
        {"type": "noop"},
        {"type": "noop", "id": "a1", "owner": "u1", "input": {"b": [1, 2, {"c": None}], "a": "x"}},
        {"type": "noop", "priority": 5, "timeout_s": 12.5, "max_attempts": 2, "expires_in_s": 60},
        {"type": "noop", "run_at": "2030-01-02T03:04:05.678+08:00", "start_within_s": 30, "key": "k"},
        {"type": "noop", "delay_s": 0, "debounce_key": "d", "notify_url": "https://example.com/x"},
        {"type": "noop", "debounce_key": "d", "debounce_s": 2},
    ],
)
def test_a_requests_fingerprint_is_what_it_was(body: dict[str, object]) -> None:
    """Fingerprints are stored: a change of how they are made must not change them (a repeated
    request would then be refused as another one)."""
    import hashlib

    from errands.service import _LATER_FIELDS, SubmitRequest, request_fingerprint

    request = SubmitRequest.model_validate_json(orjson.dumps(body))
    unset = {k for k in _LATER_FIELDS if getattr(request, k) is None}
    before = hashlib.sha256(
        orjson.dumps([request.model_dump(exclude={"id", "owner", *unset}), "u9"], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    assert request_fingerprint(request, "u9") == before


def test_a_worker_counts_only_the_work_it_could_take() -> None:
    from errands.worker.pace import claim_share, mine

    assert mine({"bulk": 100, "fast": 1}, {"fast"}) == 1
    assert mine({"": 3, "bulk": 100}, {"fast"}) == 3  # of types not told: perhaps its own
    # A worker of a quiet type beside a busy one: it takes all of its own, and stays at the
    # shortest gap.
    share = 1.0
    for _ in range(10):
        share = claim_share(share, announced=mine({"bulk": 100, "fast": 1}, {"fast"}), claimed=1, free=10)
    assert share == 1.0


def test_a_notification_carries_its_commits_events_when_they_fit() -> None:
    """On the channel of hubs that follow the whole log, a commit's notification carries its
    events after what precedes them (``…/after/events``): read back exactly, or not at all."""
    from errands.store.postgres.notices import events_text, notification_events, payload

    base = 77 << 16
    snapshot = '{"id":"t/1","note":"a\\nb ü","seq":0}'.encode()
    rows = [
        (1, "task.processing", 1.25, "t/1", "alice", "work", "processing", snapshot),
        (2, "task.completed", 2.5, "t/1", "alice", "work", "completed", snapshot),
    ]
    carried = events_text(rows)
    text = f"{base + 2}/{payload(Hint.ENDED, {})}/{base - 5}/{carried}"
    assert notification_hint(text) == (Hint.ENDED, base + 2, {})
    after, events = notification_events(text)
    assert after == base - 5
    assert [(e.seq, e.type, e.at, e.task_id, e.status.value) for e in events] == [
        (base + 1, EventType.PROCESSING, 1.25, "t/1", "processing"),
        (base + 2, EventType.COMPLETED, 2.5, "t/1", "completed"),
    ]
    assert orjson.loads(events[1].task_json) == {"id": "t/1", "note": "a\nb ü", "seq": base + 2}
    # Too large for a notification: none carried, and the hub reads the log.
    assert (
        events_text(
            [(1, "task.created", 0.0, "t", "o", "w", "pending", b'{"x":"' + b"y" * 6000 + b'","seq":0}')]
        )
        == ""
    )
    # Without events, or with events that cannot be read: none (the hints still count).
    for unread in [
        f"{base + 2}/2/0/",
        f"{base + 2}/2/0//{base}/[[1]]",
        f"{base + 2}/2/0//{base}/nonsense",
        f"{base + 2}/2/0//x/{carried}",
    ]:
        assert notification_events(unread) == (None, [])
