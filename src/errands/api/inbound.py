"""Inbound webhooks: providers report on the tasks they run (see :mod:`errands.intake`).

* ``POST /v1/hooks/{provider}``: a signed webhook (Standard Webhooks by default), tied to its
  task by the provider's job id;
* ``POST /v1/hooks/callback/{token}``: a task's capability URL, for services that cannot sign;
  the token is valid for that task's current attempt only.

Answers: ``200`` when the report was applied, changed nothing, was a duplicate (its delivery id
was seen before) or came late (the task had moved on) — in each case the provider must stop
retrying; ``401`` forged, stale or unsigned; ``404`` unknown provider or task; ``400`` malformed.
Every report is recorded with its outcome, refused ones too (by :mod:`errands.intake`), but for a
body over ``max_body_bytes``: the middleware answers ``413`` before the route runs. Bearer tokens
play no part here.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import Scope

from errands.api.errors import response_for
from errands.api.routing import Call, PathParam, Route
from errands.api.schemas import DeliveryPage, Outcome
from errands.clock import iso
from errands.errors import Forbidden
from errands.inputs import TASK_ID_PATTERN
from errands.intake import Answer
from errands.providers import Inbound
from errands.store.records import ReportOutcome

_OUTCOME_BODIES = {o: orjson.dumps({"outcome": o.value}) for o in ReportOutcome if o.accepted}


def inbound_of(scope: Scope, body: bytes) -> Inbound:
    """A request's headers (lower-case names) and body, as providers read them."""
    return Inbound({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}, body)


def _answer(call: Call, answer: Answer) -> Response:
    call.runtime.metrics.webhook(answer.provider.removeprefix("callback:"), answer.outcome.value)
    if answer.error is not None:
        return response_for(answer.error)
    return Response(_OUTCOME_BODIES[answer.outcome], media_type="application/json")


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: Annotated[str, Field(pattern=TASK_ID_PATTERN)] | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 100


async def capability_hook(call: Call) -> Response:
    """For services that cannot sign: the URL itself is the secret, for one task and attempt.
    Answers as the signed webhook does; every bad URL gets the same ``401``."""
    inbound = inbound_of(call.scope, await call.body())
    return _answer(call, await call.runtime.intake.callback(call.path_params["token"], inbound))


async def signed_hook(call: Call) -> Response:
    """A webhook signed by the provider (Standard Webhooks by default), tied to its task by the
    provider's job id. ``200`` with the outcome (applied, unchanged, duplicate or late: stop
    sending it), ``401`` forged or stale, ``404`` unknown provider or job, ``400`` malformed."""
    inbound = inbound_of(call.scope, await call.body())
    return _answer(call, await call.runtime.intake.webhook(call.path_params["provider"], inbound))


async def deliveries(call: Call) -> Response:
    """Every inbound report with its outcome, newest first; one task's with ``task_id`` (admin)."""
    if not call.principal.admin:
        raise Forbidden("Only an admin may read webhook deliveries.")
    q = call.query(DeliveriesQuery)
    rows = await call.runtime.store.receipts(task_id=q.task_id, limit=q.limit)
    body = [
        {
            "provider": r.provider,
            "delivery_id": r.delivery_id,
            "task_id": r.task_id,
            "outcome": str(r.outcome),
            "status_code": r.status_code,
            "received_at": iso(r.received_at),
            "detail": r.detail,
        }
        for r in rows
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
