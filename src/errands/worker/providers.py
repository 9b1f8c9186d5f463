"""The executor of external task types: the attempt is the submission to the provider, which
then runs the task and reports back (see :mod:`errands.intake`)."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from errands import model
from errands.clock import Clock
from errands.model import TaskError
from errands.providers import Callbacks, ProviderError, Submission
from errands.store.base import Decision
from errands.worker.attempt import Ended, Held
from errands.worker.outcomes import Backoff, retry_or_end

log = logging.getLogger("errands.worker")


def provider_error(provider: str, reason: str) -> TaskError:
    return TaskError(
        "provider_unavailable", f"The provider '{provider}' did not take the task: {reason}"[:500]
    )


class ProviderExecutor:
    """Submits a task to its provider under the task's lease; once the provider has it, the
    task is handed off (processing, without a lease, under its attempt's deadline)."""

    def __init__(
        self, clock: Clock, backoff: Backoff, rng: random.Random, callbacks: Callbacks, timeout_s: float
    ) -> None:
        self._clock = clock
        self._backoff = backoff
        self._rng = rng
        self._callbacks = callbacks
        self._timeout_s = timeout_s

    def begin(self, held: Held) -> asyncio.Future[Any]:
        record, provider = held.record, held.task_type.provider
        if provider is None:  # pragma: no cover - a TaskType has a handler or a provider
            raise RuntimeError(f"task type {held.task_type.name} has no provider")
        job = Submission(
            task_id=record.id,
            type=record.type,
            owner=record.owner,
            input=record.input,
            attempt=record.attempt,
            callback_url=self._callbacks.signed(provider.name),
            capability_url=self._callbacks.capability(record.id, record.attempt, record.callback_nonce or ""),
        )
        return asyncio.ensure_future(provider.submit(job))

    def limit_s(self, held: Held) -> float:
        return min(held.record.timeout_s, self._timeout_s)

    def _retry(self, held: Held, reason: str) -> Decision:
        name = held.task_type.provider.name if held.task_type.provider is not None else "?"
        delay = self._backoff.delay_s(held.record.attempt, self._rng.random())
        return retry_or_end(held.record, provider_error(name, reason), now=self._clock.now(), delay_s=delay)

    def timed_out(self, held: Held, progress: int | None, message: str | None, limit_s: float) -> Decision:
        del progress, message  # the provider never started: nothing of this attempt is kept
        return self._retry(held, f"no answer within {limit_s:g} s")

    def ended(self, held: Held, ended: Ended) -> Decision:
        record, future = held.record, ended.future
        raised = future.exception()
        if raised is None and isinstance(future.result(), str) and future.result():
            external_id: str = future.result()
            token, now = record.lease_token or "", ended.now
            poll_at = now + held.task_type.poll_after_s
            return lambda r: model.hand_off(
                r, now=now, lease_token=token, external_id=external_id, poll_at=poll_at
            )
        if isinstance(raised, ProviderError):
            reason = raised.message
        elif raised is None:
            reason = "it returned no job id"
        else:
            name = held.task_type.provider.name if held.task_type.provider is not None else "?"
            log.error("submitting task %s to provider %s failed", record.id, name, exc_info=raised)
            reason = type(raised).__name__
        return self._retry(held, reason)
