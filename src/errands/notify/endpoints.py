"""Endpoints, messages and the delivery log, administered over the API (admins only)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from errands import signing
from errands.auth import Principal
from errands.clock import Clock, iso
from errands.config import Settings
from errands.errors import ConfigError, Conflict, Forbidden, InvalidRequest, NotFound
from errands.guard import AddressPolicy, Refused
from errands.inputs import Owner, Text, TypeName, new_task_id
from errands.model import EVENT_TYPES, valid_pattern
from errands.notify.policy import END_EVENTS
from errands.store.base import Outbox
from errands.store.records import Attempt, Channel, Endpoint, Message, MessageQuery, MessageState

DEFAULT_EVENTS = sorted(e.value for e in END_EVENTS)
ENDPOINT_ID_PATTERN = r"^ep_[0-9A-Z]{26}$"
MESSAGE_ID_PATTERN = r"^msg_[0-9A-Z]{26}$"


#: Event types (and the patterns ``task.*`` and ``*``) an endpoint may subscribe to.
EventName = Annotated[
    str, Field(json_schema_extra={"enum": [*sorted(EVENT_TYPES), "task.*", "*"]}, max_length=64)
]
#: ``whsec_`` and the base64 of at least 16 bytes (the prefix may be left out).
Secret = Annotated[
    str,
    Field(
        pattern=r"^(whsec_)?(?:[A-Za-z0-9+/]{4}){5,}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$",
        max_length=512,
    ),
]


def _check_events(events: list[str] | None) -> list[str] | None:
    if events is not None:
        unknown = [e for e in events if not valid_pattern(e)]
        if unknown:
            raise ValueError(f"unknown event type {unknown[0]!r} (use task.completed, task.*…)")
    return events


def _check_secret(secret: str | None) -> str | None:
    if secret is not None:
        try:
            signing.secret_key(secret)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
    return secret


class EndpointIn(BaseModel):
    """The body of ``POST /v1/endpoints``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: Annotated[Text, Field(min_length=1, max_length=2048)]
    events: list[EventName] = Field(default_factory=lambda: list(DEFAULT_EVENTS), min_length=1, max_length=32)
    types: list[TypeName] | None = Field(None, min_length=1, max_length=100)
    owners: list[Owner] | None = Field(None, min_length=1, max_length=100)
    description: Annotated[Text, Field(max_length=500)] | None = None
    secret: Secret | None = Field(None, description="whsec_… (generated when absent)")
    enabled: bool = True

    _events = field_validator("events")(_check_events)
    _secret = field_validator("secret")(_check_secret)


class EndpointPatch(BaseModel):
    """The body of ``PATCH /v1/endpoints/{id}``: only the fields given change."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: Annotated[Text, Field(min_length=1, max_length=2048)] | None = None
    events: list[EventName] | None = Field(None, min_length=1, max_length=32)
    types: list[TypeName] | None = Field(None, min_length=1, max_length=100)
    owners: list[Owner] | None = Field(None, min_length=1, max_length=100)
    description: Annotated[Text, Field(max_length=500)] | None = None
    enabled: bool | None = None
    rotate_secret: bool = Field(False, description="Sign with a new secret; the old one stays valid a while.")
    secret: Secret | None = Field(None, description="The new secret when rotating (generated when absent).")

    _events = field_validator("events")(_check_events)
    _secret = field_validator("secret")(_check_secret)


class RecoverIn(BaseModel):
    """The body of ``POST /v1/endpoints/{id}/recover``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    since: datetime = Field(description="Resend the messages that failed, created since then (ISO 8601).")


def endpoint_out(e: Endpoint, *, with_secret: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": e.id,
        "url": e.url,
        "description": e.description,
        "events": list(e.events),
        "types": None if e.types is None else list(e.types),
        "owners": None if e.owners is None else list(e.owners),
        "enabled": e.enabled,
        "disabled_reason": e.disabled_reason,
        "failing_since": iso(e.failing_since),
        "throttled_until": iso(e.throttled_until),
        "created_at": iso(e.created_at),
        "updated_at": iso(e.updated_at),
    }
    if with_secret:
        out["secret"] = e.secret
    return out


def message_out(m: Message) -> dict[str, Any]:
    return {
        "id": m.id,
        "event_type": m.event_type,
        "seq": m.seq,
        "task_id": m.task_id,
        "owner": m.owner,
        "channel": m.channel,
        "target": m.target,
        "state": m.state,
        "attempts": m.attempts,
        "next_attempt_at": iso(m.next_at) if m.state == MessageState.PENDING else None,
        "last_status": m.last_status,
        "last_error": m.last_error,
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
        "payload": orjson.loads(m.payload),
    }


def attempt_out(a: Attempt) -> dict[str, Any]:
    return {
        "id": a.id,
        "message_id": a.message_id,
        "channel": a.channel,
        "target": a.target,
        "task_id": a.task_id,
        "event_type": a.event_type,
        "attempted_at": iso(a.attempted_at),
        "status": "succeeded" if a.succeeded else "failed",
        "status_code": a.status_code,
        "latency_ms": a.latency_ms,
        "response": a.response,
        "error": a.error,
    }


def new_endpoint_id() -> str:
    return "ep_" + new_task_id()


class NotifyAdmin:
    """What admins do with endpoints and messages; every method checks the caller is one."""

    def __init__(self, store: Outbox, settings: Settings, clock: Clock, guard: AddressPolicy) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.guard = guard

    @staticmethod
    def _admin(principal: Principal) -> None:
        if not principal.admin:
            raise Forbidden("Only an admin may manage notifications.")

    async def _check_url(self, url: str) -> None:
        try:
            await self.guard.check(url)
        except Refused as exc:
            raise InvalidRequest(f"url: {exc.reason}") from None
        except LookupError as exc:
            raise InvalidRequest(f"url: {exc}") from None

    async def create(self, body: EndpointIn, principal: Principal) -> Endpoint:
        self._admin(principal)
        await self._check_url(body.url)
        now = self.clock.now()
        endpoint = Endpoint(
            id=new_endpoint_id(),
            url=body.url,
            description=body.description,
            events=tuple(body.events),
            types=None if body.types is None else tuple(body.types),
            owners=None if body.owners is None else tuple(body.owners),
            secret=body.secret or signing.new_secret(),
            previous_secret=None,
            previous_secret_until=None,
            enabled=body.enabled,
            disabled_reason=None if body.enabled else "Created disabled.",
            failing_since=None,
            throttled_until=None,
            created_at=now,
            updated_at=now,
        )
        await self.store.create_endpoint(endpoint)
        return endpoint

    async def get(self, endpoint_id: str, principal: Principal) -> Endpoint:
        self._admin(principal)
        endpoint = await self.store.get_endpoint(endpoint_id)
        if endpoint is None:
            raise NotFound("No such endpoint.")
        return endpoint

    async def all(self, principal: Principal) -> list[Endpoint]:
        self._admin(principal)
        return await self.store.list_endpoints()

    async def update(self, endpoint_id: str, body: EndpointPatch, principal: Principal) -> Endpoint:
        self._admin(principal)
        given = body.model_fields_set
        if body.url is not None:
            await self._check_url(body.url)
        if "secret" in given and not body.rotate_secret:
            raise InvalidRequest("secret: give it with rotate_secret: true.")
        for name in ("url", "events", "enabled"):
            if name in given and getattr(body, name) is None:
                raise InvalidRequest(f"{name}: may not be null.")
        now = self.clock.now()
        new_secret = body.secret or signing.new_secret()

        def change(e: Endpoint) -> Endpoint:
            fields: dict[str, Any] = {"updated_at": now}
            if body.url is not None:
                fields["url"] = body.url
            if body.events is not None:
                fields["events"] = tuple(body.events)
            if "types" in given:
                fields["types"] = None if body.types is None else tuple(body.types)
            if "owners" in given:
                fields["owners"] = None if body.owners is None else tuple(body.owners)
            if "description" in given:
                fields["description"] = body.description
            if body.enabled is not None and body.enabled != e.enabled:
                fields["enabled"] = body.enabled
                fields["failing_since"] = None
                fields["throttled_until"] = None
                fields["disabled_reason"] = None if body.enabled else "Disabled by an admin."
            if body.rotate_secret:
                fields["previous_secret"] = e.secret
                fields["previous_secret_until"] = now + self.settings.notify_secret_grace_s
                fields["secret"] = new_secret
            return dataclasses.replace(e, **fields)

        return await self.store.update_endpoint(endpoint_id, change)

    async def delete(self, endpoint_id: str, principal: Principal) -> None:
        self._admin(principal)
        if not await self.store.delete_endpoint(endpoint_id):
            raise NotFound("No such endpoint.")

    async def secret(self, endpoint_id: str, principal: Principal) -> dict[str, Any]:
        endpoint = await self.get(endpoint_id, principal)
        until = endpoint.previous_secret_until
        rotating = endpoint.previous_secret is not None and until is not None and until > self.clock.now()
        return {
            "secret": endpoint.secret,
            "previous_secret_valid_until": iso(until) if rotating else None,
        }

    async def attempts(
        self, endpoint_id: str, principal: Principal, *, status: str | None, before: int | None, limit: int
    ) -> list[Attempt]:
        await self.get(endpoint_id, principal)
        succeeded = None if status is None else status == "succeeded"
        return await self.store.attempts(target=endpoint_id, succeeded=succeeded, before=before, limit=limit)

    async def recover(self, endpoint_id: str, since: datetime, principal: Principal) -> int:
        endpoint = await self.get(endpoint_id, principal)
        if not endpoint.enabled:
            raise Conflict("The endpoint is disabled; enable it before recovering its messages.")
        if since.tzinfo is None:
            raise InvalidRequest("since: give a time zone (such as Z).")
        now = self.clock.now()
        return await self.store.recover_endpoint(endpoint_id, since=since.timestamp(), now=now)

    async def messages(self, query: MessageQuery, principal: Principal) -> list[Message]:
        self._admin(principal)
        return await self.store.list_messages(query)

    async def message(self, message_id: str, principal: Principal) -> tuple[Message, list[Attempt]]:
        self._admin(principal)
        message = await self.store.get_message(message_id)
        if message is None:
            raise NotFound("No such message.")
        return message, await self.store.attempts(message_id=message_id, limit=100)

    async def resend(self, message_id: str, principal: Principal) -> Message:
        message, _ = await self.message(message_id, principal)
        if message.channel == Channel.ENDPOINT:
            endpoint = await self.store.get_endpoint(message.target)
            if endpoint is None:
                raise Conflict("The message's endpoint was deleted.")
            if not endpoint.enabled:
                raise Conflict("The endpoint is disabled; enable it before resending.")
        if message.state == MessageState.PENDING:
            raise Conflict("The message is still being delivered.")
        return await self.store.resend_message(message_id, now=self.clock.now())
