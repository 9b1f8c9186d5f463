"""The shapes of the API's answers, for the OpenAPI document (the endpoints render JSON
themselves, from records, in these shapes; tests check that they agree)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from errands.model import Task


class ErrorOut(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every failure: ``{"error": {"code", "message"}}``."""

    error: ErrorOut


class TaskPage(BaseModel):
    tasks: list[Task]
    next_cursor: str | None


class EventOut(BaseModel):
    seq: int
    type: str
    at: str
    task: Task


class EventPage(BaseModel):
    events: list[EventOut]


class Outcome(BaseModel):
    """What became of a webhook: the provider should stop sending it in every case."""

    outcome: str


class TokenOut(BaseModel):
    token: str
    owner: str
    scopes: list[str]
    task_id: str | None
    expires_at: str


class Summary(BaseModel):
    n: int
    p50: float | None
    p95: float | None


class StatsOut(BaseModel):
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    window_s: float
    queue_wait_s: Summary
    run_time_s: Summary
    providers_held: dict[str, str]


class Health(BaseModel):
    status: str


class CountOut(BaseModel):
    count: int
    by_status: dict[str, int] | None = None


class BulkOut(BaseModel):
    done: int
    skipped: int
    next_cursor: str | None


class SeriesBucket(BaseModel):
    at: str
    submitted: int
    completed: int
    failed: int


class SeriesOut(BaseModel):
    window_s: int
    step_s: int
    buckets: list[SeriesBucket]
    by_type: dict[str, dict[str, Summary]]


class Readiness(BaseModel):
    ready: bool
    #: Only for the admin key.
    problems: list[str] | None = None
    loops: dict[str, bool] | None = None


class DeliveryOut(BaseModel):
    provider: str
    delivery_id: str | None
    task_id: str | None
    outcome: str
    status_code: int
    received_at: str = Field(description="When it came (RFC 3339, UTC).")
    detail: str | None


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryOut]


class EndpointOut(BaseModel):
    id: str
    url: str
    description: str | None
    events: list[str]
    types: list[str] | None
    owners: list[str] | None
    enabled: bool
    disabled_reason: str | None
    failing_since: str | None
    throttled_until: str | None
    created_at: str
    updated_at: str
    secret: str | None = None


class EndpointPage(BaseModel):
    endpoints: list[EndpointOut]


class SecretOut(BaseModel):
    secret: str
    previous_secret_valid_until: str | None = None


class AttemptOut(BaseModel):
    id: int
    message_id: str
    channel: str
    target: str
    task_id: str
    event_type: str
    attempted_at: str
    status: str
    status_code: int | None
    latency_ms: float
    response: str | None
    error: str | None


class AttemptPage(BaseModel):
    attempts: list[AttemptOut]
    next_before: int | None


class MessageOut(BaseModel):
    id: str
    event_type: str
    seq: int
    task_id: str
    owner: str
    channel: str
    target: str
    state: str
    attempts: int
    next_attempt_at: str | None
    last_status: int | None
    last_error: str | None
    created_at: str
    updated_at: str
    payload: dict[str, Any]


class MessageWithAttempts(MessageOut):
    attempt_log: list[AttemptOut]


class MessagePage(BaseModel):
    messages: list[MessageOut]


class Recovered(BaseModel):
    recovered: int
