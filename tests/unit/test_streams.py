"""Output streams without I/O: when chunks are written, the size limit, fencing, the fold of the log."""

from __future__ import annotations

import orjson
import pytest

from errands import model
from errands.context import StreamLimit
from errands.errors import Conflict, InvalidTransition, LeaseLost, StreamGap
from errands.model import Event, EventType, Status, TaskRecord
from errands.model.streams import MAX_STREAMS, read_stream, streams
from errands.worker.streams import StreamBuffer, encode_chunk


def buffer(**overrides: float) -> StreamBuffer:
    values = {"flush_s": 0.02, "flush_bytes": 1000, "max_bytes": 10_000, **overrides}
    return StreamBuffer(
        flush_s=values["flush_s"], flush_bytes=int(values["flush_bytes"]), max_bytes=int(values["max_bytes"])
    )


def add(b: StreamBuffer, name: str, chunk: object, now: float) -> None:
    b.add(name, chunk, encode_chunk(name, chunk), now)


def test_a_chunk_after_a_pause_is_due_at_once_and_a_burst_once_per_interval() -> None:
    b = buffer()
    assert b.due_at() is None
    add(b, "text", "a", now=10.0)
    assert b.due_at() == 10.0  # nothing written before: no wait
    [part] = b.take(now=10.0)
    assert (part.name, part.index, part.chunks) == ("text", 0, ["a"])
    # While chunks keep coming, the next write waits for the interval since the last one.
    for i, at in enumerate([10.001, 10.005, 10.019]):
        add(b, "text", f"b{i}", now=at)
    assert b.due_at() == pytest.approx(10.02)
    [part] = b.take(now=10.02)
    assert (part.index, part.chunks) == (1, ["b0", "b1", "b2"])
    # A quiet stretch longer than the interval: the next chunk goes out at once again.
    add(b, "text", "c", now=11.0)
    assert b.due_at() == 11.0


def test_a_thousand_chunks_a_second_make_a_write_per_interval() -> None:
    b = buffer(flush_s=0.025, flush_bytes=1 << 20, max_bytes=1 << 30)
    writes, now, last = 0, 0.0, None
    for i in range(1000):  # one second of chunks, 1 ms apart
        now = i / 1000
        add(b, "text", "token ", now=now)
        due = b.due_at()
        assert due is not None
        if due <= now:
            b.take(now=now)
            writes += 1
            last = now
    assert 35 <= writes <= 41, writes  # about 1 s / 25 ms, not 1,000
    assert last is not None


def test_bytes_waiting_make_a_write_due_at_once() -> None:
    b = buffer(flush_s=10.0, flush_bytes=100)
    add(b, "text", "x", now=1.0)
    b.take(now=1.0)
    add(b, "text", "y" * 50, now=1.1)
    assert b.due_at() == pytest.approx(11.0)
    add(b, "text", "z" * 60, now=1.2)
    assert b.due_at() == pytest.approx(1.1)  # over flush_bytes: due since the first waiting chunk


def test_streams_are_numbered_each_from_zero_and_written_together() -> None:
    b = buffer()
    add(b, "text", "a", now=0)
    add(b, "pages", {"chapter": 1}, now=0)
    add(b, "text", "b", now=0)
    parts = b.take(now=0)
    assert [(p.name, p.index, p.chunks) for p in parts] == [
        ("text", 0, ["a", "b"]),
        ("pages", 0, [{"chapter": 1}]),
    ]
    add(b, "pages", {"chapter": 2}, now=1)
    [part] = b.take(now=1)
    assert (part.name, part.index) == ("pages", 1)


def test_the_size_limit_refuses_the_chunk_that_crosses_it_and_every_later_one() -> None:
    b = buffer(max_bytes=20)
    add(b, "text", "12345678", now=0)  # 10 bytes as JSON
    with pytest.raises(StreamLimit) as refused:
        add(b, "text", "1234567890", now=0)
    assert refused.value.code == "stream_too_large"
    with pytest.raises(StreamLimit):
        add(b, "text", "", now=0)  # the stream has ended
    [part] = b.take(now=0)
    assert part.chunks == ["12345678"]


def test_chunks_and_names_are_checked() -> None:
    for bad_name in ["", "has space", "-first", "x" * 65, 3]:
        with pytest.raises(ValueError, match="stream name"):
            encode_chunk(bad_name, "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON"):
        encode_chunk("text", object())
    with pytest.raises(ValueError, match="NUL"):
        encode_chunk("text", "a\x00b")
    b = buffer()
    for i in range(MAX_STREAMS):
        add(b, f"s{i}", "a", now=0)
    with pytest.raises(ValueError, match="at most"):
        add(b, "one-more", "a", now=0)


def _running(token: str = "lease") -> TaskRecord:
    record = model.create(
        model.NewTask(
            id="t1", type="work", owner="alice", input=None, priority=0, max_attempts=3, timeout_s=60,
            expires_in_s=3600, fingerprint="fp",
        ),
        now=1.0,
    )  # fmt: skip
    return model.start_attempt(record, now=2.0, worker_id="w", lease_token=token, lease_s=30).record


def test_a_stream_write_is_fenced_by_the_lease() -> None:
    record = _running()
    change = model.stream_output(record, now=3.0, lease_token="lease", name="text", index=0, chunks=["a"])
    assert change.event is EventType.STREAM and change.record.status is Status.PROCESSING
    assert orjson.loads(change.snapshot()) == {
        "name": "text",
        "attempt": 1,
        "index": 0,
        "chunks": ["a"],
        "seq": 0,
    }
    with pytest.raises(LeaseLost):
        model.stream_output(record, now=3.0, lease_token="stale", name="text", index=0, chunks=["a"])
    ended = model.complete(record, now=4.0, lease_token="lease", result=None).record
    with pytest.raises(LeaseLost):
        model.stream_output(ended, now=5.0, lease_token="lease", name="text", index=1, chunks=["b"])


def _event(seq: int, name: str, attempt: int, index: int, chunks: list[object]) -> Event:
    payload = orjson.dumps({"name": name, "attempt": attempt, "index": index, "chunks": chunks, "seq": seq})
    return Event(seq, EventType.STREAM, 0.0, "t1", "alice", "work", Status.PROCESSING, payload)


def test_reading_a_stream_folds_the_log_and_a_retry_starts_it_again() -> None:
    log = [
        _event(1, "text", 1, 0, ["Hel", "lo"]),
        _event(2, "other", 1, 0, [{"k": 1}]),
        _event(3, "text", 1, 2, [" wor"]),
        _event(4, "text", 2, 0, ["Again"]),
        _event(5, "text", 2, 1, ["!"]),
    ]
    latest = read_stream(log, "text", attempt=None, offset=0)
    assert (latest.attempt, latest.chunks, latest.next_offset, latest.text) == (2, ["Again", "!"], 2, True)
    first = read_stream(log, "text", attempt=1, offset=1)
    assert (first.chunks, first.offset, first.next_offset) == (["lo", " wor"], 1, 3)
    assert read_stream(log, "other", attempt=None, offset=0).text is False
    # The same attempt run again (a worker gave it back): position 0 starts the stream over.
    rerun = [*log, _event(6, "text", 2, 0, ["Once"]), _event(7, "text", 2, 1, [" more"])]
    again = read_stream(rerun, "text", attempt=None, offset=0)
    assert (again.attempt, again.chunks) == (2, ["Once", " more"])
    assert [(s.attempt, s.chunks) for s in streams(rerun) if s.name == "text"] == [(1, 3), (2, 2)]
    nothing = read_stream(log, "missing", attempt=None, offset=0)
    assert nothing.attempt is None and nothing.chunks == []
    assert [(s.name, s.attempt, s.chunks, s.seq) for s in streams(log)] == [
        ("text", 1, 3, 3), ("other", 1, 1, 2), ("text", 2, 2, 5),
    ]  # fmt: skip


def test_a_stream_event_carries_its_chunks_not_the_task() -> None:
    data = orjson.loads(_event(7, "text", 1, 0, ["a"]).to_json())
    assert data["type"] == "task.stream" and data["task_id"] == "t1" and "task" not in data
    assert data["stream"] == {"name": "text", "attempt": 1, "index": 0, "chunks": ["a"], "seq": 7}
    assert not model.matches(["*"], "task.stream") and model.matches(["task.stream"], "task.stream")


def test_a_stream_keeps_each_chunk_once_and_in_order_whatever_a_provider_repeats() -> None:
    record = _running()
    record = record.evolve(external_id="job1")

    def send(r: TaskRecord, index: int, chunks: list[object], **kw: object) -> TaskRecord | None:
        change = model.stream_output(
            r, now=3.0, lease_token=None, external_id="job1", name="text", index=index, chunks=chunks, **kw
        )  # type: ignore[arg-type]
        if change is None:
            return None
        assert orjson.loads(change.snapshot())["index"] == (r.stream_positions or {}).get("text", 0)
        return change.record

    first = send(record, 0, ["a", "b"])
    assert first is not None and first.stream_positions == {"text": 2, "#bytes": 6}
    assert send(first, 0, ["a", "b"]) is None  # the same report again: nothing new
    overlap = model.stream_output(
        first, now=3.0, lease_token=None, external_id="job1", name="text", index=1, chunks=["b", "c"]
    )
    assert overlap is not None and orjson.loads(overlap.snapshot())["chunks"] == ["c"]
    with pytest.raises(StreamGap, match="gap"):
        send(first, 5, ["f"])
    with pytest.raises(InvalidTransition):
        model.stream_output(
            first, now=3.0, lease_token=None, external_id="job0", name="text", index=2, chunks=["x"]
        )
    with pytest.raises(Conflict, match="limit"):
        send(first, 2, ["x" * 100], max_bytes=50)
    # A new attempt starts its streams again.
    pending_again = first.evolve(status=Status.PENDING, lease_token=None)
    retried = model.start_attempt(pending_again, now=6.0, worker_id="w", lease_token="l2", lease_s=30).record
    assert retried.stream_positions is None


def test_a_report_carries_stream_parts_checked_like_everything_it_says() -> None:
    from errands.errors import BadRequest
    from errands.providers import parse_generic

    def report(stream: object) -> dict[str, object]:
        return {"id": "j", "status": "running", "stream": stream}

    update = parse_generic(
        {"id": "j", "status": "running", "stream": {"index": 3, "chunks": ["a", {"k": 1}]}}
    )
    [part] = update.streams
    assert (part.name, part.index, part.chunks) == ("text", 3, ("a", {"k": 1}))
    many = parse_generic(
        {"id": "j", "status": "running", "stream": [{"name": "a", "index": 0, "chunks": []}] * 2}
    )
    assert len(many.streams) == 2
    for bad in [
        {"index": 0},
        {"chunks": ["a"]},
        {"index": "0", "chunks": []},
        {"index": True, "chunks": []},
        {"name": "bad name", "index": 0, "chunks": []},
        {"name": 3, "index": 0, "chunks": []},
        {"index": -1, "chunks": []},
        {"index": 0, "chunks": ["a\x00"]},
        {"index": 0, "chunks": [float("nan")]},
        "text",
        [{"index": 0, "chunks": []}] * 17,
    ]:
        with pytest.raises(BadRequest):
            parse_generic(report(bad))


def test_output_reaches_an_endpoint_only_by_name_with_its_task_and_never_a_hook() -> None:
    from errands import Errands
    from errands.errors import ConfigError
    from errands.notify.policy import payload

    body = orjson.loads(payload(_event(9, "text", 1, 4, ["a"])))
    assert body["type"] == "task.stream"
    assert body["data"] == {
        "task_id": "t1",
        "stream": {"name": "text", "attempt": 1, "index": 4, "chunks": ["a"], "seq": 9},
    }
    app = Errands()
    with pytest.raises(ConfigError, match="output"):
        app.on("task.stream")(lambda event: None)
