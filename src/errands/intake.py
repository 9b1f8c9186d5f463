"""Provider reports, one way in: a signed webhook, a capability URL or a poll becomes a decision.

Each report is read by its provider's adapter into an :class:`~errands.providers.Update`, turned
into the same decision (:func:`decision`: :func:`errands.model.external_report` on the task's
current job), and applied by the store on the row it locks, with the report's receipt, in one
transaction. What a decision amounts to (applied, unchanged, late) is :func:`judge`'s to say,
once for every way in. A report refused before it reaches a task is recorded too, with why.

The answers (:class:`Answer`) are what the HTTP routes send back: every accepted outcome is a
``2xx`` (the provider must stop retrying); a refusal carries its error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from errands import model
from errands.auth import CapabilitySigner
from errands.clock import Clock
from errands.errors import (
    ApiError,
    BadRequest,
    Conflict,
    InvalidTransition,
    LeaseLost,
    NotFound,
    Unauthorized,
)
from errands.model import Change, TaskError, TaskRecord
from errands.providers import Inbound, Provider, Update
from errands.registry import Registry, TaskType
from errands.store.base import Changes, Decision, Judge, Reports, Tasks
from errands.store.records import Receipt, ReportOutcome

DETAIL_CHARS = 200
log = logging.getLogger("errands.intake")


class _Store(Tasks, Reports, Protocol):
    """What the intake needs of a store."""


def decision(
    update: Update,
    *,
    now: float,
    by_webhook: bool,
    job: str | None,
    stream_max_bytes: int | None = None,
    attempt: tuple[int, str | None] | None = None,
) -> Decision:
    """The changes a provider's report about ``job`` asks for: the chunks it carries for the
    task's streams, then what it says of the job (a report about another job than the task's
    current one, or after the end, is refused by the model)."""
    error = None
    if update.status == "failed":
        error = TaskError(update.error_code or "provider_failed", update.error_message or "")

    def decide(record: TaskRecord) -> list[Change] | None:
        if attempt is not None and (record.attempt, record.callback_nonce) != attempt:
            raise InvalidTransition("The report is about an earlier attempt.")
        changes = []
        for part in update.streams:
            try:
                streamed = model.stream_output(
                    record, now=now, lease_token=None, external_id=job, name=part.name, index=part.index,
                    chunks=part.chunks, max_bytes=stream_max_bytes,
                )  # fmt: skip
            except InvalidTransition:
                break  # the report is late: external_report below says so
            except Conflict as exc:
                # A gap (a report before this one was lost: its chunks can only come from a
                # later report that starts earlier, a final report or a poll), or the streams'
                # limits: these chunks cannot be kept, and the rest of the report still counts.
                log.info("stream chunks of task %s skipped: %s", record.id, exc.message)
                continue
            if streamed is not None:
                changes.append(streamed)
                record = streamed.record
        reported = model.external_report(
            record,
            now=now,
            external_id=job,
            status=update.status,
            progress=update.progress,
            message=update.message,
            result=update.result,
            error=error,
            by_webhook=by_webhook,
        )
        if reported is not None:
            changes.append(reported)
        return changes or None

    return decide


def judge(decide: Decision) -> Judge:
    """What a report's decision amounts to: applied, unchanged (nothing new), or late (the
    state machine refused it: the task had moved on)."""

    def judged(record: TaskRecord) -> tuple[ReportOutcome, Changes]:
        try:
            change = decide(record)
        except (InvalidTransition, LeaseLost):
            return ReportOutcome.LATE, None
        return (ReportOutcome.UNCHANGED if change is None else ReportOutcome.APPLIED), change

    return judged


@dataclass(frozen=True, slots=True)
class Answer:
    """What to tell the sender: an accepted outcome, or the error that refused the report."""

    outcome: ReportOutcome
    error: ApiError | None = None
    #: Whose report it was, as recorded (``callback:<provider>`` for a capability URL).
    provider: str = ""


class Intake:
    """Provider reports for one process (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        store: _Store,
        clock: Clock,
        capabilities: CapabilitySigner,
        run_soon: Callable[[str, Coroutine[Any, Any, Any]], None],
        provider_timeout_s: float,
        stream_max_bytes: int | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._clock = clock
        self._capabilities = capabilities
        self._run_soon = run_soon
        self._provider_timeout_s = provider_timeout_s
        self._stream_max_bytes = stream_max_bytes

    async def _refuse(self, receipt: Receipt, outcome: ReportOutcome, error: ApiError) -> Answer:
        refused = Receipt(
            receipt.provider, receipt.delivery_id, receipt.task_id, outcome, error.status_code,
            receipt.received_at, error.message[:DETAIL_CHARS],
        )  # fmt: skip
        await self._store.record_receipt(refused)
        return Answer(outcome, error, receipt.provider)

    async def _apply(
        self,
        receipt: Receipt,
        update: Update,
        job: tuple[list[str], str] | None,
        attempt: tuple[int, str | None] | None = None,
    ) -> Answer:
        decide = decision(
            update,
            now=receipt.received_at,
            by_webhook=True,
            job=update.external_id,
            stream_max_bytes=self._stream_max_bytes,
            attempt=attempt,
        )
        outcome, _ = await self._store.apply_report(receipt, judge(decide), job=job)
        if outcome is ReportOutcome.UNKNOWN_TASK:
            return Answer(outcome, NotFound("No such task."), receipt.provider)
        return Answer(outcome, None, receipt.provider)

    async def webhook(self, provider_name: str, inbound: Inbound) -> Answer:
        """A webhook signed by the provider, tied to its task by the provider's job id."""
        now = self._clock.now()
        provider = self._registry.providers.get(provider_name)
        if provider is None:
            named = provider_name[:64] if "\x00" not in provider_name else "(unreadable)"
            return await self._refuse(
                Receipt(named, None, None, "", 0, now),
                ReportOutcome.UNKNOWN_TASK,
                NotFound("No such provider."),
            )
        base = Receipt(provider.name, None, None, "", 0, now)
        try:
            delivery_id = provider.verify(inbound, now=now)
        except ApiError as exc:
            return await self._refuse(base, ReportOutcome.UNAUTHORIZED, exc)
        base = Receipt(provider.name, delivery_id, None, "", 200, now)
        try:
            update = provider.parse(inbound)
            if not update.external_id:
                raise BadRequest("The webhook does not say which job it is about.")
        except ApiError as exc:
            return await self._refuse(base, ReportOutcome.MALFORMED, exc)
        types = [t.name for t in self._registry.task_types.values() if t.provider is provider]
        return await self._apply(base, update, (types, update.external_id))

    async def callback(self, token: str, inbound: Inbound) -> Answer:
        """A report on a task's capability URL. Every bad token gets the same answer, whether
        its task exists or not: the URL must not tell a stranger which task ids are taken."""
        now = self._clock.now()
        base = Receipt("callback", None, None, "", 0, now)
        refused = Unauthorized("The callback URL is not valid.")
        parsed = CapabilitySigner.parse(token)
        found = await self._store.get(parsed[0]) if parsed is not None else None
        record = found if isinstance(found, TaskRecord) else None
        if parsed is None or not self._capabilities.valid(
            parsed[2],
            task_id=parsed[0],
            attempt=parsed[1],
            nonce=None if record is None else record.callback_nonce,
            current_attempt=-1 if record is None else record.attempt,
        ):
            known = Receipt(base.provider, None, None if record is None else record.id, "", 0, now)
            return await self._refuse(known, ReportOutcome.UNAUTHORIZED, refused)
        assert record is not None
        base = Receipt(base.provider, None, record.id, "", 0, now)
        provider = self._provider_of(record)
        try:
            if provider is None:
                raise NotFound("This task is not run by a provider.")
            update = provider.parse_callback(inbound)
            delivery_id = inbound.headers.get("webhook-id") or inbound.headers.get("idempotency-key")
            if delivery_id is not None and (len(delivery_id) > 256 or "\x00" in delivery_id):
                raise BadRequest("The webhook-id (or Idempotency-Key) is too long or holds a NUL character.")
        except ApiError as exc:
            outcome = ReportOutcome.UNKNOWN_TASK if exc.status_code == 404 else ReportOutcome.MALFORMED
            return await self._refuse(base, outcome, exc)
        receipt = Receipt(f"callback:{provider.name}", delivery_id, record.id, "", 200, now)
        # The attempt (and its nonce) the URL was checked against: a report that reaches the
        # task after it moved to another attempt (or a rerun of this one) is late.
        return await self._apply(receipt, update, None, attempt=(record.attempt, record.callback_nonce))

    async def polled(self, record: TaskRecord, update: Update) -> TaskRecord | None:
        """The answer to a poll of the task's job, applied; ``None`` when it changed nothing
        because the task had moved on (or is gone)."""
        decide = decision(
            update,
            now=self._clock.now(),
            by_webhook=False,
            job=record.external_id,
            stream_max_bytes=self._stream_max_bytes,
        )
        try:
            return await self._store.apply(record.id, decide)
        except (InvalidTransition, LeaseLost, NotFound):
            return None

    # -- telling providers ----------------------------------------------------------------------

    def _provider_of(self, record: TaskRecord) -> Provider | None:
        task_type: TaskType | None = self._registry.task_types.get(record.type)
        return None if task_type is None else task_type.provider

    def cancel_at_provider(self, record: TaskRecord) -> None:
        """A task whose provider job should stop (cancelled, or timed out): tell the provider
        (best effort, in the background)."""
        provider = self._provider_of(record)
        if provider is None or record.external_id is None:
            return
        self._run_soon(
            f"cancel-{record.id}",
            asyncio.wait_for(provider.cancel(record.external_id), self._provider_timeout_s),
        )
