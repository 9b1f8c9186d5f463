"""Notifications: ``/v1/endpoints``, ``/v1/messages`` and the default secret (admins only)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path, Query
from pydantic import BaseModel
from starlette.responses import Response

from errands.api.deps import PrincipalDep, RuntimeDep
from errands.api.tasks import ERRORS
from errands.errors import Forbidden
from errands.inputs import MAX_INT64, TASK_ID_PATTERN
from errands.notify.endpoints import (
    EndpointIn,
    EndpointPatch,
    RecoverIn,
    attempt_out,
    endpoint_out,
    message_out,
)
from errands.store.base import MessageQuery

router = APIRouter(tags=["notifications"], responses=ERRORS)

EndpointId = Annotated[str, Path(pattern=r"^ep_[0-9A-Z]{26}$", description="The endpoint id.")]
MessageId = Annotated[str, Path(pattern=r"^msg_[0-9A-Z]{26}$", description="The message id (webhook-id).")]


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


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.post("/v1/endpoints", status_code=201, response_model=EndpointOut, summary="Register an endpoint")
async def create_endpoint(body: EndpointIn, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """Task events (``events``: ``task.completed``, ``task.*``…; optionally only of some task
    ``types`` or ``owners``) are POSTed to ``url``, signed the Standard Webhooks way with
    ``secret`` (generated when absent, and shown in this answer)."""
    endpoint = await runtime.notify_admin.create(body, principal)
    return _json(endpoint_out(endpoint, with_secret=True), 201)


@router.get("/v1/endpoints", summary="List endpoints")
async def list_endpoints(runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    return _json({"endpoints": [endpoint_out(e) for e in await runtime.notify_admin.all(principal)]})


@router.get("/v1/endpoints/{endpoint_id}", response_model=EndpointOut, summary="Get an endpoint")
async def get_endpoint(endpoint_id: EndpointId, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    return _json(endpoint_out(await runtime.notify_admin.get(endpoint_id, principal)))


@router.patch("/v1/endpoints/{endpoint_id}", response_model=EndpointOut, summary="Change an endpoint")
async def update_endpoint(
    endpoint_id: EndpointId, body: EndpointPatch, runtime: RuntimeDep, principal: PrincipalDep
) -> Response:
    """Change the fields given. ``enabled: false`` pauses it (its pending messages fail; recover
    them later); ``enabled: true`` resumes it. ``rotate_secret: true`` signs with a new secret
    (shown in this answer) and, for ``ERRANDS_NOTIFY_SECRET_GRACE_S``, with the old one too."""
    endpoint = await runtime.notify_admin.update(endpoint_id, body, principal)
    return _json(endpoint_out(endpoint, with_secret=body.rotate_secret))


@router.delete("/v1/endpoints/{endpoint_id}", status_code=204, summary="Delete an endpoint")
async def delete_endpoint(endpoint_id: EndpointId, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    await runtime.notify_admin.delete(endpoint_id, principal)
    return Response(status_code=204)


@router.get("/v1/endpoints/{endpoint_id}/secret", summary="An endpoint's signing secret")
async def endpoint_secret(endpoint_id: EndpointId, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    return _json(await runtime.notify_admin.secret(endpoint_id, principal))


@router.get("/v1/endpoints/{endpoint_id}/attempts", summary="An endpoint's delivery log")
async def endpoint_attempts(
    endpoint_id: EndpointId,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    status: Literal["succeeded", "failed"] | None = None,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_INT64, description="Only attempts older than this id.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """Every attempt (time, status code, latency, the start of the answer), newest first."""
    attempts = await runtime.notify_admin.attempts(
        endpoint_id, principal, status=status, before=before, limit=limit
    )
    next_before = attempts[-1].id if len(attempts) == limit else None
    return _json({"attempts": [attempt_out(a) for a in attempts], "next_before": next_before})


@router.post("/v1/endpoints/{endpoint_id}/recover", summary="Resend what failed since a time")
async def recover_endpoint(
    endpoint_id: EndpointId, body: RecoverIn, runtime: RuntimeDep, principal: PrincipalDep
) -> Response:
    """Every message to this endpoint that was given up on and was created since ``since`` is
    sent again, on a fresh retry schedule."""
    count = await runtime.notify_admin.recover(endpoint_id, body.since, principal)
    if runtime.notifier is not None:
        runtime.notifier.wake()
    return _json({"recovered": count})


@router.get("/v1/messages", summary="List messages")
async def list_messages(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    task_id: Annotated[str | None, Query(pattern=TASK_ID_PATTERN)] = None,
    endpoint_id: Annotated[str | None, Query(pattern=r"^ep_[0-9A-Z]{26}$")] = None,
    state: Literal["pending", "delivered", "failed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """Notifications (one per event and destination), newest first."""
    query = MessageQuery(task_id=task_id, endpoint_id=endpoint_id, state=state, limit=limit)
    messages = await runtime.notify_admin.messages(query, principal)
    return _json({"messages": [message_out(m) for m in messages]})


@router.get("/v1/messages/{message_id}", summary="A message and its attempts")
async def get_message(message_id: MessageId, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    message, attempts = await runtime.notify_admin.message(message_id, principal)
    return _json({**message_out(message), "attempt_log": [attempt_out(a) for a in attempts]})


@router.post("/v1/messages/{message_id}/resend", response_model=MessageOut, summary="Send a message again")
async def resend_message(message_id: MessageId, runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """Deliver a delivered or failed message once more, now, with the same ``webhook-id``."""
    message = await runtime.notify_admin.resend(message_id, principal)
    if runtime.notifier is not None:
        runtime.notifier.wake()
    return _json(message_out(message))


@router.get("/v1/notify/secret", summary="The secret tasks' notify_url calls are signed with")
async def notify_secret(runtime: RuntimeDep, principal: PrincipalDep) -> Response:
    """``ERRANDS_NOTIFY_SECRET``, or the one generated at first start and kept in the database."""
    if not principal.admin:
        raise Forbidden("Only an admin may read the notification secret.")
    return _json({"secret": runtime.notify_secret})
