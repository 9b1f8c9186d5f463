"""The sweeper: the periodic loop that enforces leases, deadlines, expiry and retention.

Each pass looks for

* running tasks whose lease ran out (their worker died or stalled): requeued with backoff while
  attempts remain, else ``failed`` with code ``worker_lost``;
* running tasks past their attempt's deadline (a worker that cannot enforce it, such as a hung
  sync handler): the same, ending ``timeout``;
* unfinished tasks past ``expires_at``: ``timeout`` with code ``expired``;
* pending tasks never started by their ``start_by`` (``start_within_s``): ``timeout`` with code
  ``not_started``;
* finished tasks older than the retention period: purged with their events, leaving a tombstone
  so their owner gets ``410 Gone``;
* external tasks whose provider has not reported in time: polled (every ``poll_every_s`` of their
  type, backing off while the provider fails to answer), and told to stop when they time out.
  A poll falls due at the task's ``poll_at``; beside its passes, the sweeper wakes when the next
  one falls due (at most once a second, at least every 5 s) and makes the polls then due.

Every change is re-checked when it is applied, so a sweeper racing a worker (or another sweeper)
changes nothing twice. Backoff needs no sweeping: a requeued task is claimable once its
``run_after`` passes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from errands import model
from errands.clock import Clock
from errands.config import Settings
from errands.errors import InvalidTransition, LeaseLost, NotFound
from errands.intake import Intake
from errands.metrics import Metrics
from errands.model import Change, Status, TaskError, TaskRecord
from errands.providers import Provider
from errands.registry import Registry
from errands.store.base import Decision, Lifecycle, Sweeping, Tasks


class _Store(Tasks, Sweeping, Lifecycle, Protocol):
    """What the sweeper needs of a store."""


log = logging.getLogger("errands.sweeper")

WORKER_LOST = TaskError("worker_lost", "The worker running the task stopped responding.")
#: The least a sweeper waits between two looks for due polls (a poll that cannot be made, for a
#: task type no longer registered say, leaves its task due: it is looked at this often, no more).
MIN_POLL_WAIT_S = 1.0
#: The most a sweeper waits between two looks for due polls (a task handed to its provider
#: since the last look is seen by the next: its first poll is at most this late).
MAX_POLL_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class SweepReport:
    requeued_or_failed: int = 0
    timed_out: int = 0
    expired: int = 0
    not_started: int = 0
    purged: int = 0
    polled: int = 0

    @property
    def total(self) -> int:
        return (
            self.requeued_or_failed
            + self.timed_out
            + self.expired
            + self.not_started
            + self.purged
            + self.polled
        )


class Sweeper:
    def __init__(
        self,
        store: _Store,
        settings: Settings,
        *,
        clock: Clock,
        rng: random.Random,
        registry: Registry,
        intake: Intake,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self._rng = rng
        self._registry = registry
        self._intake = intake
        self._poll_failures: dict[str, int] = {}
        self.last_error: str | None = None
        self._poll_error: str | None = None  # the last round of polls failed so

    def _delay(self, record: TaskRecord) -> float:
        return model.backoff_s(
            record.attempt,
            base_s=self.settings.retry_base_s,
            cap_s=self.settings.retry_cap_s,
            jitter=self._rng.random(),
        )

    def _lease_expired(self, now: float) -> Decision:
        def decide(r: TaskRecord) -> Change | None:
            if r.status is not Status.PROCESSING or r.lease_expires_at is None or r.lease_expires_at >= now:
                return None
            return model.fail_attempt(
                r,
                now=now,
                lease_token=r.lease_token,
                error=WORKER_LOST,
                retry=True,
                retry_delay_s=self._delay(r),
            )

        return decide

    def _past_deadline(self, now: float) -> Decision:
        def decide(r: TaskRecord) -> Change | None:
            if r.status is not Status.PROCESSING or r.deadline_at is None or r.deadline_at >= now:
                return None
            error = TaskError("timeout", f"The attempt did not finish within {r.timeout_s:g} s.")
            return model.fail_attempt(
                r,
                now=now,
                lease_token=r.lease_token,
                error=error,
                retry=True,
                retry_delay_s=self._delay(r),
                final_status=Status.TIMEOUT,
            )

        return decide

    def _expired(self, now: float) -> Decision:
        def decide(r: TaskRecord) -> Change | None:
            if r.status.terminal or r.expires_at >= now:
                return None
            return model.expire(r, now=now)

        return decide

    def _not_started(self, now: float) -> Decision:
        def decide(r: TaskRecord) -> Change | None:
            if r.status is not Status.PENDING or not model.too_late_to_start(r, now):
                return None
            return model.not_started(r, now=now)

        return decide

    async def sweep(self, *, polls: bool = True) -> SweepReport:
        """One pass; returns what it changed. ``polls``: also poll the providers whose polls are
        due (:meth:`run` polls on a timer of its own, so that a provider that is slow to answer
        holds up no sweep)."""
        now = self.clock.now()
        due = await self.store.due(now=now, limit=self.settings.sweep_batch)
        counts = []
        for ids, decide in (
            (due.expired, self._expired(now)),
            (due.not_started, self._not_started(now)),
            (due.past_deadline, self._past_deadline(now)),
            (due.lease_expired, self._lease_expired(now)),
        ):
            changed = 0
            if ids:
                outcomes = await self.store.apply_many([(task_id, decide) for task_id in ids])
                for outcome in outcomes:
                    if outcome.record is not None and outcome.record.updated_at == now:
                        changed += 1
                        if outcome.record.external_id and outcome.record.lease_token is None:
                            self._intake.cancel_at_provider(outcome.record)
                    elif outcome.error is not None and not isinstance(
                        outcome.error, InvalidTransition | LeaseLost | NotFound
                    ):
                        log.error("sweeping a task failed: %s", outcome.error)
            counts.append(changed)
        polled = await self._poll_due(now) if polls else 0
        purged = await self.store.purge(
            finished_before=now - self.settings.retention_s,
            tombstones_before=now - self.settings.tombstone_s,
            limit=self.settings.sweep_batch,
        )
        report = SweepReport(
            expired=counts[0],
            not_started=counts[1],
            timed_out=counts[2],
            requeued_or_failed=counts[3],
            purged=purged,
            polled=polled,
        )
        if report.total:
            log.info("sweep: %s", report)
            if self.metrics is not None:
                self.metrics.swept(dataclasses.asdict(report))
        return report

    # -- external providers -------------------------------------------------------------------

    def _provider_of(self, record: TaskRecord) -> tuple[Provider, float] | None:
        task_type = self._registry.task_types.get(record.type)
        if task_type is None or task_type.provider is None:
            return None
        return task_type.provider, task_type.poll_every_s

    async def _poll(self, ids: Sequence[str], now: float) -> int:
        """Ask the providers of handed-off tasks whose webhook has not come; apply the answers."""
        gate = asyncio.Semaphore(self.settings.poll_concurrency)

        async def poll_one(task_id: str) -> bool:
            async with gate:
                found = await self.store.get(task_id)
                if not isinstance(found, TaskRecord) or found.external_id is None or found.poll_at is None:
                    return False
                provider_and_pace = self._provider_of(found)
                if provider_and_pace is None:
                    return False
                provider, every_s = provider_and_pace
                external_id = found.external_id
                try:
                    update = await asyncio.wait_for(
                        provider.poll(external_id), self.settings.provider_timeout_s
                    )
                except Exception as exc:
                    failures = self._poll_failures.get(task_id, 0) + 1
                    self._poll_failures[task_id] = failures
                    log.warning("polling task %s at %s failed: %s", task_id, provider.name, exc)
                    await self.store.set_poll_at(task_id, now + min(300.0, every_s * 2**failures))
                    return False
                self._poll_failures.pop(task_id, None)
                record = await self._intake.polled(found, update)
                if record is None:
                    return False
                if record.status is Status.PROCESSING:
                    await self.store.set_poll_at(task_id, self.clock.now() + every_s)
                return True

        results = await asyncio.gather(*(poll_one(task_id) for task_id in ids), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("polling failed: %s", result)
        return sum(1 for r in results if r is True)

    async def poll_due(self) -> int:
        """Poll the providers of the running tasks whose poll has fallen due (between sweeps)."""
        polled = await self._poll_due(self.clock.now())
        if polled and self.metrics is not None:
            self.metrics.swept({"polled": polled})
        return polled

    async def _poll_due(self, now: float) -> int:
        ids = await self.store.due_polls(now=now, limit=self.settings.sweep_batch)
        return await self._poll(ids, now) if ids else 0

    async def run(self) -> None:
        """Sweep every ``sweep_interval_s`` until cancelled, and poll providers as their tasks'
        polls fall due (every ``poll_every_s``, not rounded up to a sweep; at most one wake-up
        each ``MIN_POLL_WAIT_S``, at least one each ``MAX_POLL_WAIT_S``). A round of polls runs
        beside the sweeps, one at a time: a provider that does not answer (each poll waits up to
        ``provider_timeout_s``) delays only the next round, never a sweep. Errors are logged and
        reported."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        polling: asyncio.Task[int] | None = None
        try:
            while True:
                wait_s = self.settings.sweep_interval_s
                try:
                    if not await self.store.hold_sweeper_lock():
                        if polling is not None and not polling.done():
                            polling.cancel()  # another node sweeps and polls now
                        self._poll_error = None
                    else:
                        if loop.time() >= next_sweep:
                            next_sweep = loop.time() + self.settings.sweep_interval_s
                            await self.sweep(polls=False)
                        if polling is None or polling.done():
                            polling = asyncio.create_task(self._poll_round(), name="errands-polls")
                        # Tasks handed to providers since are seen at the latest in MAX_POLL_WAIT_S.
                        wait_s = max(0.0, min(next_sweep - loop.time(), MAX_POLL_WAIT_S))
                        due_at = await self.store.next_poll_at()
                        if due_at is not None:
                            wait_s = min(wait_s, max(MIN_POLL_WAIT_S, due_at - self.clock.now()))
                    self.last_error = self._poll_error  # None, unless the last round failed
                except Exception as exc:
                    self.last_error = str(exc)
                    log.exception("sweep failed")
                await asyncio.sleep(wait_s)
        finally:
            if polling is not None and not polling.done():
                polling.cancel()
                await asyncio.wait({polling})  # its end, without taking its cancellation as ours

    async def _poll_round(self) -> int:
        try:
            polled = await self.poll_due()
        except Exception as exc:
            self._poll_error = self.last_error = str(exc)
            log.exception("polling providers failed")
            return 0
        self._poll_error = None
        return polled
