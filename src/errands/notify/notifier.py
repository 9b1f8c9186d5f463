"""The notifier: from the event log to messages, and from messages to their receivers.

Two loops. **Fan-out** reads the event log after a durable cursor, turns each event into one
message per destination that wants it (endpoints, the task's own ``notify_url``, lifecycle hooks,
WeChat templates) and stores them while moving the cursor, in one transaction: an event is
turned into messages exactly once, even with several processes, and none is lost if the process
dies. **Delivery** claims due messages under a lease (a process that dies mid-delivery loses its
claim when the lease runs out, and the message is sent again), sends each, and records the attempt
and what follows from it (see :mod:`errands.notify.policy`).

Both loops wake on local commits, on other processes' commits (PostgreSQL), when a retry falls
due, and every ``notify_poll_s`` in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Protocol

from errands.clock import Clock
from errands.config import Settings
from errands.errors import StoreError
from errands.guard import AddressPolicy
from errands.hub import Hub
from errands.inputs import new_task_id
from errands.metrics import Metrics
from errands.model import Event
from errands.notify.lifecycle import Hook, hook_route, run_hook
from errands.notify.policy import Route, Sent, after_attempt, endpoint_route, plan
from errands.notify.webhooks import WebhookSender
from errands.notify.wechat import WeChat
from errands.registry import Registry
from errands.store.base import EventLog, Outbox
from errands.store.records import Channel, Endpoint, Message, MessageState


class _Store(Outbox, EventLog, Protocol):
    """What the notifier needs of a store."""


log = logging.getLogger("errands.notify")

FAN_OUT_BATCH = 500
#: At most one fan-out pass per this many seconds: under load each pass takes many events at
#: once instead of one pass per commit; when idle, an event is picked up at once.
FAN_OUT_EVERY_S = 0.05
_LEASE_MARGIN_S = 30.0


def new_message_id() -> str:
    return "msg_" + new_task_id()


class Notifier:
    """Fan-out and delivery for one process (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        store: _Store,
        hub: Hub,
        settings: Settings,
        *,
        clock: Clock,
        rng: random.Random,
        guard: AddressPolicy,
        default_secret: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.hub = hub
        self.settings = settings
        self.clock = clock
        self._rng = rng
        self.default_secret = default_secret
        self.schedule = settings.retry_schedule
        self.guard = guard
        self.sender = WebhookSender(guard, clock, timeout_s=settings.notify_timeout_s)
        self.hooks: dict[str, Hook] = dict(registry.hooks)
        self.wechat: WeChat | None = None
        if registry.wechat_config is not None:
            self.wechat = WeChat(
                registry.wechat_config,
                appid=settings.wechat_appid,
                secret=None if settings.wechat_secret is None else settings.wechat_secret.get_secret_value(),
                base_url=settings.wechat_base_url,
                clock=clock,
            )
        self.channels = (
            Channel.ENDPOINT,
            Channel.URL,
            *((Channel.WECHAT,) if self.wechat is not None else ()),
        )
        longest = max(
            [settings.notify_timeout_s, settings.hook_timeout_s]
            + [h.timeout_s for h in self.hooks.values() if h.timeout_s is not None]
            + ([self.wechat.timeout_s * 3] if self.wechat is not None else [])
        )
        self.lease_s = settings.notify_lease_s or longest + _LEASE_MARGIN_S
        self._fan_out_wake = asyncio.Event()
        self._deliver_wake = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.notify_concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None
        self._skipped_at = 0.0

    def wake(self) -> None:
        """Something may have changed: look at the log and at due messages."""
        self._fan_out_wake.set()
        self._deliver_wake.set()

    def _on_event(self, event: Event) -> None:
        # A committed event (here or elsewhere, as the hub follows the log): there is something
        # to fan out. Messages other nodes stored are delivered by them (at once) or found here
        # by the next poll: claiming after every event would cost a query per event.
        del event
        self._fan_out_wake.set()

    # -- fan-out ------------------------------------------------------------------------------

    async def _routes(self) -> list[Route]:
        endpoints = await self.store.list_endpoints()
        routes = [endpoint_route(e) for e in endpoints if e.enabled]
        routes.extend(hook_route(h) for h in self.hooks.values())
        return routes

    async def fan_out(self) -> int:
        """Turn the events after the cursor into messages until the log is caught up; returns the
        number of messages stored by this call."""
        stored = 0
        while True:
            cursor = await self.store.notify_cursor()
            routes = await self._routes()
            if not routes and self.wechat is None and await self._skip(cursor):
                return stored
            events = (await self.store.read_log(cursor, limit=FAN_OUT_BATCH)).events
            if not events:
                return stored
            pick = self.wechat.pick if self.wechat is not None else None
            messages = plan(events, routes, now=self.clock.now(), new_id=new_message_id, pick=pick)
            if await self.store.add_messages(cursor, events[-1].seq, messages):
                stored += len(messages)
                if messages:
                    self._deliver_wake.set()
            if len(events) < FAN_OUT_BATCH:
                return stored

    async def _skip(self, cursor: int) -> bool:
        """With no endpoint, hook or WeChat template, only tasks' own ``notify_url`` can want an
        event (of their end): when no such task ended after the cursor, move past the log
        without reading it (persisting that at most once a second: redoing it after a restart
        costs nothing)."""
        upto = await self.store.last_seq()  # first: a task changed later has a higher seq
        if upto <= cursor:
            return True
        if await self.store.notify_urls_after(cursor):
            return False
        now = asyncio.get_running_loop().time()
        if now - self._skipped_at >= 1.0:
            self._skipped_at = now
            await self.store.add_messages(cursor, upto, [])
        return True

    async def _fan_out_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.notify_poll_s):
                    await self._fan_out_wake.wait()
            pause = last + FAN_OUT_EVERY_S - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            self._fan_out_wake.clear()
            last = loop.time()
            try:
                await self.fan_out()
                self.last_error = None
            except StoreError as exc:
                self._failed("fan-out", exc)
                await asyncio.sleep(min(5.0, self.settings.notify_poll_s))
            except Exception:
                # A bug must not end notifications for the life of the process: report, go on.
                log.exception("notifications: fan-out failed unexpectedly")
                self.last_error = "fan-out: failed unexpectedly"
                await asyncio.sleep(5.0)

    # -- delivery -----------------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Claim what is due (as many as free slots) and start sending; the number started."""
        free = self.settings.notify_concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        claimed = await self.store.claim_messages(
            now=self.clock.now(),
            limit=free,
            lease_s=self.lease_s,
            channels=self.channels,
            hooks=list(self.hooks),
        )
        for message, endpoint in claimed:
            task = asyncio.create_task(self._deliver(message, endpoint), name=f"errands-notify-{message.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._sent)
        return len(claimed)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._deliver_wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("a delivery failed unexpectedly", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for the sends under way (tests, shutdown)."""
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def _deliver(self, message: Message, endpoint: Endpoint | None) -> None:
        async with self._slots:
            sent = await self._send(message, endpoint)
        result = after_attempt(
            message,
            sent,
            now=self.clock.now(),
            schedule=self.schedule,
            jitter=self.settings.notify_jitter,
            rnd=self._rng.random(),
            disable_after_s=self.settings.notify_disable_after_s,
        )
        if self.metrics is not None:
            outcome = {MessageState.DELIVERED: "delivered", MessageState.FAILED: "failed"}
            self.metrics.notification(str(message.channel), outcome.get(result.state, "retry"))
        if result.state is MessageState.FAILED:
            log.warning(
                "gave up on message %s (%s of task %s) after %d attempts: %s",
                message.id, message.event_type, message.task_id, message.attempts, sent.error,
            )  # fmt: skip
        for attempt in range(3):
            try:
                await self.store.finish_message(result)
                return
            except StoreError as exc:
                if attempt == 2:
                    # The lease will run out and the message be sent again: at least once.
                    self._failed("recording a delivery", exc)
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _send(self, message: Message, endpoint: Endpoint | None) -> Sent:
        if message.channel == Channel.ENDPOINT:
            if endpoint is None:
                return Sent(False, error="the endpoint no longer exists", final=True)
            return await self.sender.send(endpoint.url, self._secrets(endpoint), message.id, message.payload)
        if message.channel == Channel.URL:
            return await self.sender.send(message.target, [self.default_secret], message.id, message.payload)
        if message.channel == Channel.HOOK:
            hook = self.hooks.get(message.target)
            if hook is None:
                return Sent(False, error=f"no hook named {message.target} in this process")
            return await run_hook(hook, message, timeout_s=self.settings.hook_timeout_s)
        if message.channel == Channel.WECHAT and self.wechat is not None:
            return await self.wechat.send(message)
        return Sent(False, error=f"this process cannot send {message.channel} messages")

    def _secrets(self, endpoint: Endpoint) -> list[str]:
        secrets = [endpoint.secret]
        until = endpoint.previous_secret_until
        if endpoint.previous_secret and until is not None and until > self.clock.now():
            secrets.append(endpoint.previous_secret)
        return secrets

    async def _deliver_loop(self) -> None:
        while True:
            try:
                started = await self.deliver_due()
                if started:
                    continue
                wait = self.settings.notify_poll_s
                if len(self._in_flight) < self.settings.notify_concurrency:
                    due = await self.store.next_message_at(channels=self.channels, hooks=list(self.hooks))
                    if due is not None:
                        wait = min(wait, max(0.005, due - self.clock.now()))
            except StoreError as exc:
                self._failed("delivery", exc)
                wait = min(5.0, self.settings.notify_poll_s)
            except Exception:
                log.exception("notifications: claiming deliveries failed unexpectedly")
                self.last_error = "delivery: failed unexpectedly"
                wait = 5.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._deliver_wake.wait()
            self._deliver_wake.clear()

    def _failed(self, what: str, exc: StoreError) -> None:
        self.last_error = f"{what}: {exc.message}"
        log.warning("notifications: %s failed: %s", what, exc.message)

    # -- life cycle ---------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """Give the sends under way ``grace_s`` to finish; the rest are sent again after their
        lease runs out."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace_s)

    async def run(self) -> None:
        self.hub.add_listener(self._on_event)
        try:
            await asyncio.gather(self._fan_out_loop(), self._deliver_loop())
        finally:
            for task in list(self._in_flight):
                task.cancel()
            self.hub.remove_listener(self._on_event)
            await self.sender.aclose()
            if self.wechat is not None:
                await self.wechat.aclose()
