"""Workers: claim tasks, hold each under a lease, run it, and write the outcome.

One :class:`Worker` runs up to ``concurrency`` attempts at once in its process. It claims ready
tasks by priority then age, holds each under a lease it renews on a heartbeat, and writes the
outcome with the lease token as its fencing token: once the lease is lost (the task was
cancelled, timed out, or requeued by the sweeper after this process stalled) nothing it writes
lands. Each attempt is run by its task type's executor: a local handler
(:mod:`errands.worker.handlers`) or a submission to a provider (:mod:`errands.worker.providers`);
everything else (leases, timeouts, cancellation, retries) is the same for both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import secrets
import socket
import time
from typing import Any, Protocol

from errands import model
from errands.clock import Clock, on_advance
from errands.config import Settings
from errands.context import TaskContext
from errands.errors import LeaseLost, NotFound, StoreError, StreamGap
from errands.hub import DEAF_POLL_S, Hub
from errands.logs import in_task
from errands.model import Event, EventType, Status, TaskRecord
from errands.providers import Callbacks, ProviderBusy
from errands.registry import Registry
from errands.store.base import Decision, Hint, Meta, Tasks, Work
from errands.store.records import ClaimSpec
from errands.waits import wait_set
from errands.worker.attempt import Ended, Executor, Held, StopReason
from errands.worker.handlers import HandlerExecutor
from errands.worker.holds import Holds
from errands.worker.outcomes import INTERNAL_ERROR, Backoff, retry_or_end
from errands.worker.pace import Pace, mine
from errands.worker.progress import Progress
from errands.worker.providers import ProviderExecutor
from errands.worker.streams import Part, Streams

log = logging.getLogger("errands.worker")


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _Store(Tasks, Meta, Protocol):
    """What a worker needs of a store."""


class Worker:
    """Runs the tasks of ``registry`` against ``store``; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        store: _Store,
        hub: Hub,
        settings: Settings,
        *,
        clock: Clock,
        rng: random.Random,
        callbacks: Callbacks,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.settings = settings
        self.id = worker_id or default_worker_id()
        self._rng = rng
        backoff = Backoff(settings.retry_base_s, settings.retry_cap_s)
        self._handlers: Executor = HandlerExecutor(clock, backoff, rng)
        self._providers: Executor = ProviderExecutor(
            clock, backoff, rng, callbacks, settings.provider_timeout_s
        )
        self._backoff = backoff
        self._types = dict(registry.task_types)
        bounds = registry.bounds()
        self._specs = [ClaimSpec(name, bounds=bounds[name]) for name in self._types]
        # The types whose tasks' ends may give a turn away (a concurrency limit).
        self._limited = {
            name for name in self._types if any(b.limit.concurrency is not None for b in bounds[name])
        }
        self._flow_at: float | None = None  # when a task a limit held back may be allowed
        self._holds = Holds(store, {t.name: t.provider.name for t in self._types.values() if t.provider})
        self._ready_at: float | None = None  # when the next task in backoff becomes claimable
        self._ready_stale = True
        self._pace = Pace()  # when to claim after work is announced
        self._claimed_at = 0.0  # the clock's time as the last claim began
        #: Whether a claim could find something: set by announcements of work, by a claim that
        #: filled every free slot, and at start; cleared by each claim.
        self._maybe_work = True
        self._held: dict[str, Held] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._runs: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        on_advance(clock, self._wake.set)  # a controlled clock's timers fire as it is moved
        self._hurry = asyncio.Event()
        self._stopping = False
        self._hub = hub
        hub.add_listener(self._on_event)
        # An end elsewhere matters only where a limit counts the running tasks.
        hub.on_hints(
            self._on_hints, wants=Hint.WORK | Hint.LATER | (Hint.ENDED if self._limited else Hint.NONE)
        )

    @property
    def running(self) -> int:
        return len(self._held)

    def followed(self) -> dict[str, int]:
        """The tasks whose events matter here (those it runs), each after its claim's seq:
        what a worker process's hub follows (:meth:`Hub.follow_only`)."""
        return {task_id: held.record.seq for task_id, held in self._held.items() if not held.finished}

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
            self.stop_task(
                event.task_id, StopReason.CANCELLED if event.status is Status.CANCELLED else StopReason.LOST
            )
        if event.task_type not in self._types:
            return
        if event.waits:
            self._ready_stale = True  # it is due later: the timer may have to fire sooner
            self._holds.stale = True  # ...perhaps because its provider asked to wait
            self._wake.set()
        if (event.type in (EventType.CREATED, EventType.RETRYING) and not event.waits) or (
            event.task_type in self._limited and (event.status.terminal or event.type is EventType.RETRYING)
        ):
            # A task of a limited type that ended or left its worker frees a slot of its limits.
            self._maybe_work = True
            self._wake.set()

    def _on_hints(self, hint: Hint, work: Work) -> None:
        # Where the hub follows only this worker's tasks (a worker process), the hints stand in
        # for the events _on_event would have seen: a task may wait to be due (delayed, or a
        # retry's backoff), and an end may give an owner's turn away.
        if hint & Hint.LATER:
            self._ready_stale = True
            self._holds.stale = True
            if len(self._held) < self.settings.concurrency:
                self._wake.set()
        # Work of types it does not run is not this worker's: claiming for it would find nothing.
        ours = mine(work, self._types) if hint & Hint.WORK else 0
        if ours or (hint & Hint.ENDED and self._limited):
            # A worker with a free slot claims (while work comes as a stream, after the short gap
            # of _idle, which gathers the announcements of several commits into one claim); a
            # full one claims when a slot comes free.
            self._maybe_work = True
            self._pace.heard(ours)
            if len(self._held) < self.settings.concurrency:
                self._wake.set()

    def stop_task(self, task_id: str, reason: StopReason) -> None:
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
                stops = self._hub.stops
                announced = self._pace.claiming(time.monotonic())
                try:
                    self._claimed_at = self.clock.now()
                    # (Deaf, it hears of no hold stored elsewhere: it reads them now and then.)
                    held = await self._holds.held_types(
                        self._claimed_at, max_age_s=DEAF_POLL_S if self._hub.deaf else math.inf
                    )
                    specs = [s for s in self._specs if s.type not in held] if held else self._specs
                    claimed = await self.store.claim(
                        worker_id=self.id,
                        specs=specs,
                        limit=free,
                        lease_s=self.settings.lease_s,
                        alone=self._pace.alone(announced),
                    )
                    failures = 0
                except StoreError:
                    failures += 1
                    log.exception("claiming tasks failed")
                    self._maybe_work = True  # what was announced is still to be claimed
                    self._pace.heard(announced)
                    await asyncio.sleep(min(10.0, 0.2 * 2**failures))
                    continue
                # Tasks held back by a provider's hold or a rate were not taken by others: such a
                # claim changes no estimate, and it listens again (it hears when they allow more).
                limited = bool(held) or claimed.retry_at is not None
                if not limited:  # (deaf, what it claims is all it knows of the stream)
                    self._pace.claimed(
                        announced=announced, claimed=len(claimed), free=free, heard=not self._hub.deaf
                    )
                self._hub.deafen(self._pace.deaf and not limited)
                self._flow_at = claimed.retry_at
                for record in claimed:
                    self._start(record)
                if claimed and self._hub.stops != stops:
                    # A task may have been stopped before the hub knew it was ours: look again.
                    self._hub.wake()
                if len(claimed) >= free:
                    self._maybe_work = True  # the queue may hold more than there was room for
                elif not self._stopping:
                    await self._idle()
        finally:
            heartbeat.cancel()

    async def _idle(self) -> None:
        """Wait for a wake-up (a new or requeued task, a free slot), the next backoff to run
        out, or ``poll_s`` at most (for what no event announced); deaf, the pace's gap at most."""
        timeout = self.settings.poll_s
        now = self.clock.now()
        # Only a change that leaves a task waiting (event.waits, Hint.LATER) makes a task due
        # later, so the next ready time is read again only after one, or once it has passed.
        if self._ready_stale or (self._ready_at is not None and self._ready_at <= now):
            # Cleared before the read: a retry committed while it runs marks it stale again.
            self._ready_stale = False
            try:
                # After the last claim's time, not now: a backoff that ran out in between is
                # due, and the wait for it is then short, not poll_s.
                self._ready_at = await self.store.next_ready_at(list(self._types), after=self._claimed_at)
            except StoreError:
                self._ready_at = None
                self._ready_stale = True
        if self._ready_at is not None:
            timeout = min(timeout, max(0.001, self._ready_at - now))
        if self._flow_at is not None:
            timeout = min(timeout, max(0.001, self._flow_at - now))
        if self._hub.deaf:  # no announcement will come: the next claim is on its pace
            timeout = min(timeout, max(0.001, self._pace.pause(time.monotonic())))
        if not await wait_set(self._wake, timeout):
            self._maybe_work = True  # a backoff ran out, or it is time to look anyway
        later = self.clock.now()
        if self._ready_at is not None and self._ready_at <= later:
            self._maybe_work = True  # a delayed task came due
        if self._flow_at is not None and self._flow_at <= later:
            self._maybe_work = True  # a rate allows the next start
        # The queue was empty a moment ago. While work comes as a stream, every new task wakes
        # every worker: wait out a short gap since the last claim, so that the next claim takes
        # what came meanwhile (see errands.worker.pace).
        pause = self._pace.pause(time.monotonic())
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
                self.stop_task(task_id, StopReason.LOST)

    # -- one attempt --------------------------------------------------------------------------

    def _start(self, record: TaskRecord) -> None:
        task_type = self._types[record.type]
        token = record.lease_token or ""

        async def write_progress(progress: int | None, message: str | None) -> None:
            now = self.clock.now()
            try:
                held.wrote(
                    await self.store.apply(
                        record.id,
                        lambda r: model.report_progress(
                            r, now=now, lease_token=token, progress=progress, message=message
                        ),
                    )
                )
            except LeaseLost:
                self.stop_task(record.id, StopReason.LOST)
            except (NotFound, StoreError) as exc:
                log.warning("progress of task %s not saved: %s", record.id, exc)

        give_up_at: list[float] = []  # once writes fail: when this attempt stops retrying them

        async def write_streams(parts: list[Part]) -> None:
            """Each part, retried while the database is unreachable, for at most a lease's time
            in all this attempt and never once the attempt is stopped (positions make a repeat
            harmless); never raises."""
            for part in parts:
                delay = 0.1
                while True:
                    now = self.clock.now()
                    try:
                        held.wrote(
                            await self.store.apply(
                                record.id,
                                lambda r, p=part, at=now: model.stream_output(  # type: ignore[misc]
                                    r, now=at, lease_token=token, name=p.name, index=p.index, chunks=p.chunks
                                ),
                            )
                        )
                        break
                    except LeaseLost:
                        self.stop_task(record.id, StopReason.LOST)
                        return
                    except StreamGap as exc:  # an earlier write of this stream was given up
                        log.warning("stream output of task %s not saved: %s", record.id, exc.message)
                        break
                    except (NotFound, StoreError) as exc:
                        if not give_up_at:
                            give_up_at.append(time.monotonic() + max(self.settings.lease_s, 5.0))
                        held_now = self._held.get(record.id)
                        stopped = held_now is not None and held_now.stop_reason is not None
                        if isinstance(exc, NotFound) or stopped or time.monotonic() + delay > give_up_at[0]:
                            log.warning("stream output of task %s not saved: %s", record.id, exc)
                            break
                        await asyncio.sleep(delay)
                        delay = min(2.0, delay * 2)

        progress = Progress(self.settings.progress_interval_s, write_progress, self.spawn)
        streams = Streams(
            write_streams,
            self.spawn,
            flush_s=self.settings.stream_flush_s,
            max_bytes=self.settings.stream_max_bytes,
        )
        ctx = TaskContext(
            task_id=record.id,
            type=record.type,
            owner=record.owner,
            attempt=record.attempt,
            max_attempts=record.max_attempts,
            sink=progress,
            streams=streams,
        )
        held = Held(record, task_type, ctx, progress, streams, latest=record)
        self._held[record.id] = held
        run = asyncio.create_task(
            self._attempt(held), name=f"errands-task-{record.id}", context=in_task(record.id, record.attempt)
        )
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)

    async def _attempt(self, held: Held) -> None:
        record = held.record
        try:
            decide = await self._execute(held)
            if decide is not None:
                held.finished = True
                await self._write_outcome(record, decide, held.latest)
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

    async def _write_outcome(self, record: TaskRecord, decide: Decision, seen: TaskRecord | None) -> None:
        """Write an attempt's outcome, retrying while the database is unreachable (a restart):
        for as long as the lease could still be ours, the result is worth keeping. ``seen``: the
        row as this worker last wrote it (the store may decide on it, see ``Tasks.apply``)."""
        deadline = time.monotonic() + max(self.settings.lease_s, 5.0)
        delay = 0.1
        while True:
            try:
                await self.store.apply(record.id, decide, seen=seen)
                return
            except StoreError:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("saving the outcome of task %s failed; retrying", record.id)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _execute(self, held: Held) -> Decision | None:
        """Run the attempt to its end (or its limit) and decide its outcome; ``None`` when it no
        longer counts (its lease is gone, or the task was cancelled)."""
        record, ctx = held.record, held.ctx
        executor = self._providers if held.task_type.provider is not None else self._handlers
        future = executor.begin(held)
        held.handler = future
        if held.stop_reason is not None:  # stopped between the claim and this first step
            future.cancel()
        limit_s = executor.limit_s(held)
        try:
            await asyncio.wait({future}, timeout=limit_s)
        except asyncio.CancelledError:
            # The worker itself is being torn down: give the task back if we still hold it.
            held.stop_reason = held.stop_reason or StopReason.SHUTDOWN
            future.cancel()
            raise
        progress, message = held.progress.close()
        timed_out = not future.done()
        if timed_out:
            future.cancel()
            ctx._cancel()
        # What the handler streamed lands before its outcome (unless the attempt no longer counts).
        try:
            keep = held.stop_reason not in (StopReason.LOST, StopReason.CANCELLED)
            await asyncio.wait_for(held.streams.close(write=keep), max(self.settings.lease_s, 5.0))
        except Exception:  # the outcome matters more than the last chunks
            log.exception("the streams of task %s were not closed cleanly", record.id)
        now = self.clock.now()
        if timed_out:
            return executor.timed_out(held, progress, message, limit_s)
        busy = None if future.cancelled() else future.exception()
        if isinstance(busy, ProviderBusy) and held.task_type.provider is not None:
            # Every task of the provider waits, not only this one, and the attempt does not count.
            until = now + busy.retry_after_s
            await self._holds.hold(record.type, until)
            token = record.lease_token or ""
            note = f"waiting: {busy.message}"[:200]
            return lambda r: model.release(r, now=now, lease_token=token, until=until, message=note)
        if future.cancelled():
            if held.stop_reason in (StopReason.LOST, StopReason.CANCELLED):
                return None
            if held.stop_reason is StopReason.SHUTDOWN:
                token = record.lease_token or ""
                return lambda r: model.release(r, now=now, lease_token=token)
            delay = self._backoff.delay_s(record.attempt, self._rng.random())
            return retry_or_end(
                record, INTERNAL_ERROR, now=now, delay_s=delay, progress=progress, message=message
            )
        return executor.ended(held, Ended(future, progress, message, now))

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
            self.stop_task(task_id, StopReason.SHUTDOWN)
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=10)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
