"""Notifications: ``/v1/endpoints``, ``/v1/messages`` and the default secret (admins only)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from errands.api.routing import Call, PathParam, Route
from errands.api.schemas import (
    AttemptPage,
    EndpointOut,
    EndpointPage,
    MessageOut,
    MessagePage,
    MessageWithAttempts,
    Recovered,
    SecretOut,
)
from errands.errors import Forbidden
from errands.inputs import MAX_INT64, TASK_ID_PATTERN
from errands.notify.endpoints import (
    ENDPOINT_ID_PATTERN,
    MESSAGE_ID_PATTERN,
    EndpointIn,
    EndpointPatch,
    RecoverIn,
    attempt_out,
    endpoint_out,
    message_out,
)
from errands.store.records import MessageQuery

ENDPOINT_ID = PathParam("endpoint_id", ENDPOINT_ID_PATTERN, "The endpoint id.")
MESSAGE_ID = PathParam("message_id", MESSAGE_ID_PATTERN, "The message id (its webhook-id).")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class AttemptsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["succeeded", "failed"] | None = None
    before: Annotated[
        int | None, Field(ge=1, le=MAX_INT64, description="Only attempts older than this id.")
    ] = None
    limit: Annotated[int, Field(ge=1, le=500)] = 100


class MessagesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: Annotated[str, Field(pattern=TASK_ID_PATTERN)] | None = None
    endpoint_id: Annotated[str, Field(pattern=ENDPOINT_ID_PATTERN)] | None = None
    state: Literal["pending", "delivered", "failed"] | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 100


async def create_endpoint(call: Call) -> Response:
    """Task events (``events``: ``task.completed``, ``task.*``…; optionally only of some task
    ``types`` or ``owners``) are POSTed to ``url``, signed the Standard Webhooks way with
    ``secret`` (generated when absent, and shown in this answer)."""
    endpoint = await call.runtime.notify_admin.create(await call.json(EndpointIn), call.principal)
    return _json(endpoint_out(endpoint, with_secret=True), 201)


async def list_endpoints(call: Call) -> Response:
    """Every endpoint, with its health (failing since, throttled until, disabled)."""
    endpoints = await call.runtime.notify_admin.all(call.principal)
    return _json({"endpoints": [endpoint_out(e) for e in endpoints]})


async def get_endpoint(call: Call) -> Response:
    """One endpoint and its health."""
    return _json(
        endpoint_out(await call.runtime.notify_admin.get(call.path_params["endpoint_id"], call.principal))
    )


async def update_endpoint(call: Call) -> Response:
    """Change the fields given. ``enabled: false`` pauses it (its pending messages fail; recover
    them later); ``enabled: true`` resumes it. ``rotate_secret: true`` signs with a new secret
    (shown in this answer) and, for ``ERRANDS_NOTIFY_SECRET_GRACE_S``, with the old one too."""
    body = await call.json(EndpointPatch)
    endpoint = await call.runtime.notify_admin.update(call.path_params["endpoint_id"], body, call.principal)
    return _json(endpoint_out(endpoint, with_secret=body.rotate_secret))


async def delete_endpoint(call: Call) -> Response:
    """Delete the endpoint; its pending messages fail."""
    await call.runtime.notify_admin.delete(call.path_params["endpoint_id"], call.principal)
    return Response(status_code=204)


async def endpoint_secret(call: Call) -> Response:
    """The secret messages to this endpoint are signed with (and until when the previous one is
    still used beside it, after a rotation)."""
    return _json(await call.runtime.notify_admin.secret(call.path_params["endpoint_id"], call.principal))


async def endpoint_attempts(call: Call) -> Response:
    """Every attempt (time, status code, latency, the start of the answer), newest first."""
    q = call.query(AttemptsQuery)
    attempts = await call.runtime.notify_admin.attempts(
        call.path_params["endpoint_id"], call.principal, status=q.status, before=q.before, limit=q.limit
    )
    next_before = attempts[-1].id if len(attempts) == q.limit else None
    return _json({"attempts": [attempt_out(a) for a in attempts], "next_before": next_before})


async def recover_endpoint(call: Call) -> Response:
    """Every message to this endpoint that was given up on and was created since ``since`` is
    sent again, on a fresh retry schedule."""
    body = await call.json(RecoverIn)
    count = await call.runtime.notify_admin.recover(
        call.path_params["endpoint_id"], body.since, call.principal
    )
    if call.runtime.notifier is not None:
        call.runtime.notifier.wake()
    return _json({"recovered": count})


async def list_messages(call: Call) -> Response:
    """Notifications (one per event and destination), newest first."""
    q = call.query(MessagesQuery)
    query = MessageQuery(task_id=q.task_id, endpoint_id=q.endpoint_id, state=q.state, limit=q.limit)
    messages = await call.runtime.notify_admin.messages(query, call.principal)
    return _json({"messages": [message_out(m) for m in messages]})


async def get_message(call: Call) -> Response:
    """A message and its attempt log."""
    message, attempts = await call.runtime.notify_admin.message(
        call.path_params["message_id"], call.principal
    )
    return _json({**message_out(message), "attempt_log": [attempt_out(a) for a in attempts]})


async def resend_message(call: Call) -> Response:
    """Deliver a delivered or failed message once more, now, with the same ``webhook-id``."""
    message = await call.runtime.notify_admin.resend(call.path_params["message_id"], call.principal)
    if call.runtime.notifier is not None:
        call.runtime.notifier.wake()
    return _json(message_out(message))


async def notify_secret(call: Call) -> Response:
    """``ERRANDS_NOTIFY_SECRET``, or the one generated at first start and kept in the database:
    tasks' ``notify_url`` calls are signed with it."""
    if not call.principal.admin:
        raise Forbidden("Only an admin may read the notification secret.")
    return _json({"secret": call.runtime.notify_secret})


_ADMIN = (401, 403, 404, 422)
_TAG = "notifications"
_ONE = "/v1/endpoints/{endpoint_id}"

ROUTES = [
    Route(
        "POST",
        "/v1/endpoints",
        create_endpoint,
        "Register an endpoint",
        _TAG,
        status=201,
        body=EndpointIn,
        response=EndpointOut,
        errors=(400, 401, 403, 413, 422),
    ),
    Route(
        "GET",
        "/v1/endpoints",
        list_endpoints,
        "List endpoints",
        _TAG,
        response=EndpointPage,
        errors=(401, 403),
    ),
    Route(
        "GET",
        _ONE,
        get_endpoint,
        "Get an endpoint",
        _TAG,
        path_params=(ENDPOINT_ID,),
        response=EndpointOut,
        errors=_ADMIN,
    ),
    Route(
        "PATCH",
        _ONE,
        update_endpoint,
        "Change an endpoint",
        _TAG,
        path_params=(ENDPOINT_ID,),
        body=EndpointPatch,
        response=EndpointOut,
        errors=(400, *_ADMIN, 413),
    ),
    Route(
        "DELETE",
        _ONE,
        delete_endpoint,
        "Delete an endpoint",
        _TAG,
        status=204,
        path_params=(ENDPOINT_ID,),
        errors=_ADMIN,
    ),
    Route(
        "GET",
        f"{_ONE}/secret",
        endpoint_secret,
        "An endpoint's signing secret",
        _TAG,
        path_params=(ENDPOINT_ID,),
        response=SecretOut,
        errors=_ADMIN,
    ),
    Route(
        "GET",
        f"{_ONE}/attempts",
        endpoint_attempts,
        "An endpoint's delivery log",
        _TAG,
        path_params=(ENDPOINT_ID,),
        query=AttemptsQuery,
        response=AttemptPage,
        errors=_ADMIN,
    ),
    Route(
        "POST",
        f"{_ONE}/recover",
        recover_endpoint,
        "Resend what failed since a time",
        _TAG,
        path_params=(ENDPOINT_ID,),
        body=RecoverIn,
        response=Recovered,
        errors=(400, *_ADMIN, 409, 413),
    ),
    Route(
        "GET",
        "/v1/messages",
        list_messages,
        "List messages",
        _TAG,
        query=MessagesQuery,
        response=MessagePage,
        errors=(401, 403, 422),
    ),
    Route(
        "GET",
        "/v1/messages/{message_id}",
        get_message,
        "A message and its attempts",
        _TAG,
        path_params=(MESSAGE_ID,),
        response=MessageWithAttempts,
        errors=_ADMIN,
    ),
    Route(
        "POST",
        "/v1/messages/{message_id}/resend",
        resend_message,
        "Send a message again",
        _TAG,
        path_params=(MESSAGE_ID,),
        response=MessageOut,
        errors=(*_ADMIN, 409),
    ),
    Route(
        "GET",
        "/v1/notify/secret",
        notify_secret,
        "The secret tasks' notify_url calls are signed with",
        _TAG,
        response=SecretOut,
        errors=(401, 403),
    ),
]
