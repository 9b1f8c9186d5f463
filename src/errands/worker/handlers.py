"""The executor of local handlers: async ones on the loop, sync ones in a thread of their own."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import orjson

from errands import model
from errands.clock import Clock
from errands.context import Fail, Retry
from errands.inputs import BadValue, check_json
from errands.model import Status, TaskError
from errands.store.base import Decision
from errands.worker.attempt import Ended, Held
from errands.worker.outcomes import INTERNAL_ERROR, Backoff, end, retry_or_end

log = logging.getLogger("errands.worker")


def in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run ``fn(*args)`` in a new daemon thread; the future resolves on the calling loop (a hung
    sync handler can neither block the loop nor keep the process from exiting)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            error: BaseException | None = exc
            result = None
        else:
            error = None
        with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    # In the attempt's context: what the handler logs names its task and attempt.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(target,), name="errands-handler", daemon=True).start()
    return future


class HandlerExecutor:
    """Runs a task type's handler; its result, ``Fail``, ``Retry`` or exception is the outcome."""

    def __init__(self, clock: Clock, backoff: Backoff, rng: random.Random) -> None:
        self._clock = clock
        self._backoff = backoff
        self._rng = rng

    def begin(self, held: Held) -> asyncio.Future[Any]:
        handler = held.task_type.handler
        if handler is None:  # pragma: no cover - a TaskType has a handler or a provider
            raise RuntimeError(f"task type {held.task_type.name} has no handler")
        if held.task_type.is_async:
            return asyncio.ensure_future(handler(held.ctx, held.record.input))
        return in_thread(handler, held.ctx, held.record.input)

    def limit_s(self, held: Held) -> float:
        return held.record.timeout_s

    def _delay(self, held: Held) -> float:
        return self._backoff.delay_s(held.record.attempt, self._rng.random())

    def timed_out(self, held: Held, progress: int | None, message: str | None, limit_s: float) -> Decision:
        if not held.task_type.is_async:
            log.warning("sync handler of task %s still running after its timeout", held.record.id)
        error = TaskError("timeout", f"The attempt did not finish within {limit_s:g} s.")
        return retry_or_end(
            held.record, error, now=self._clock.now(), delay_s=self._delay(held),
            progress=progress, message=message, final=Status.TIMEOUT,
        )  # fmt: skip

    def ended(self, held: Held, ended: Ended) -> Decision:
        record, now = held.record, ended.now
        progress, message = ended.progress, ended.message
        raised = ended.future.exception()
        if raised is None:
            result = ended.future.result()
            try:
                check_json(result, what="the result", other_types=True)
                orjson.dumps(result)
            except (BadValue, TypeError) as exc:
                log.error("handler of task %s returned a value errands cannot store: %s", record.id, exc)
                bad = TaskError("invalid_result", "The task produced a result that could not be stored.")
                return end(record, bad, now=now, progress=progress, message=message)
            token = record.lease_token
            return lambda r: model.complete(r, now=now, lease_token=token, result=result, message=message)
        if isinstance(raised, Fail):
            return end(
                record, TaskError(raised.code, raised.message), now=now, progress=progress, message=message
            )
        if isinstance(raised, Retry):
            if record.attempt < record.max_attempts:
                error = TaskError("retry_requested", raised.message or "The handler asked for a retry.")
            else:
                error = TaskError(
                    "retries_exhausted",
                    raised.message or "The task asked for a retry but has no attempts left.",
                )
            delay = raised.after_s if raised.after_s is not None else self._delay(held)
            return retry_or_end(record, error, now=now, delay_s=delay, progress=progress, message=message)
        log.error(
            "handler of task %s (attempt %d/%d) raised", record.id, record.attempt, record.max_attempts,
            exc_info=raised,
        )  # fmt: skip
        return retry_or_end(
            record, INTERNAL_ERROR, now=now, delay_s=self._delay(held), progress=progress, message=message
        )
