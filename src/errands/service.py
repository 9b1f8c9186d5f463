"""Task operations on behalf of a caller: validate, authorise, decide, store.

The HTTP API and the in-process ``app.submit`` both go through here, so both enforce the same
rules. Owner isolation lives here too: a task of another owner is reported as not found.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from errands import model
from errands.accounts import Accounts
from errands.auth import READ, WRITE, Principal, TokenSigner
from errands.clock import Clock, iso
from errands.config import Settings
from errands.errors import ApiError, Forbidden, Gone, InvalidCursor, InvalidRequest, NotFound, UnknownTaskType
from errands.guard import AddressPolicy, Refused
from errands.inputs import (
    TASK_ID_PATTERN,
    BadValue,
    Owner,
    Priority,
    TaskId,
    Text,
    TypeName,
    check_json,
    integral,
    invalid,
    new_task_id,
    new_task_ids,
    pack_cursor,
    unpack_cursor,
)
from errands.intake import Intake
from errands.model import Event, NewTask, Status, TaskRecord, Usage
from errands.model.credits import MAX_COST
from errands.model.flow import waiting_for
from errands.model.streams import StreamChoice, StreamInfo, StreamRead, read_stream, streams
from errands.registry import Registry
from errands.store.base import Credits, EventLog, Meta, Sweeping, Tasks
from errands.store.records import TaskQuery, Tombstone


class _Store(Tasks, Sweeping, EventLog, Meta, Credits, Protocol):
    """What the service needs of a store."""


MAX_LIST_LIMIT = 200


#: How far ahead a task may be delayed.
MAX_DELAY_S = 366 * 86_400
#: The most tasks one batch may submit.
MAX_BATCH = 1000
#: Ids no task may have: they name routes (``/v1/tasks/batch``).
RESERVED_IDS = frozenset({"batch", "bulk", "count"})


class SubmitRequest(BaseModel):
    """The body of ``POST /v1/tasks`` (and the arguments of ``app.submit``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: TypeName
    input: dict[str, Any] = Field(default_factory=dict)
    id: TaskId | None = None
    owner: Owner | None = None
    priority: Priority = 0
    timeout_s: float | None = Field(None, gt=0, le=7 * 86_400)
    max_attempts: Annotated[int, Field(ge=1, le=100), integral] | None = None
    expires_in_s: float | None = Field(None, gt=0, le=30 * 86_400)
    notify_url: Annotated[Text, Field(min_length=1, max_length=2048)] | None = None
    #: When it may first run (RFC 3339 with an offset), or how long after submit; not both.
    run_at: AwareDatetime | None = None
    delay_s: float | None = Field(None, ge=0, le=MAX_DELAY_S)
    start_within_s: float | None = Field(None, gt=0, le=30 * 86_400)
    #: Whose share of the limits ``per="key"`` it uses (default: its owner's).
    key: Owner | None = None
    #: A newer submit of the owner and type with the same key replaces this one while pending;
    #: ``debounce_s`` delays the task that long (the quiet time that lets the next replace it).
    debounce_key: Owner | None = None
    debounce_s: float | None = Field(None, gt=0, le=86_400)
    #: Credits it reserves of its owner's balance, instead of its type's cost (admin keys only).
    cost: Annotated[int, Field(ge=0, le=MAX_COST), integral] | None = None

    @model_validator(mode="after")
    def _one_time(self) -> SubmitRequest:
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give run_at or delay_s, not both")
        if self.debounce_s is not None:
            if self.debounce_key is None:
                raise ValueError("debounce_s goes with a debounce_key")
            if self.run_at is not None or self.delay_s is not None:
                raise ValueError("give debounce_s or a delay (run_at, delay_s), not both")
        return self


_LATER_FIELDS = ("run_at", "delay_s", "start_within_s", "key", "debounce_key", "debounce_s", "cost")
_FIRST_FIELDS = tuple(f for f in SubmitRequest.model_fields if f not in ("id", "owner", *_LATER_FIELDS))


def request_fingerprint(request: SubmitRequest, owner: str) -> str:
    """What makes two submissions of one id the same request: every field but the id, with the
    owner it is for. The fields added since 0.1 count only when given, so that the requests
    accepted before them still match their fingerprints. (The fields as validated, read
    directly: ``model_dump`` gives the same values, at ten times the cost per task of a batch.)"""
    given = request.__dict__
    fields = {k: given[k] for k in _FIRST_FIELDS}
    for k in _LATER_FIELDS:
        if given[k] is not None:
            fields[k] = given[k]
    return hashlib.sha256(orjson.dumps([fields, owner], option=orjson.OPT_SORT_KEYS)).hexdigest()


Scope = Literal["read", "write"]
ALL_SCOPES: tuple[Scope, ...] = ("read", "write")


class TokenRequest(BaseModel):
    """The body of ``POST /v1/tokens``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    owner: Owner
    scopes: list[Scope] = Field(default_factory=lambda: list(ALL_SCOPES), min_length=1)
    task_id: TaskId | None = None
    ttl_s: float = Field(3600, ge=1, le=30 * 86_400)


def encode_cursor(record: TaskRecord) -> str:
    return pack_cursor([record.created_at, record.id])


_TASK_ID = re.compile(TASK_ID_PATTERN)


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor stands for; :class:`InvalidCursor` for anything this service did
    not make (it is decoded from the client's text, so every part is checked)."""
    try:
        created_at, task_id = unpack_cursor(cursor)
        if isinstance(created_at, bool) or not isinstance(created_at, int | float):
            raise ValueError
        if not isinstance(task_id, str) or not _TASK_ID.match(task_id):
            raise ValueError
        moment = float(created_at)
        if not math.isfinite(moment):
            raise ValueError
        return moment, task_id
    except (ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise InvalidCursor() from None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which tasks a list, a count or a bulk action is about (every field narrows it)."""

    status: Status | None = None
    type: str | None = None
    owner: str | None = None
    id_prefix: str | None = None
    created_after: float | None = None
    created_before: float | None = None


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[TaskRecord]
    next_cursor: str | None


class Service:
    """The operations of the API, for one process."""

    def __init__(
        self,
        registry: Registry,
        store: _Store,
        settings: Settings,
        clock: Clock,
        *,
        signer: TokenSigner,
        guard: AddressPolicy,
        intake: Intake,
    ) -> None:
        self.registry = registry
        self.store = store
        self.settings = settings
        self.clock = clock
        self.signer = signer
        self.guard = guard
        self.intake = intake
        self.accounts = Accounts(store, clock)

    # -- tasks --------------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest, principal: Principal) -> tuple[TaskRecord, bool]:
        """Create a task; ``(task, False)`` when the same request was already accepted."""
        new = await self.prepare(request, principal)
        return await self.store.create(new, max_pending_per_owner=self.settings.max_pending_per_owner)

    async def submit_many(
        self, items: Sequence[Any], principal: Principal
    ) -> list[tuple[TaskRecord, bool] | ApiError]:
        """Several submissions (each a ``POST /v1/tasks`` body, or one validated already) in one
        transaction: each one's answer, in order (its task and whether it was created, or the
        error that refused it; one refused item refuses only itself)."""
        principal.require(WRITE)
        if not 1 <= len(items) <= MAX_BATCH:
            raise InvalidRequest(f"A batch holds 1 to {MAX_BATCH} tasks.")
        answers: list[tuple[TaskRecord, bool] | ApiError | None] = [None] * len(items)
        prepared: list[tuple[int, NewTask]] = []
        ids = new_task_ids(len(items))  # for the items that name none
        for i, item in enumerate(items):
            try:
                # As POST /v1/tasks reads its body, so that an item is held to the same rules
                # (an item the API validated already, as part of its batch, is one).
                request = (
                    item
                    if isinstance(item, SubmitRequest)
                    else SubmitRequest.model_validate_json(orjson.dumps(item))
                )
            except ValidationError as exc:
                answers[i] = invalid(list(exc.errors()))
                continue
            try:
                new = (
                    self._new_task(request, principal, ids[i])
                    if request.notify_url is None
                    else await self.prepare(request, principal, ids[i])
                )
            except ApiError as exc:
                answers[i] = exc
            else:
                prepared.append((i, new))
        created = await self.store.create_many(
            [new for _, new in prepared], max_pending_per_owner=self.settings.max_pending_per_owner
        )
        for (i, _), answer in zip(prepared, created, strict=True):
            answers[i] = answer if isinstance(answer, tuple | ApiError) else InvalidRequest(str(answer))
        return [a for a in answers if a is not None]

    async def prepare(
        self, request: SubmitRequest, principal: Principal, new_id: str | None = None
    ) -> NewTask:
        """A submission checked, authorised and made a :class:`NewTask` (its id ``new_id`` when
        it names none; a new one by default)."""
        new = self._new_task(request, principal, new_id)
        if request.notify_url is not None:
            try:
                await self.guard.check(request.notify_url)
            except Refused as exc:
                raise InvalidRequest(f"notify_url: {exc.reason}") from None
            except LookupError as exc:
                raise InvalidRequest(f"notify_url: {exc}") from None
        return new

    def _new_task(self, request: SubmitRequest, principal: Principal, new_id: str | None) -> NewTask:
        """:meth:`prepare` but for where ``notify_url`` leads (checked there, with a look-up
        that may wait): in a batch, a task without one is made without a coroutine of its own."""
        principal.require(WRITE)
        if request.id in RESERVED_IDS:
            raise InvalidRequest(f"id: {request.id!r} is reserved (it names a route).")
        task_type = self.registry.task_types.get(request.type)
        if task_type is None:
            raise UnknownTaskType(f"No handler or provider is registered for task type '{request.type}'.")
        if principal.admin:
            owner = request.owner or self.settings.default_owner
        else:
            if request.owner is not None and request.owner != principal.owner:
                raise Forbidden("This token may only create tasks for its own owner.")
            principal.require_owner_wide("A token scoped to one task cannot create tasks.")
            owner = principal.owner or self.settings.default_owner
        if request.notify_url is not None and not principal.admin:
            raise Forbidden("Only an admin key may set notify_url.")
        if request.cost is not None and not principal.admin:
            raise Forbidden("Only an admin key may set a task's cost.")
        try:
            check_json(request.input, what="input", max_depth=self.settings.max_json_depth)
        except BadValue as exc:
            raise InvalidRequest(f"{exc}.") from None
        run_at = None if request.run_at is None else request.run_at.timestamp()
        if run_at is not None and run_at - self.clock.now() > MAX_DELAY_S:
            raise InvalidRequest(f"run_at: at most {MAX_DELAY_S // 86_400} days ahead.")
        fingerprint = request_fingerprint(request, owner)
        return NewTask(
            id=request.id or new_id or new_task_id(),
            type=request.type,
            owner=owner,
            input=request.input,
            priority=request.priority,
            max_attempts=request.max_attempts or task_type.max_attempts or self.settings.default_max_attempts,
            timeout_s=request.timeout_s or task_type.timeout_s or self.settings.default_timeout_s,
            expires_in_s=request.expires_in_s or self.settings.default_expires_in_s,
            fingerprint=fingerprint,
            notify_url=request.notify_url,
            run_at=run_at,
            delay_s=request.delay_s or request.debounce_s or 0.0,
            start_within_s=request.start_within_s,
            key=request.key,
            debounce_key=request.debounce_key,
            cost=task_type.cost if request.cost is None else request.cost,
        )

    async def get(self, task_id: str, principal: Principal) -> TaskRecord:
        principal.require(READ)
        found = await self.store.get(task_id)
        if found is None:
            raise NotFound()
        principal.check_task(found.owner, found.id)
        if isinstance(found, Tombstone):
            raise Gone()
        return found

    async def read(self, task_id: str, principal: Principal) -> TaskRecord:
        """:meth:`get`, with ``waiting_for`` filled in (see :meth:`explain`)."""
        return (await self.explain([await self.get(task_id, principal)]))[0]

    async def explain(self, records: Sequence[TaskRecord]) -> list[TaskRecord]:
        """The records, each pending one with why it waits (:func:`errands.model.flow.waiting_for`)."""
        pending = [r for r in records if r.status is Status.PENDING]
        if not pending:
            return list(records)
        now = self.clock.now()
        bounds = self.registry.bounds()
        scopes = {b.scope(r): b for r in pending for b in bounds.get(r.type, ())}
        usage: Mapping[str, Usage | None] = await self.store.flow_usage(scopes) if scopes else {}
        holds = await self.store.holds()
        explained = []
        for record in records:
            reason = None
            if record.status is Status.PENDING:
                task_type = self.registry.task_types.get(record.type)
                provider = task_type.provider.name if task_type and task_type.provider else None
                held_until = holds.get(provider) if provider is not None else None
                reason = waiting_for(
                    record, bounds=bounds.get(record.type, ()), usage=usage, held_until=held_until, now=now
                )
            explained.append(record if reason is None else record.evolve(waiting_for=reason))
        return explained

    def query(
        self, principal: Principal, selection: Selection, *, limit: int = 50, cursor: str | None = None
    ) -> TaskQuery:
        """The store's query for ``selection`` as ``principal`` may see it (owner tokens: their
        own tasks only)."""
        principal.require(READ)
        if selection.owner is not None and not principal.admin and selection.owner != principal.owner:
            raise Forbidden("Only an admin may list another owner's tasks.")
        return TaskQuery(
            owner=selection.owner if principal.admin else principal.owner,
            task_id=principal.task_id,
            status=selection.status,
            type=selection.type,
            limit=max(1, min(limit, MAX_LIST_LIMIT)),
            before=decode_cursor(cursor) if cursor else None,
            id_prefix=selection.id_prefix,
            created_after=selection.created_after,
            created_before=selection.created_before,
        )

    async def list_tasks(
        self, principal: Principal, selection: Selection, *, limit: int = 50, cursor: str | None = None
    ) -> Page:
        query = self.query(principal, selection, limit=limit, cursor=cursor)
        tasks = await self.store.list_tasks(query)
        next_cursor = encode_cursor(tasks[-1]) if len(tasks) == query.limit else None
        return Page(await self.explain(tasks), next_cursor)

    async def _change(
        self, task_id: str, principal: Principal, decide: Callable[[TaskRecord], model.Change | None]
    ) -> TaskRecord:
        principal.require(WRITE)
        await self.get(task_id, principal)
        return await self.store.apply(task_id, decide)

    async def cancel(self, task_id: str, principal: Principal) -> TaskRecord:
        """Cancel a task; one an external provider runs is cancelled there too (best effort)."""
        now = self.clock.now()
        record = await self._change(task_id, principal, lambda r: model.cancel(r, now=now))
        self.intake.cancel_at_provider(record)
        return record

    async def retry(self, task_id: str, principal: Principal) -> TaskRecord:
        now, limit = self.clock.now(), self.settings.max_manual_retries
        return await self._change(
            task_id, principal, lambda r: model.manual_retry(r, now=now, max_manual_retries=limit)
        )

    async def events(
        self, task_id: str, principal: Principal, *, after: int, limit: int, streams: StreamChoice = "include"
    ) -> list[Event]:
        """The task's events after seq ``after``, up to ``limit`` of those ``streams`` asks for
        (see :meth:`~errands.store.base.EventLog.events`)."""
        await self.get(task_id, principal)
        return await self.store.events(task_id, after=after, limit=max(1, min(limit, 1000)), streams=streams)

    async def _stream_events(self, task_id: str) -> list[Event]:
        """Every ``task.stream`` event of the task (and those that ended it), oldest first."""
        events: list[Event] = []
        while True:
            after = events[-1].seq if events else 0
            page = await self.store.events(task_id, after=after, limit=1000, streams="only")
            events.extend(page)
            if len(page) < 1000:
                return events

    async def streams(self, task_id: str, principal: Principal) -> list[StreamInfo]:
        await self.get(task_id, principal)
        return streams(await self._stream_events(task_id))

    async def stream(
        self, task_id: str, principal: Principal, name: str, *, attempt: int | None, offset: int
    ) -> StreamRead:
        """Stream ``name`` as written so far (empty if nothing was), and the seq to watch after."""
        record = await self.get(task_id, principal)
        events = await self._stream_events(task_id)
        read = read_stream(events, name, attempt=attempt, offset=offset)
        # The task's latest event when the read began, or a later chunk the read included.
        read.seq = max(record.seq, events[-1].seq if events else 0)
        return read

    # -- admin --------------------------------------------------------------------------------

    async def stats(self, principal: Principal) -> dict[str, Any]:
        if not principal.admin:
            raise Forbidden("Only an admin may read stats.")
        window_s = self.settings.stats_window_s
        rows = await self.store.stats(since=self.clock.now() - window_s, sample=10_000)
        by_status: dict[str, int] = {s.value: 0 for s in Status}
        by_type: dict[str, dict[str, int]] = {}
        for status, task_type, n in rows.counts:
            by_status[status] = by_status.get(status, 0) + n
            by_type.setdefault(task_type, {})[status] = n

        def summary(values: Sequence[float]) -> dict[str, Any]:
            return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}

        now = self.clock.now()
        return {
            "by_status": by_status,
            "by_type": by_type,
            "window_s": window_s,
            "queue_wait_s": summary(rows.waits_s),
            "run_time_s": summary(rows.runs_s),
            # Providers that asked to wait (429, 503 with Retry-After): until when.
            "providers_held": {
                name: iso(until) for name, until in (await self.store.holds()).items() if until > now
            },
        }

    def mint_token(self, request: TokenRequest, principal: Principal) -> dict[str, Any]:
        if not principal.admin:
            raise Forbidden("Only an admin may mint tokens.")
        expires_at = self.clock.now() + request.ttl_s
        token = self.signer.mint(
            owner=request.owner, scopes=request.scopes, expires_at=expires_at, task_id=request.task_id
        )
        return {
            "token": token,
            "owner": request.owner,
            "scopes": sorted(set(request.scopes)),
            "task_id": request.task_id,
            "expires_at": iso(expires_at),
        }
