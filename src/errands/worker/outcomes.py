"""How an attempt ends, as decisions for the store: retried or ended, with what error.

Both executors (a local handler, an external provider) end their attempts through these, so a
retry means the same thing whoever ran the task.
"""

from __future__ import annotations

from dataclasses import dataclass

from errands import model
from errands.model import Status, TaskError, TaskRecord
from errands.store.base import Decision

INTERNAL_ERROR = TaskError("internal_error", "The task failed because of an internal error.")


@dataclass(frozen=True, slots=True)
class Backoff:
    """The retry delays of a process (``ERRANDS_RETRY_BASE_S``, ``ERRANDS_RETRY_CAP_S``)."""

    base_s: float
    cap_s: float

    def delay_s(self, attempt: int, jitter: float) -> float:
        return model.backoff_s(attempt, base_s=self.base_s, cap_s=self.cap_s, jitter=jitter)


def retry_or_end(
    record: TaskRecord,
    error: TaskError,
    *,
    now: float,
    delay_s: float,
    progress: int | None = None,
    message: str | None = None,
    final: Status = Status.FAILED,
    retry: bool = True,
) -> Decision:
    """Another attempt after ``delay_s`` while attempts remain (and ``retry``), else the end
    (``final``)."""
    token = record.lease_token
    return lambda r: model.fail_attempt(
        r,
        now=now,
        lease_token=token,
        error=error,
        retry=retry,
        retry_delay_s=delay_s,
        final_status=final,
        progress=progress,
        message=message,
    )


def end(
    record: TaskRecord, error: TaskError, *, now: float, progress: int | None, message: str | None
) -> Decision:
    """The end at once (``failed``), whatever attempts remain."""
    return retry_or_end(record, error, now=now, delay_s=0, progress=progress, message=message, retry=False)
