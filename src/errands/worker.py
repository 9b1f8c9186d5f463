"""Workers: claim tasks, run their handlers under a lease, and write the outcome.

One :class:`Worker` runs up to ``concurrency`` handlers at once in its process. It claims ready
tasks by priority then age, holds each under a lease it renews on a heartbeat, and writes the
outcome with the lease token as its fencing token: once the lease is lost (the task was
cancelled, timed out, or requeued by the sweeper after this process stalled) nothing it writes
lands. Async handlers run on the event loop; sync handlers each run in a daemon thread, so a hung
one can neither block the loop nor keep the process from exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from errands import model
from errands.app import Errands, TaskType
from errands.clock import Clock
from errands.config import Settings
from errands.context import Fail, Retry, TaskContext
from errands.errors import LeaseLost, NotFound, StoreError
from errands.hub import Hub
from errands.inputs import BadValue, check_json
from errands.model import Event, EventType, Status, TaskError, TaskRecord
from errands.providers import Callbacks, ProviderError, Submission
from errands.store.base import ClaimSpec, Decision, Store

log = logging.getLogger("errands.worker")

#: The shortest time between a claim that emptied the queue and the next one (see _idle).
_CLAIM_GAP_S = 0.004

INTERNAL_ERROR = TaskError("internal_error", "The task failed because of an internal error.")


def _provider_error(provider: str, reason: str) -> TaskError:
    return TaskError(
        "provider_unavailable", f"The provider '{provider}' did not take the task: {reason}"[:500]
    )


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run ``fn(*args)`` in a new daemon thread; the future resolves on the calling loop."""
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

    threading.Thread(target=target, name="errands-handler", daemon=True).start()
    return future


class _Progress:
    """Coalesces a handler's progress reports: at most one write per interval, last one kept."""

    def __init__(self, worker: Worker, record: TaskRecord, interval_s: float) -> None:
        self._worker = worker
        self._task_id = record.id
        self._token = record.lease_token or ""
        self._interval_s = interval_s
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._progress: int | None = None
        self._message: str | None = None
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._writing = False
        self._last_write = 0.0
        self._closed = False

    def report(self, progress: int | None, message: str | None) -> None:
        if threading.get_ident() == self._loop_thread:
            self._merge(progress, message)
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._merge, progress, message)

    def _merge(self, progress: int | None, message: str | None) -> None:
        if self._closed:
            return
        if progress is not None:
            self._progress = progress if self._progress is None else max(self._progress, progress)
        if message is not None:
            self._message = message
        self._dirty = True
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and not self._writing and self._dirty and not self._closed:
            delay = max(0.0, self._last_write + self._interval_s - time.monotonic())
            self._timer = self._loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._closed or not self._dirty:
            return
        self._dirty = False
        self._writing = True
        self._last_write = time.monotonic()
        self._worker.spawn(self._write(self._progress, self._message))

    async def _write(self, progress: int | None, message: str | None) -> None:
        now = self._worker.clock.now()
        token = self._token
        try:
            await self._worker.store.apply(
                self._task_id,
                lambda r: model.report_progress(
                    r, now=now, lease_token=token, progress=progress, message=message
                ),
            )
        except LeaseLost:
            self._worker.stop_task(self._task_id, "lost")
        except (NotFound, StoreError) as exc:
            log.warning("progress of task %s not saved: %s", self._task_id, exc)
        finally:
            self._writing = False
            self._schedule()

    def close(self) -> tuple[int | None, str | None]:
        """Stop writing; return the latest values, for the attempt's final write to carry."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._progress, self._message


@dataclass(eq=False)
class _Held:
    record: TaskRecord
    task_type: TaskType
    ctx: TaskContext
    progress: _Progress
    handler: asyncio.Future[Any] | None = None
    stop_reason: str | None = None  # "lost", "cancelled", "shutdown"
    finished: bool = False
    started_at: float = field(default_factory=time.monotonic)


class Worker:
    """Runs handlers of ``app`` against ``store``; see the module docstring."""

    def __init__(
        self,
        app: Errands,
        store: Store,
        hub: Hub,
        settings: Settings,
        *,
        clock: Clock,
        rng: random.Random,
        worker_id: str | None = None,
        callbacks: Callbacks | None = None,
    ) -> None:
        self.app = app
        self.callbacks = callbacks
        self.store = store
        self.clock = clock
        self.settings = settings
        self.id = worker_id or default_worker_id()
        self._rng = rng
        self._types = dict(app.task_types)
        self._specs = [ClaimSpec(t.name, t.concurrency_per_owner) for t in self._types.values()]
        self._limited = {t.name for t in self._types.values() if t.concurrency_per_owner is not None}
        self._ready_at: float | None = None  # when the next task in backoff becomes claimable
        self._ready_stale = True
        self._last_claim = -1e9  # loop time of the last claim
        #: Whether a claim could find something: set by announcements of work, by a claim that
        #: filled every free slot, and at start; cleared by each claim.
        self._maybe_work = True
        self._held: dict[str, _Held] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._runs: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._stopping = False
        hub.add_listener(self._on_event)
        store.add_work_listener(self._on_work)

    @property
    def running(self) -> int:
        return len(self._held)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Start a helper coroutine that is kept, and cancelled at shutdown."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- events from the hub ------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        held = self._held.get(event.task_id)
        if (
            held is not None
            and not held.finished
            and event.seq > held.record.seq  # older events (its creation) may arrive after our claim
            and event.status is not Status.PROCESSING
        ):
            # Someone else ended or requeued the task we run: our attempt no longer counts.
            self.stop_task(event.task_id, "cancelled" if event.status is Status.CANCELLED else "lost")
        if event.task_type not in self._types:
            return
        if event.type is EventType.RETRYING:
            self._ready_stale = True
            self._maybe_work = True
            self._wake.set()
        elif event.type is EventType.CREATED or (event.task_type in self._limited and event.status.terminal):
            # A finished task of a type with concurrency_per_owner may free its owner's turn.
            self._maybe_work = True
            self._wake.set()

    def _on_work(self) -> None:
        # An idle worker claims at once; a busy one hears of new work from the hub, which
        # gathers the announcements of several commits into one wake-up (under load, every
        # worker claiming per announcement mostly claims nothing).
        self._maybe_work = True
        if not self._held:
            self._wake.set()

    def stop_task(self, task_id: str, reason: str) -> None:
        """Stop a handler whose attempt no longer counts; it writes nothing afterwards."""
        held = self._held.get(task_id)
        if held is None or held.finished or held.stop_reason is not None:
            return
        held.stop_reason = reason
        held.ctx._cancel()
        if held.handler is not None:
            held.handler.cancel()
        log.info("task %s stopped on worker %s: %s", task_id, self.id, reason)

    # -- the claim loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and run tasks until :meth:`shutdown`."""
        if not self._specs:
            log.warning("worker %s has no task types to run", self.id)
        heartbeat = self.spawn(self._heartbeat())
        failures = 0
        try:
            while not self._stopping:
                free = self.settings.concurrency - len(self._held)
                self._wake.clear()
                if free <= 0:
                    await self._wake.wait()
                    continue
                if not self._maybe_work:
                    # A slot came free, but the last claim emptied the queue and nothing was
                    # announced since: claiming now would find nothing.
                    await self._idle()
                    if not self._maybe_work:
                        continue
                self._maybe_work = False
                try:
                    self._last_claim = asyncio.get_running_loop().time()
                    claimed = await self.store.claim(
                        worker_id=self.id, specs=self._specs, limit=free, lease_s=self.settings.lease_s
                    )
                    failures = 0
                except StoreError:
                    failures += 1
                    log.exception("claiming tasks failed")
                    await asyncio.sleep(min(10.0, 0.2 * 2**failures))
                    continue
                for record in claimed:
                    self._start(record)
                if len(claimed) >= free:
                    self._maybe_work = True  # the queue may hold more than there was room for
                elif not self._stopping:
                    await self._idle()
        finally:
            heartbeat.cancel()

    async def _idle(self) -> None:
        """Wait for a wake-up (a new or requeued task, a free slot), the next backoff to run
        out, or ``poll_s`` at most (for what no event announced)."""
        timeout = self.settings.poll_s
        now = self.clock.now()
        # Only a task.retrying event puts a task in backoff, so the next ready time is read
        # again only after one, or once it has passed.
        if self._ready_stale or (self._ready_at is not None and self._ready_at <= now):
            try:
                self._ready_at = await self.store.next_ready_at(list(self._types), after=now)
                self._ready_stale = False
            except StoreError:
                self._ready_at = None
        if self._ready_at is not None:
            timeout = min(timeout, max(0.001, self._ready_at - now))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            self._maybe_work = True  # a backoff ran out, or it is time to look anyway
        # The queue was empty a moment ago. When work arrives as fast as it is taken, every new
        # task wakes every worker: wait out a short gap since the last claim, so the next claim
        # takes what came meanwhile instead of each worker claiming (mostly nothing) per task.
        pause = self._last_claim + _CLAIM_GAP_S - asyncio.get_running_loop().time()
        if pause > 0:
            await asyncio.sleep(pause)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            leases = {
                task_id: held.record.lease_token or ""
                for task_id, held in self._held.items()
                if not held.finished and held.stop_reason is None
            }
            try:
                lost = await self.store.renew(leases, self.settings.lease_s)
            except StoreError:
                log.exception("renewing leases failed")
                continue
            for task_id in lost:
                self.stop_task(task_id, "lost")

    # -- one attempt --------------------------------------------------------------------------

    def _start(self, record: TaskRecord) -> None:
        task_type = self._types[record.type]
        progress = _Progress(self, record, self.settings.progress_interval_s)
        ctx = TaskContext(
            task_id=record.id,
            type=record.type,
            owner=record.owner,
            attempt=record.attempt,
            max_attempts=record.max_attempts,
            sink=progress,
        )
        held = _Held(record, task_type, ctx, progress)
        self._held[record.id] = held
        run = asyncio.create_task(self._attempt(held), name=f"errands-task-{record.id}")
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)

    async def _attempt(self, held: _Held) -> None:
        record = held.record
        try:
            decide = await self._execute(held)
            if decide is not None:
                held.finished = True
                await self._write_outcome(record, decide)
        except LeaseLost:
            log.info("the outcome of task %s was refused: this worker lost its lease", record.id)
        except (NotFound, StoreError) as exc:
            log.error("the outcome of task %s was not saved: %s", record.id, exc)
        except Exception:
            log.exception("worker %s failed while finishing task %s", self.id, record.id)
        finally:
            held.finished = True
            self._held.pop(record.id, None)
            self._wake.set()

    async def _write_outcome(self, record: TaskRecord, decide: Decision) -> None:
        """Write an attempt's outcome, retrying while the database is unreachable (a restart):
        for as long as the lease could still be ours, the result is worth keeping."""
        deadline = time.monotonic() + max(self.settings.lease_s, 5.0)
        delay = 0.1
        while True:
            try:
                await self.store.apply(record.id, decide)
                return
            except StoreError:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("saving the outcome of task %s failed; retrying", record.id)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    def _begin(self, held: _Held) -> asyncio.Future[Any]:
        """Start the attempt: the handler, or for an external type the submission to its provider."""
        record, task_type, ctx = held.record, held.task_type, held.ctx
        if task_type.provider is not None:
            if self.callbacks is None:
                raise RuntimeError("external task types need the runtime's callback URLs")
            job = Submission(
                task_id=record.id,
                type=record.type,
                owner=record.owner,
                input=record.input,
                attempt=record.attempt,
                callback_url=self.callbacks.signed(task_type.provider.name),
                capability_url=self.callbacks.capability(
                    record.id, record.attempt, record.callback_nonce or ""
                ),
            )
            return asyncio.ensure_future(task_type.provider.submit(job))
        if task_type.handler is None:  # pragma: no cover - a TaskType has one or the other
            raise RuntimeError(f"task type {task_type.name} has neither a handler nor a provider")
        if task_type.is_async:
            return asyncio.ensure_future(task_type.handler(ctx, record.input))
        return _in_thread(task_type.handler, ctx, record.input)

    async def _execute(self, held: _Held) -> Decision | None:
        record, task_type, ctx = held.record, held.task_type, held.ctx
        handler = self._begin(held)
        held.handler = handler
        if held.stop_reason is not None:  # stopped between the claim and this first step
            handler.cancel()
        limit_s = record.timeout_s
        if task_type.provider is not None:
            limit_s = min(limit_s, self.settings.provider_timeout_s)
        try:
            await asyncio.wait({handler}, timeout=limit_s)
        except asyncio.CancelledError:
            # The worker itself is being torn down: give the task back if we still hold it.
            held.stop_reason = held.stop_reason or "shutdown"
            handler.cancel()
            raise
        progress, message = held.progress.close()
        now = self.clock.now()
        token = record.lease_token
        timed_out = not handler.done()
        if timed_out:
            handler.cancel()
            ctx._cancel()
            if not task_type.is_async:
                log.warning("sync handler of task %s still running after its timeout", record.id)
            if task_type.provider is not None:
                error = _provider_error(task_type.provider.name, f"no answer within {limit_s:g} s")
                return self._retry_or_end(record, error, progress, message)
            error = TaskError("timeout", f"The attempt did not finish within {record.timeout_s:g} s.")
            return self._retry_or_end(record, error, progress, message, final=Status.TIMEOUT)
        if handler.cancelled():
            if held.stop_reason in ("lost", "cancelled"):
                return None
            if held.stop_reason == "shutdown":
                return lambda r: model.release(r, now=now, lease_token=token or "")
            return self._retry_or_end(record, INTERNAL_ERROR, progress, message)
        error_raised = handler.exception()
        if task_type.provider is not None:
            return self._after_submission(record, task_type, handler, error_raised, now)
        if error_raised is None:
            result = handler.result()
            try:
                check_json(result, what="the result", other_types=True)
                orjson.dumps(result)
            except (BadValue, TypeError) as exc:
                log.error("handler of task %s returned a value errands cannot store: %s", record.id, exc)
                bad = TaskError("invalid_result", "The task produced a result that could not be stored.")
                return self._end(record, bad, progress, message)
            return lambda r: model.complete(r, now=now, lease_token=token, result=result, message=message)
        if isinstance(error_raised, Fail):
            return self._end(record, TaskError(error_raised.code, error_raised.message), progress, message)
        if isinstance(error_raised, Retry):
            if record.attempt < record.max_attempts:
                error = TaskError("retry_requested", error_raised.message or "The handler asked for a retry.")
            else:
                error = TaskError(
                    "retries_exhausted",
                    error_raised.message or "The task asked for a retry but has no attempts left.",
                )
            return self._retry_or_end(record, error, progress, message, delay_s=error_raised.after_s)
        log.error(
            "handler of task %s (attempt %d/%d) raised",
            record.id,
            record.attempt,
            record.max_attempts,
            exc_info=error_raised,
        )
        return self._retry_or_end(record, INTERNAL_ERROR, progress, message)

    def _after_submission(
        self,
        record: TaskRecord,
        task_type: TaskType,
        handler: asyncio.Future[Any],
        error_raised: BaseException | None,
        now: float,
    ) -> Decision:
        provider = task_type.provider
        assert provider is not None
        token = record.lease_token or ""
        if error_raised is None and isinstance(handler.result(), str) and handler.result():
            external_id: str = handler.result()
            poll_at = now + task_type.poll_after_s
            return lambda r: model.hand_off(
                r, now=now, lease_token=token, external_id=external_id, poll_at=poll_at
            )
        if isinstance(error_raised, ProviderError):
            reason = error_raised.message
        elif error_raised is None:
            reason = "it returned no job id"
        else:
            log.error(
                "submitting task %s to provider %s failed", record.id, provider.name, exc_info=error_raised
            )
            reason = type(error_raised).__name__
        return self._retry_or_end(record, _provider_error(provider.name, reason), None, None)

    def _retry_or_end(
        self,
        record: TaskRecord,
        error: TaskError,
        progress: int | None,
        message: str | None,
        *,
        final: Status = Status.FAILED,
        delay_s: float | None = None,
    ) -> Decision:
        if delay_s is None:
            delay_s = model.backoff_s(
                record.attempt,
                base_s=self.settings.retry_base_s,
                cap_s=self.settings.retry_cap_s,
                jitter=self._rng.random(),
            )
        now, token, wait = self.clock.now(), record.lease_token, delay_s
        return lambda r: model.fail_attempt(
            r,
            now=now,
            lease_token=token,
            error=error,
            retry=True,
            retry_delay_s=wait,
            final_status=final,
            progress=progress,
            message=message,
        )

    def _end(
        self, record: TaskRecord, error: TaskError, progress: int | None, message: str | None
    ) -> Decision:
        now, token = self.clock.now(), record.lease_token
        return lambda r: model.fail_attempt(
            r,
            now=now,
            lease_token=token,
            error=error,
            retry=False,
            retry_delay_s=0,
            progress=progress,
            message=message,
        )

    # -- shutdown -----------------------------------------------------------------------------

    def hurry(self) -> None:
        """Cut the grace period of a shutdown short (a second signal)."""
        self._hurry.set()

    async def shutdown(self, grace_s: float) -> None:
        """Stop claiming; let running handlers finish within ``grace_s``; give the rest back."""
        self._stopping = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._runs and not self._hurry.is_set() and (left := deadline - loop.time()) > 0:
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait({*self._runs, hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
        for task_id in list(self._held):
            self.stop_task(task_id, "shutdown")
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=10)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
