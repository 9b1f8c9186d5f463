"""What the Python SDK's calls answer, typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from errands.model import Task

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One chunk of a task's output stream: its ``value`` (a string, or a JSON value), its
    position in the stream (``index``, from 0 in each attempt) and the ``attempt`` that wrote
    it (a retry starts its streams again: ``index == 0`` with a greater ``attempt``)."""

    name: str
    value: Any
    index: int
    attempt: int

    def __str__(self) -> str:
        return self.value if isinstance(self.value, str) else orjson.dumps(self.value).decode()


def chunks(data: dict[str, Any]) -> list[StreamChunk]:
    part = data["stream"]
    return [
        StreamChunk(part["name"], value, index, part["attempt"])
        for index, value in enumerate(part["chunks"], start=part["index"])
    ]


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One committed change of a task, as the log and the watch streams report it."""

    seq: int
    type: str
    at: str
    task: Task

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskEvent:
        return cls(
            seq=int(data["seq"]), type=str(data["type"]), at=str(data["at"]), task=Task(**data["task"])
        )


@dataclass(frozen=True, slots=True)
class Timing:
    """Percentiles of durations in seconds (``None`` when nothing was measured)."""

    n: int
    p50: float | None
    p95: float | None


@dataclass(frozen=True, slots=True)
class Stats:
    """``GET /v1/stats``: tasks by status and by type, and how long they waited and ran within
    the last ``window_s``; the providers that asked to wait, and until when."""

    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    window_s: float
    queue_wait_s: Timing
    run_time_s: Timing
    providers_held: dict[str, str]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        return cls(
            by_status=dict(data["by_status"]),
            by_type={t: dict(counts) for t, counts in data["by_type"].items()},
            window_s=float(data["window_s"]),
            queue_wait_s=Timing(**data["queue_wait_s"]),
            run_time_s=Timing(**data["run_time_s"]),
            providers_held=dict(data["providers_held"]),
        )


@dataclass(frozen=True, slots=True)
class CreditBalance:
    """An owner's credits: what it may spend, and what its unfinished tasks hold."""

    owner: str
    balance: int
    reserved: int
    updated_at: str | None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One move of an owner's credits, with its balance and reserved credits right after it."""

    id: int
    owner: str
    kind: str
    amount: int
    held: int
    balance: int
    reserved: int
    at: str
    task_id: str | None
    note: str | None


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One owner's tasks of one type submitted on one day (UTC)."""

    day: str
    owner: str
    type: str
    submitted: int
    statuses: dict[str, int]
    credits_charged: int
    credits_reserved: int


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list; pass ``next_after`` as ``after`` for the next (``None``: the last)."""

    items: list[T]
    next_after: Any
