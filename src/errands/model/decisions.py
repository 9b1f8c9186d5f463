"""The decisions: every change of a task, as a pure function. No I/O.

Each takes the current :class:`TaskRecord` and returns a :class:`Change` (the record after the
change and the event it produces) or raises without side effect. The stores apply a change and
append its event in one transaction; because the decision sees the row the store just read under
its write lock, every transition is a compare-and-set on the status and on the lease that proves
who is speaking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from errands.errors import Conflict, InvalidTransition, LeaseLost, StreamGap
from errands.model.streams import BYTES_KEY, MAX_STREAMS
from errands.model.task import (
    TERMINAL_EVENT,
    Change,
    EventType,
    NewTask,
    Status,
    TaskError,
    TaskRecord,
    can_move,
)


def _move(record: TaskRecord, status: Status, now: float, **fields: Any) -> TaskRecord:
    if not can_move(record.status, status):
        raise InvalidTransition(f"A {record.status.value} task cannot become {status.value}.")
    return record.evolve(status=status, updated_at=now, **fields)


def _require_lease(record: TaskRecord, lease_token: str) -> None:
    if record.status is not Status.PROCESSING or record.lease_token != lease_token:
        raise LeaseLost()


_NO_LEASE: dict[str, Any] = {
    "lease_token": None,
    "lease_expires_at": None,
    "deadline_at": None,
    "worker_id": None,
    "poll_at": None,
}


def create(new: NewTask, *, now: float) -> TaskRecord:
    """The record of a task as it is created (``seq`` is set when its event is written). A
    delayed task waits, pending, until it is due; it expires ``expires_in_s`` after that."""
    due = now + new.delay_s if new.run_at is None else max(now, new.run_at)
    return TaskRecord(
        id=new.id,
        type=new.type,
        owner=new.owner,
        status=Status.PENDING,
        input=new.input,
        priority=new.priority,
        max_attempts=new.max_attempts,
        timeout_s=new.timeout_s,
        created_at=now,
        updated_at=now,
        expires_at=due + new.expires_in_s,
        fingerprint=new.fingerprint,
        run_after=due,
        queued_at=due,
        notify_url=new.notify_url,
        start_by=None if new.start_within_s is None else due + new.start_within_s,
        key=new.key,
        debounce_key=new.debounce_key,
        cost=new.cost,
    )


def start_attempt(
    record: TaskRecord,
    *,
    now: float,
    worker_id: str,
    lease_token: str,
    lease_s: float,
    callback_nonce: str | None = None,
) -> Change:
    """pending → processing under a new lease; the attempt counter goes up by one."""
    if record.status is not Status.PENDING or record.run_after > now or too_late_to_start(record, now):
        raise InvalidTransition("The task is not ready to run.")
    new = _move(
        record,
        Status.PROCESSING,
        now,
        attempt=record.attempt + 1,
        started_at=now,
        progress=0,
        message=None,
        error=None,
        lease_token=lease_token,
        lease_expires_at=now + lease_s,
        deadline_at=now + record.timeout_s,
        worker_id=worker_id,
        external_id=None,
        poll_at=None,
        callback_nonce=callback_nonce,
        stream_positions=None,  # a new attempt starts its streams again
    )
    return Change(new, EventType.PROCESSING)


def report_progress(
    record: TaskRecord, *, now: float, lease_token: str, progress: int | None, message: str | None
) -> Change | None:
    """A progress report from the worker holding the lease; ``None`` when nothing changes.

    Progress never goes backwards within an attempt: a lower value keeps the higher one.
    """
    _require_lease(record, lease_token)
    new_progress = record.progress if progress is None else max(record.progress, progress)
    new_message = record.message if message is None else message
    if new_progress == record.progress and new_message == record.message:
        return None
    return Change(
        _move(record, Status.PROCESSING, now, progress=new_progress, message=new_message),
        EventType.PROGRESS,
    )


def stream_output(
    record: TaskRecord,
    *,
    now: float,
    lease_token: str | None,
    name: str,
    index: int,
    chunks: Sequence[Any],
    external_id: str | None = None,
    max_bytes: int | None = None,
) -> Change | None:
    """Chunks of the running attempt's stream ``name``, the first of them its ``index``-th (from
    0 in each attempt), from the worker holding the lease (``lease_token``), or from a provider
    about the task's current job (``lease_token=None``, ``external_id``): an attempt that lost
    its lease, or a report about another job, writes none.

    Each chunk lands once and in order: chunks the stream already holds are dropped (``None``
    when nothing is new), and chunks that would leave a gap are refused (:class:`StreamGap`:
    the missing ones must come first). ``max_bytes``: what the attempt's streams may hold in all.
    """
    if lease_token is not None:
        _require_lease(record, lease_token)
    elif record.status is not Status.PROCESSING:
        raise InvalidTransition(f"The task is already {record.status.value}.")
    elif external_id is not None and record.external_id != external_id:
        raise InvalidTransition("The report is about another job than the task's current one.")
    positions = dict(record.stream_positions or {})
    expected = positions.get(name, 0)
    if index > expected:
        raise StreamGap(f"Stream {name!r} holds {expected} chunks: chunk {index} would leave a gap.")
    fresh = list(chunks)[expected - index :]
    if not fresh:
        return None
    if name not in positions and len(positions) - (BYTES_KEY in positions) >= MAX_STREAMS:
        raise Conflict(f"A task may write at most {MAX_STREAMS} streams.")
    encoded = orjson.dumps(fresh)  # "[" + the chunks joined by "," + "]"
    size = len(encoded) - 1 - len(fresh) + positions.get(BYTES_KEY, 0)
    if max_bytes is not None and size > max_bytes:
        raise Conflict(f"The task's streams would exceed their limit of {max_bytes} bytes.")
    positions[name] = expected + len(fresh)
    positions[BYTES_KEY] = size
    payload = b'{"name":%s,"attempt":%d,"index":%d,"chunks":%s,"seq":0}' % (
        orjson.dumps(name),
        record.attempt,
        expected,
        encoded,
    )
    return Change(record.evolve(updated_at=now, stream_positions=positions), EventType.STREAM, payload)


def complete(
    record: TaskRecord, *, now: float, lease_token: str | None, result: Any, message: str | None = None
) -> Change:
    """processing → completed. ``lease_token=None`` is for external tasks, which hold no lease."""
    if lease_token is not None:
        _require_lease(record, lease_token)
    new = _move(
        record,
        Status.COMPLETED,
        now,
        result=result,
        error=None,
        progress=100,
        message=record.message if message is None else message,
        finished_at=now,
        **_NO_LEASE,
    )
    return Change(new, EventType.COMPLETED)


def fail_attempt(
    record: TaskRecord,
    *,
    now: float,
    lease_token: str | None,
    error: TaskError,
    retry: bool,
    retry_delay_s: float,
    final_status: Status = Status.FAILED,
    progress: int | None = None,
    message: str | None = None,
) -> Change:
    """End an attempt that did not succeed.

    While attempts remain and ``retry`` is true the task goes back to ``pending`` and becomes
    claimable after ``retry_delay_s``; otherwise it ends in ``final_status`` (``failed`` or
    ``timeout``) with ``error``.
    """
    if lease_token is not None:
        _require_lease(record, lease_token)
    elif record.status is not Status.PROCESSING:
        raise InvalidTransition(f"A {record.status.value} task has no attempt to end.")
    kept = {
        "progress": record.progress if progress is None else max(record.progress, progress),
        "message": record.message if message is None else message,
    }
    if retry and record.attempt < record.max_attempts:
        run_after = now + max(0.0, retry_delay_s)
        new = _move(
            record,
            Status.PENDING,
            now,
            error=error,
            run_after=run_after,
            queued_at=run_after,
            **kept,
            **_NO_LEASE,
        )
        return Change(new, EventType.RETRYING)
    if final_status not in (Status.FAILED, Status.TIMEOUT):
        raise ValueError("an attempt can only end failed or timeout")
    new = _move(record, final_status, now, error=error, finished_at=now, **kept, **_NO_LEASE)
    return Change(new, TERMINAL_EVENT[final_status])


def hand_off(record: TaskRecord, *, now: float, lease_token: str, external_id: str, poll_at: float) -> Change:
    """A provider accepted the task: it stays processing, now without a lease, until the
    provider reports back (or is polled at ``poll_at``). The attempt's deadline still holds."""
    _require_lease(record, lease_token)
    new = _move(
        record,
        Status.PROCESSING,
        now,
        external_id=external_id,
        message=record.message or "submitted to the provider",
        lease_token=None,
        lease_expires_at=None,
        worker_id=None,
        poll_at=poll_at,
    )
    return Change(new, EventType.PROGRESS)


def external_report(
    record: TaskRecord,
    *,
    now: float,
    external_id: str | None,
    status: str,
    progress: int | None = None,
    message: str | None = None,
    result: Any = None,
    error: TaskError | None = None,
    by_webhook: bool = False,
) -> Change | None:
    """A provider's report (``status``: running, completed or failed) on the job of a task.

    Only a processing task moves, and only for its current job (``external_id``, when given):
    a late report (after the task ended) or one for an older job raises and changes nothing.
    ``None`` when a running report brings nothing new.
    """
    if record.status is not Status.PROCESSING:
        raise InvalidTransition(f"The task is already {record.status.value}.")
    if external_id is not None and record.external_id != external_id:
        raise InvalidTransition("The report is about another job than the task's current one.")
    flag = {"webhook_received": True} if by_webhook and not record.webhook_received else {}
    if status == "running":
        new_progress = record.progress if progress is None else max(record.progress, progress)
        new_message = record.message if message is None else message
        if new_progress == record.progress and new_message == record.message and not flag:
            return None
        new = _move(record, Status.PROCESSING, now, progress=new_progress, message=new_message, **flag)
        return Change(new, EventType.PROGRESS)
    if status == "completed":
        change = complete(record, now=now, lease_token=None, result=result, message=message)
    elif status == "failed":
        failure = error or TaskError("provider_failed", "The provider reported a failure.")
        change = fail_attempt(record, now=now, lease_token=None, error=failure, retry=False, retry_delay_s=0)
    else:
        raise ValueError(f"unknown report status {status!r}")
    return Change(change.record.evolve(**flag), change.event) if flag else change


def release(
    record: TaskRecord,
    *,
    now: float,
    lease_token: str,
    until: float | None = None,
    message: str | None = None,
) -> Change:
    """Give a task back unfinished, pending again with the attempt not counted: a worker shutting
    down (claimable at once), or a provider that asked to wait (back-pressure: claimable at
    ``until``, with ``message`` saying why; no attempt of ``max_attempts`` is spent on a quota)."""
    _require_lease(record, lease_token)
    due = now if until is None else max(now, until)
    new = _move(
        record,
        Status.PENDING,
        now,
        attempt=max(0, record.attempt - 1),
        run_after=due,
        queued_at=due,
        **({} if message is None else {"message": message}),
        **_NO_LEASE,
    )
    return Change(new, EventType.RETRYING)


def cancel(record: TaskRecord, *, now: float) -> Change:
    """pending|processing → cancelled. A worker still running it loses its lease with this."""
    if record.status.terminal:
        raise InvalidTransition(f"The task is already {record.status.value}.")
    new = _move(
        record,
        Status.CANCELLED,
        now,
        error=TaskError("cancelled", "The task was cancelled."),
        finished_at=now,
        **_NO_LEASE,
    )
    return Change(new, EventType.CANCELLED)


def manual_retry(record: TaskRecord, *, now: float, max_manual_retries: int) -> Change:
    """failed|timeout → pending, at most ``max_manual_retries`` times; grants one more attempt.
    A ``start_by`` is dropped: retrying a task that did not start in time asks for it now."""
    if record.status not in (Status.FAILED, Status.TIMEOUT):
        raise InvalidTransition(
            f"Only a failed or timed-out task can be retried; this one is {record.status}."
        )
    if record.manual_retries >= max_manual_retries:
        raise Conflict(
            f"The task was already retried {record.manual_retries} times, the most allowed.",
            code="retry_limit",
        )
    new = _move(
        record,
        Status.PENDING,
        now,
        manual_retries=record.manual_retries + 1,
        max_attempts=max(record.max_attempts, record.attempt + 1),
        notification_sent=False,
        run_after=now,
        queued_at=now,
        finished_at=None,
        start_by=None,
        **_NO_LEASE,
    )
    return Change(new, EventType.RETRYING)


def mark_notified(record: TaskRecord, *, now: float, seq: int) -> Change | None:
    """Every notification of the end whose event is ``seq`` was delivered: ``notification_sent``.

    ``None`` when there is nothing to mark: already marked, or the task moved on since that end
    (a manual retry), whose own end will be notified in turn.
    """
    if record.notification_sent or not record.status.terminal or record.seq != seq:
        return None
    return Change(record.evolve(notification_sent=True, updated_at=now), EventType.NOTIFIED)


def expire(record: TaskRecord, *, now: float) -> Change:
    """An unfinished task past ``expires_at`` ends ``timeout``."""
    if record.status.terminal or record.expires_at > now:
        raise InvalidTransition("The task has not expired.")
    new = _move(
        record,
        Status.TIMEOUT,
        now,
        error=TaskError("expired", "The task did not finish before it expired."),
        finished_at=now,
        **_NO_LEASE,
    )
    return Change(new, EventType.TIMEOUT)


NOT_STARTED = TaskError("not_started", "The task was not started in time (start_within_s).")


def too_late_to_start(record: TaskRecord, now: float) -> bool:
    """Whether a task never started has passed its ``start_by``: it may no longer start."""
    return record.started_at is None and record.start_by is not None and record.start_by < now


def not_started(record: TaskRecord, *, now: float) -> Change:
    """A pending task never started by its ``start_by`` ends ``timeout`` (code ``not_started``)."""
    if record.status is not Status.PENDING or not too_late_to_start(record, now):
        raise InvalidTransition("The task may still start.")
    return Change(_move(record, Status.TIMEOUT, now, error=NOT_STARTED, finished_at=now), EventType.TIMEOUT)


def debounce(record: TaskRecord, *, now: float, by: str) -> Change:
    """A pending task replaced by a newer one with the same ``debounce_key`` ends ``cancelled``
    (code ``debounced``); one that started already runs on."""
    if record.status is not Status.PENDING:
        raise InvalidTransition("The task has started: it is not replaced.")
    error = TaskError("debounced", f"Replaced by task {by}, submitted later with the same debounce_key.")
    return Change(_move(record, Status.CANCELLED, now, error=error, finished_at=now), EventType.CANCELLED)


def backoff_s(attempt: int, *, base_s: float, cap_s: float, jitter: float) -> float:
    """Exponential backoff for the retry after ``attempt`` (1-based), with ``jitter`` in [0, 1).

    The delay is ``base · 2^(attempt-1)`` capped at ``cap_s``, then spread over its upper half so
    retries of tasks that failed together do not arrive together.
    """
    ceiling = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return float(ceiling * (0.5 + 0.5 * jitter))
