"""Output streams as the log holds them: ``task.stream`` events folded into what a reader asks
for (one stream of one attempt, from a position). No I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from errands.model.task import Event, EventType

#: Which events a reader wants, as to output: ``none`` (no ``task.stream`` events), ``include``
#: (them and every other event), ``only`` (them, and the events that end the task).
StreamChoice = Literal["include", "only", "none"]
#: How many streams one attempt may write.
MAX_STREAMS = 16
#: The key of ``TaskRecord.stream_positions`` that counts the bytes (stream names cannot be it).
BYTES_KEY = "#bytes"


@dataclass(frozen=True, slots=True)
class StreamPart:
    """Chunks for one stream, the first at position ``index`` (a provider's report carries
    these; positions make a repeated or overlapping report land once)."""

    name: str
    index: int
    chunks: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One stream of one attempt, as far as it has been written."""

    name: str
    attempt: int
    chunks: int
    bytes: int
    seq: int  # the seq of its latest event

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "attempt": self.attempt,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "seq": self.seq,
        }


@dataclass(slots=True)
class StreamRead:
    """The chunks of stream ``name`` of ``attempt`` from ``offset`` on (positions count from 0
    in each attempt); ``seq`` is the last event the read covered: a watch resumed after it
    receives exactly what came next."""

    name: str
    attempt: int | None
    offset: int
    chunks: list[Any] = field(default_factory=list)
    seq: int = 0

    @property
    def next_offset(self) -> int:
        return self.offset + len(self.chunks)

    @property
    def text(self) -> bool:
        return all(isinstance(c, str) for c in self.chunks)


def parts(events: Iterable[Event]) -> Iterable[tuple[Event, dict[str, Any]]]:
    """The stream events among ``events``, each with what it carries."""
    for event in events:
        if event.type is EventType.STREAM:
            yield event, orjson.loads(event.task_json)


def streams(events: Iterable[Event]) -> list[StreamInfo]:
    """Every stream of every attempt, in the order each began."""
    found: dict[tuple[str, int], StreamInfo] = {}
    for event, part in parts(events):
        key = (part["name"], part["attempt"])
        size = sum(len(orjson.dumps(c)) for c in part["chunks"])
        was = None if part["index"] == 0 else found.get(key)  # position 0: the stream starts again
        count, total = (0, 0) if was is None else (was.chunks, was.bytes)
        found[key] = StreamInfo(key[0], key[1], count + len(part["chunks"]), total + size, event.seq)
    return list(found.values())


def read_stream(events: Iterable[Event], name: str, *, attempt: int | None, offset: int) -> StreamRead:
    """Fold ``events`` (a task's, in seq order) into one stream's chunks. ``attempt=None``: the
    latest attempt that wrote to it. A part at position 0 starts the stream again, replacing
    what came before: a retry's attempt, or the same attempt run again after a worker gave it
    back (the store keeps each position once per run, so 0 is only ever a run's first part)."""
    read = StreamRead(name, attempt, offset)
    for _, part in parts(events):
        if part["name"] != name or (attempt is not None and part["attempt"] != attempt):
            continue
        if part["attempt"] != read.attempt or part["index"] == 0:
            read.attempt, read.chunks = part["attempt"], []
        start = part["index"]
        for i, chunk in enumerate(part["chunks"], start=start):
            if i >= offset:
                read.chunks.append(chunk)
    return read
