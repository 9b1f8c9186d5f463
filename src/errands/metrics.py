"""Prometheus metrics of one process (``/metrics``, see ``docs/operations.md``).

Each process counts what it did itself, in a registry of its own, so every node and worker is
scraped on its own and Prometheus adds them up: the tasks this process created and ended (from
the events of its own commits, which the hub hands over right after each commit), the webhooks
its API received, the messages its notifier sent, what its sweeper did and the errors its loops
logged. Gauges that describe the whole store (pending tasks by type, the hub's lag behind the
log) are read when scraped (from the pending tasks only, so a scrape stays cheap).

Label values are bounded: task types and providers the app registered (anything else counts as
``other``), statuses, outcomes, channels and component names; never a task id or an owner.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from errands.errors import StoreError
from errands.model import Event, EventType

#: Seconds, for queue wait and run time: from a few milliseconds to a long job's hour.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: The parts of errands whose logged errors are counted (``errands.<component>`` loggers).
COMPONENTS = frozenset(
    {"api", "hub", "worker", "sweeper", "scheduler", "notify", "store", "server", "providers", "intake"}
)
OTHER = "other"


class Metrics:
    """The metrics of one runtime; ``types`` and ``providers`` bound the labels."""

    def __init__(self, types: Iterable[str], providers: Iterable[str]) -> None:
        self.types = frozenset(types)
        self.providers = frozenset(providers)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submitted = Counter(
            "errands_tasks_submitted", "Tasks created by this process.", ["type"], registry=r
        )
        self.finished = Counter(
            "errands_tasks_finished",
            "Tasks this process ended, by how they ended.",
            ["type", "status"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "errands_queue_wait_seconds",
            "From a task's queueing (or coming due) to the start of its attempt, for the attempts this "
            "process started.",
            ["type"],
            buckets=BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "errands_run_seconds",
            "From the start of a task's last attempt to its end, for the tasks this process ended.",
            ["type"],
            buckets=BUCKETS,
            registry=r,
        )
        self.webhooks = Counter(
            "errands_webhooks_received",
            "Provider reports (webhooks, capability URLs) this process received, by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.notifications = Counter(
            "errands_notifications",
            "Delivery attempts of outbound messages by this process: delivered, retry (to be sent again) "
            "or failed (given up).",
            ["channel", "outcome"],
            registry=r,
        )
        self.sweeper = Counter(
            "errands_sweeper_actions",
            "Tasks this process's sweeper acted on, by action.",
            ["action"],
            registry=r,
        )
        self.watches = Gauge(
            "errands_watches_open", "Watches (SSE, WebSocket) open on this process.", registry=r
        )
        self._store_view = _StoreView()
        r.register(self._store_view)
        r.register(_ErrorCollector())

    # -- labels -------------------------------------------------------------------------------

    def type_label(self, task_type: str) -> str:
        return task_type if task_type in self.types else OTHER

    def provider_label(self, provider: str) -> str:
        return provider if provider in self.providers else OTHER

    # -- what the process did -----------------------------------------------------------------

    def committed(self, events: Sequence[Event]) -> None:
        """Count the events of one of this process's commits."""
        created: Tally[str] = Tally()
        for event in events:
            kind = event.type
            if kind is EventType.CREATED:
                created[event.task_type] += 1  # a batch's thousand: one increment per type
            elif kind is EventType.PROCESSING:
                record = event.record
                if record is not None and record.started_at is not None:
                    wait = max(0.0, record.started_at - record.queued_at)
                    self.queue_wait.labels(self.type_label(event.task_type)).observe(wait)
            elif event.status.terminal and kind is not EventType.NOTIFIED:
                label = self.type_label(event.task_type)
                self.finished.labels(label, event.status.value).inc()
                record = event.record
                if record is not None and record.started_at is not None and record.finished_at is not None:
                    self.run_time.labels(label).observe(max(0.0, record.finished_at - record.started_at))
        for task_type, count in created.items():
            self.submitted.labels(self.type_label(task_type)).inc(count)

    def webhook(self, provider: str, outcome: str) -> None:
        self.webhooks.labels(self.provider_label(provider), outcome).inc()

    def notification(self, channel: str, outcome: str) -> None:
        self.notifications.labels(channel, outcome).inc()

    def swept(self, actions: Mapping[str, int]) -> None:
        for action, count in actions.items():
            if count:
                self.sweeper.labels(action).inc(count)

    # -- scraping -----------------------------------------------------------------------------

    def reads(self, read: Callable[[], Awaitable[StoreReading]]) -> None:
        """Where a scrape gets what the store says (pending tasks, the hub's lag)."""
        self._store_view.read = read

    async def render(self) -> bytes:
        """The text exposition of every metric."""
        await self._store_view.refresh()
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class StoreReading:
    """What a scrape reads from the store: pending tasks by type, providers held (seconds left),
    and how many events of the log this process's hub has yet to read."""

    pending: Mapping[str, int]
    held_s: Mapping[str, float]
    lag: int


class _StoreView(Collector):
    def __init__(self) -> None:
        self.read: Callable[[], Awaitable[StoreReading]] | None = None
        self._last: StoreReading | None = None
        self._failed = False

    async def refresh(self) -> None:
        if self.read is None:
            return
        try:
            self._last = await self.read()
            self._failed = False
        except StoreError:
            self._failed = True  # the last reading stays; errands_store_up says it is stale

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("errands_store_up", "Whether the last scrape could read the store.")
        up.add_metric([], 0.0 if self._failed or self._last is None else 1.0)
        yield up
        if self._last is None:
            return
        pending = GaugeMetricFamily(
            "errands_tasks_pending", "Pending tasks in the store, by type.", labels=["type"]
        )
        for task_type, count in sorted(self._last.pending.items()):
            pending.add_metric([task_type], count)
        yield pending
        held = GaugeMetricFamily(
            "errands_provider_held_seconds",
            "Seconds left of a provider's request to wait (back-pressure); 0 when it is not held.",
            labels=["provider"],
        )
        for provider, left in sorted(self._last.held_s.items()):
            held.add_metric([provider], left)
        yield held
        lag = GaugeMetricFamily(
            "errands_hub_lag_events", "Events of the log this process's hub has not read yet."
        )
        lag.add_metric([], self._last.lag)
        yield lag


# -- errors the loops log -----------------------------------------------------------------------

_errors: Tally[str] = Tally()
_store_errors: Tally[str] = Tally()


class _CountErrors(logging.Handler):
    """Counts the errors logged by errands' components (one count for the whole process).

    It must not change where a record goes: where no other handler takes errands' records
    (an app that configured no logging), Python's last resort still prints them."""

    def emit(self, record: logging.LogRecord) -> None:
        parts = record.name.split(".")
        if record.levelno >= logging.ERROR and len(parts) >= 2 and parts[0] == "errands":
            component = parts[1] if parts[1] in COMPONENTS else OTHER
            _errors[component] += 1
            if _store_failure(record):
                _store_errors[component] += 1
        last = logging.lastResort
        if last is not None and record.levelno >= last.level and not self._others(record.name):
            last.handle(record)

    def _others(self, name: str) -> bool:
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False


def _store_failure(record: logging.LogRecord) -> bool:
    found: list[Any] = [record.exc_info[1]] if record.exc_info else []
    if isinstance(record.args, tuple):
        found += record.args
    for value in found:
        cause = value
        while isinstance(cause, BaseException):
            if isinstance(cause, StoreError):
                return True
            cause = cause.__cause__
    return False


class _ErrorCollector(Collector):
    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "errands_errors", "Errors the components of this process logged.", labels=["component"]
        )
        store = CounterMetricFamily(
            "errands_store_errors",
            "Errors of the store (the database could not be read or written) the components of this "
            "process met and logged.",
            labels=["component"],
        )
        for family, tally in ((errors, _errors), (store, _store_errors)):
            for component in sorted(COMPONENTS | {OTHER}):
                family.add_metric([component], tally[component])
            yield family


_HANDLER = _CountErrors()  # every level: what it does not count it may have to pass on


def count_logged_errors() -> None:
    """Count errands' logged errors from now on (once per process; idempotent)."""
    logger = logging.getLogger("errands")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
