"""One attempt of a task held by a worker, and what runs it (a handler or a provider)."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from errands.context import TaskContext
from errands.model import TaskRecord
from errands.registry import TaskType
from errands.store.base import Decision
from errands.worker.progress import Progress
from errands.worker.streams import Streams


class StopReason(enum.StrEnum):
    """Why a worker stopped an attempt before its end."""

    LOST = "lost"  # the lease is gone: the task timed out, or was requeued after this process stalled
    CANCELLED = "cancelled"  # the task was cancelled
    SHUTDOWN = "shutdown"  # this worker is stopping: the task goes back to the queue


@dataclass(eq=False)
class Held:
    """A task this worker runs, under its lease, and the state of the attempt."""

    record: TaskRecord
    task_type: TaskType
    ctx: TaskContext
    progress: Progress
    streams: Streams
    handler: asyncio.Future[Any] | None = None
    stop_reason: StopReason | None = None
    finished: bool = False
    started_at: float = field(default_factory=time.monotonic)
    #: The row as this worker last wrote it (its claim, then its progress and streams): what
    #: its outcome may be decided on (``Tasks.apply``'s ``seen``).
    latest: TaskRecord | None = None

    def wrote(self, record: TaskRecord) -> None:
        if self.latest is None or record.seq > self.latest.seq:
            self.latest = record


@dataclass(frozen=True, slots=True)
class Ended:
    """How an attempt ended, for its executor to decide the outcome of: the future that ran it
    (done), and the latest progress it reported."""

    future: asyncio.Future[Any]
    progress: int | None
    message: str | None
    now: float


class Executor(Protocol):
    """Runs attempts of tasks one way: a local handler, or a submission to a provider."""

    def begin(self, held: Held) -> asyncio.Future[Any]:
        """Start the attempt."""

    def limit_s(self, held: Held) -> float:
        """How long the attempt may take here."""

    def timed_out(self, held: Held, progress: int | None, message: str | None, limit_s: float) -> Decision:
        """The outcome of an attempt that did not end within :meth:`limit_s`."""

    def ended(self, held: Held, ended: Ended) -> Decision:
        """The outcome of an attempt whose future is done (not cancelled)."""
