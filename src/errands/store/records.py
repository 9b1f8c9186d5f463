"""The records the stores keep besides tasks and events, and the queries they answer. No I/O.

Tasks and events themselves are :class:`errands.model.TaskRecord` and :class:`errands.model.Event`.
Everything here crosses the store boundary in one direction or the other: what a caller asks for
(a query, a new task, a claim) and what comes back (a page, a receipt, a message).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from errands.model import Bound, Event, Status, TaskRecord

# -- tasks ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What remains of a purged task: enough to answer ``410 Gone`` to its owner."""

    id: str
    owner: str
    purged_at: float


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """A page of tasks, newest first. ``owner=None`` means every owner (admins only)."""

    owner: str | None
    status: Status | None = None
    type: str | None = None
    task_id: str | None = None
    limit: int = 50
    before: tuple[float, str] | None = None
    #: Ids that start with this.
    id_prefix: str | None = None
    #: Created in ``[created_after, created_before)``.
    created_after: float | None = None
    created_before: float | None = None


@dataclass(frozen=True, slots=True)
class ClaimSpec:
    """A task type a worker runs and the limits that apply to it (:mod:`errands.model.flow`;
    the registry turns ``concurrency_per_owner`` into one)."""

    type: str
    bounds: tuple[Bound, ...] = ()


class Claimed(list[TaskRecord]):
    """The tasks a claim started; ``retry_at``: when a task a limit held back may be allowed
    (a rate's next start, another claim's count done), if the claim knows it."""

    retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class DueTasks:
    """Ids the sweeper must look at (each is re-checked when its change is applied)."""

    lease_expired: Sequence[str]
    past_deadline: Sequence[str]
    expired: Sequence[str]
    not_started: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one decision applied in a batch: the record, or the error that refused it."""

    record: TaskRecord | None
    error: Exception | None


@dataclass(frozen=True, slots=True)
class SeriesRows:
    """Tasks per step of time (a bucket times ``step_s`` is its start), and recent timings by type."""

    created: Sequence[tuple[int, int]]  # (bucket, count)
    finished: Sequence[tuple[int, str, int]]  # (bucket, status, count)
    waits: Sequence[tuple[str, float]]  # (type, queue wait)
    runs: Sequence[tuple[str, float]]  # (type, run time)


@dataclass(frozen=True, slots=True)
class StatsRows:
    counts: Sequence[tuple[str, str, int]]  # (status, type, count)
    waits_s: Sequence[float]
    runs_s: Sequence[float]


# -- the event log --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogRead:
    """Events read from the log after a seq, in order. ``behind``: committed events exist that
    could not be handed out yet (they wait for an older transaction), so read again soon."""

    events: list[Event]
    behind: bool = False


# -- provider reports ------------------------------------------------------------------------------


class ReportOutcome(enum.StrEnum):
    """What became of a provider's report (a webhook, a capability URL call)."""

    APPLIED = "applied"  # it moved the task
    UNCHANGED = "unchanged"  # it brought nothing new
    DUPLICATE = "duplicate"  # its delivery id was seen before
    LATE = "late"  # the task had moved on
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_TASK = "unknown_task"
    MALFORMED = "malformed"

    @property
    def accepted(self) -> bool:
        """The provider must stop sending it (``2xx``)."""
        return self in _ACCEPTED


_ACCEPTED = frozenset(
    {ReportOutcome.APPLIED, ReportOutcome.UNCHANGED, ReportOutcome.DUPLICATE, ReportOutcome.LATE}
)


@dataclass(frozen=True, slots=True)
class Receipt:
    """One provider report as received, and what became of it (``outcome``)."""

    provider: str
    delivery_id: str | None  # the report's own id (``webhook-id``), for de-duplication
    task_id: str | None
    outcome: ReportOutcome | str
    status_code: int
    received_at: float
    detail: str | None = None


# -- notifications -----------------------------------------------------------------------------------


class Channel(enum.StrEnum):
    """How a message is delivered."""

    ENDPOINT = "endpoint"  # an outbound webhook to a registered endpoint
    URL = "url"  # a task's own notify_url
    HOOK = "hook"  # a lifecycle hook: app code
    WECHAT = "wechat"  # a WeChat subscribe message to the task's owner


class MessageState(enum.StrEnum):
    PENDING = "pending"  # waiting for next_at, or being sent under a lease until then
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an admin asked task events to be sent (outbound webhooks)."""

    id: str
    url: str
    description: str | None
    events: tuple[str, ...]  # event types, or patterns: ``task.*``
    types: tuple[str, ...] | None  # only tasks of these types (None: every type)
    owners: tuple[str, ...] | None  # only tasks of these owners (None: every owner)
    secret: str
    previous_secret: str | None  # still signed with, until ``previous_secret_until``
    previous_secret_until: float | None
    enabled: bool
    disabled_reason: str | None
    failing_since: float | None  # the first failure since the last success
    throttled_until: float | None  # the receiver asked to be left alone until then
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Message:
    """One notification of one event to one destination, delivered at least once.

    ``channel`` says how, ``target`` to whom (the endpoint id, the URL, the hook's or
    template's name). ``id`` is the ``webhook-id``: the same on every attempt. ``final``: the
    message tells of the task's end and counts for ``notification_sent``.
    """

    id: str
    seq: int
    event_type: str
    task_id: str
    owner: str
    task_type: str
    channel: Channel | str
    target: str
    payload: bytes
    final: bool
    state: MessageState | str
    attempts: int
    next_at: float
    created_at: float
    updated_at: float
    last_status: int | None = None
    last_error: str | None = None
    lease_token: str | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at delivering a message, as the delivery log keeps it."""

    message_id: str
    channel: str
    target: str
    task_id: str
    event_type: str
    attempted_at: float
    succeeded: bool
    status_code: int | None
    latency_ms: float
    response: str | None = None  # the start of the receiver's answer
    error: str | None = None  # why it failed, when not an HTTP status
    id: int = 0


@dataclass(frozen=True, slots=True)
class Health:
    """An endpoint's health after an attempt (decided by :func:`errands.notify.policy.health_after`)."""

    failing_since: float | None
    throttled_until: float | None
    disabled_reason: str | None  # not None: this attempt disables the endpoint


#: Decides an endpoint's health from its row as the store just read it under its lock.
HealthDecision = Callable[[Endpoint], Health]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What an attempt leads to, decided by :mod:`errands.notify.policy`, written at once.

    ``lease_token`` fences the write: a sender that lost its claim only adds to the log. For a
    message to an endpoint, ``health`` is run on the endpoint's row under its lock, in the same
    transaction, so two attempts finishing at once cannot overwrite each other's verdict.
    """

    attempt: Attempt
    lease_token: str
    state: MessageState
    next_at: float
    health: HealthDecision | None = None


@dataclass(frozen=True, slots=True)
class MessageQuery:
    task_id: str | None = None
    endpoint_id: str | None = None
    state: str | None = None
    limit: int = 100
