"""Inbound webhooks: providers report on the tasks they run.

* ``POST /v1/hooks/{provider}``: a signed webhook (Standard Webhooks by default), tied to its
  task by the provider's job id;
* ``POST /v1/hooks/callback/{token}``: a task's capability URL, for services that cannot sign;
  the token is valid for that task's current attempt only.

Answers: ``200`` when the report was applied, changed nothing, was a duplicate (its delivery id
was seen before) or came late (the task had moved on) — in each case the provider must stop
retrying; ``401`` forged, stale or unsigned; ``404`` unknown provider or task; ``400`` malformed.
Every delivery is recorded with its outcome. Bearer tokens play no part here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import Scope

from errands import model
from errands.api.errors import error_response
from errands.api.routing import Call, PathParam, Route
from errands.api.schemas import DeliveryPage, Outcome
from errands.auth import CapabilitySigner
from errands.errors import ApiError, BadRequest, Forbidden, NotFound, Unauthorized
from errands.inputs import TASK_ID_PATTERN
from errands.model import TaskError, TaskRecord
from errands.providers import Inbound, Provider, Update
from errands.store.base import Delivery

if TYPE_CHECKING:
    from errands.runtime import Runtime

_OUTCOME_BODIES = {o: orjson.dumps({"outcome": o}) for o in ("applied", "unchanged", "duplicate", "late")}


def inbound_of(scope: Scope, body: bytes) -> Inbound:
    """A request's headers (lower-case names) and body, as providers read them."""
    return Inbound({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}, body)


async def _refuse(runtime: Runtime, delivery: Delivery, exc: ApiError) -> Response:
    await runtime.store.record_delivery(delivery)
    return error_response(exc.status_code, exc.code, exc.message)


async def _apply(
    runtime: Runtime,
    delivery: Delivery,
    update: Update,
    external_id: str | None,
    job: tuple[list[str], str] | None = None,
) -> Response:
    now = delivery.received_at
    error = None
    if update.status == "failed":
        error = TaskError(update.error_code or "provider_failed", update.error_message or "")
    outcome, _ = await runtime.store.apply_webhook(
        delivery,
        lambda r: model.external_report(
            r,
            now=now,
            external_id=external_id,
            status=update.status,
            progress=update.progress,
            message=update.message,
            result=update.result,
            error=error,
            by_webhook=True,
        ),
        job=job,
    )
    if outcome == "unknown_task":
        return error_response(404, "not_found", "No such task.")
    return Response(_OUTCOME_BODIES[outcome], media_type="application/json")


async def capability_response(runtime: Runtime, token: str, inbound: Inbound) -> Response:
    """``POST /v1/hooks/callback/{token}``.

    Every bad token gets the same answer, whether its task exists or not: a capability URL
    must not tell a stranger which task ids are taken."""
    now = runtime.clock.now()
    base = Delivery("callback", None, None, "", 0, now)
    refused = Unauthorized("The callback URL is not valid.")
    parsed = CapabilitySigner.parse(token)
    found = await runtime.store.get(parsed[0]) if parsed is not None else None
    record = found if isinstance(found, TaskRecord) else None
    assert runtime.capabilities is not None, "the runtime makes its capabilities at start"
    if parsed is None or not runtime.capabilities.valid(
        parsed[2],
        task_id=parsed[0],
        attempt=parsed[1],
        nonce=None if record is None else record.callback_nonce,
        current_attempt=-1 if record is None else record.attempt,
    ):
        known = None if record is None else record.id
        return await _refuse(runtime, _with(base, "unauthorized", 401, refused.message, known), refused)
    assert record is not None
    task_type = runtime.app.task_types.get(record.type)
    provider = task_type.provider if task_type is not None else None
    try:
        if provider is None:
            raise NotFound("This task is not run by a provider.")
        update = provider.parse_callback(inbound)
    except ApiError as exc:
        outcome = {401: "unauthorized", 404: "unknown_task"}.get(exc.status_code, "malformed")
        return await _refuse(runtime, _with(base, outcome, exc.status_code, exc.message, record.id), exc)
    delivery_id = inbound.headers.get("webhook-id") or inbound.headers.get("idempotency-key")
    if delivery_id is not None and (len(delivery_id) > 256 or "\x00" in delivery_id):
        bad = BadRequest("The webhook-id (or Idempotency-Key) is too long or holds a NUL character.")
        return await _refuse(runtime, _with(base, "malformed", 400, bad.message, record.id), bad)
    delivery = Delivery(f"callback:{provider.name}", delivery_id, record.id, "", 200, now)
    return await _apply(runtime, delivery, update, update.external_id)


async def signed_response(runtime: Runtime, provider: str, inbound: Inbound) -> Response:
    """``POST /v1/hooks/{provider}``."""
    now = runtime.clock.now()
    base = Delivery(provider[:64], None, None, "", 0, now)
    adapter: Provider | None = runtime.app.providers.get(provider)
    if adapter is None:
        return error_response(404, "not_found", "No such provider.")
    try:
        delivery_id = adapter.verify(inbound, now=now)
    except ApiError as exc:
        return await _refuse(runtime, _with(base, "unauthorized", exc.status_code, exc.message), exc)
    try:
        update = adapter.parse(inbound)
        if not update.external_id:
            raise BadRequest("The webhook does not say which job it is about.")
    except ApiError as exc:
        return await _refuse(
            runtime, _with(base, "malformed", exc.status_code, exc.message, None, delivery_id), exc
        )
    types = [t.name for t in runtime.app.task_types.values() if t.provider is adapter]
    delivery = Delivery(adapter.name, delivery_id, None, "", 200, now)
    return await _apply(runtime, delivery, update, update.external_id, (types, update.external_id))


def _with(
    base: Delivery,
    outcome: str,
    status: int,
    detail: str,
    task_id: str | None = None,
    delivery_id: str | None = None,
) -> Delivery:
    return Delivery(base.provider, delivery_id, task_id, outcome, status, base.received_at, detail[:200])


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: Annotated[str, Field(pattern=TASK_ID_PATTERN)] | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 100


async def capability_hook(call: Call) -> Response:
    """For services that cannot sign: the URL itself is the secret, for one task and attempt.
    Answers as the signed webhook does; every bad URL gets the same ``401``."""
    return await capability_response(
        call.runtime, call.path_params["token"], inbound_of(call.scope, await call.body())
    )


async def signed_hook(call: Call) -> Response:
    """A webhook signed by the provider (Standard Webhooks by default), tied to its task by the
    provider's job id. ``200`` with the outcome (applied, unchanged, duplicate or late: stop
    sending it), ``401`` forged or stale, ``404`` unknown provider or job, ``400`` malformed."""
    return await signed_response(
        call.runtime, call.path_params["provider"], inbound_of(call.scope, await call.body())
    )


async def deliveries(call: Call) -> Response:
    """Every inbound webhook with its outcome, newest first; one task's with ``task_id`` (admin)."""
    if not call.principal.admin:
        raise Forbidden("Only an admin may read webhook deliveries.")
    q = call.query(DeliveriesQuery)
    rows = await call.runtime.store.deliveries(task_id=q.task_id, limit=q.limit)
    body = [
        {
            "provider": d.provider,
            "delivery_id": d.delivery_id,
            "task_id": d.task_id,
            "outcome": d.outcome,
            "status_code": d.status_code,
            "received_at": d.received_at,
            "detail": d.detail,
        }
        for d in rows
    ]
    return Response(orjson.dumps({"deliveries": body}), media_type="application/json")


_WEBHOOK = (400, 401, 404, 413)

ROUTES = [
    Route(
        "POST",
        "/v1/hooks/callback/{token}",
        capability_hook,
        "A task's capability callback URL",
        "webhooks",
        path_params=(PathParam("token", None, "The secret token of the task's attempt."),),
        response=Outcome,
        errors=_WEBHOOK,
        auth="self",
    ),
    Route(
        "POST",
        "/v1/hooks/{provider}",
        signed_hook,
        "A provider's signed webhook",
        "webhooks",
        path_params=(PathParam("provider", None, "The provider's name."),),
        response=Outcome,
        errors=_WEBHOOK,
        auth="self",
    ),
    Route(
        "GET",
        "/v1/webhook-deliveries",
        deliveries,
        "Recorded inbound webhooks (admin)",
        "admin",
        query=DeliveriesQuery,
        response=DeliveryPage,
        errors=(401, 403, 422),
    ),
]
