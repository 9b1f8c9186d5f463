"""One running errands process: store, hub, service, workers, sweeper, notifier, and their supervision.

What needs nothing but the settings is made at once (the store, the hub, the SSRF guard); what
needs the database's state (the token and capability secrets, the admin keys, the default
notification secret) is made by :meth:`Runtime.start`, whole, once the store is open: no object
is finished after it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from dataclasses import dataclass
from typing import Any

from errands import signing
from errands.auth import Authenticator, CapabilitySigner, TokenSigner, hash_key, new_admin_key
from errands.clock import Clock, SystemClock
from errands.config import Settings
from errands.errors import StoreError
from errands.guard import AddressPolicy
from errands.hub import Hub
from errands.intake import Intake
from errands.metrics import Metrics, StoreReading, count_logged_errors
from errands.notify.endpoints import NotifyAdmin
from errands.notify.notifier import Notifier
from errands.overview import Overview
from errands.providers import Callbacks
from errands.registry import Registry
from errands.scheduler import Scheduler
from errands.service import Service
from errands.store import open_store
from errands.store.base import TaskLog
from errands.supervisor import Supervisor
from errands.sweeper import Sweeper
from errands.worker import Worker

log = logging.getLogger("errands.runtime")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The secrets of a running service, read (or made once, for every node) at start."""

    token_secret: str
    admin_hashes: set[str]
    notify_secret: str
    generated_admin_key: str | None


@dataclass(frozen=True, slots=True)
class Parts:
    """What :meth:`Runtime.start` makes once the store is open."""

    credentials: Credentials
    authenticator: Authenticator
    capabilities: CapabilitySigner
    callbacks: Callbacks
    intake: Intake
    service: Service
    notify_admin: NotifyAdmin
    scheduler: Scheduler
    overview: Overview


class Runtime:
    """Everything one process runs for ``app``; start with :meth:`start`, end with :meth:`stop`."""

    def __init__(
        self,
        app: Registry,
        settings: Settings,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        worker_id: str | None = None,
        serves_watches: bool = True,
        base_url: str | None = None,
    ) -> None:
        """``serves_watches=False`` for a process that will not serve the API (a worker): its
        hub then reads the log without task snapshots. ``base_url``: where providers call back
        (default ``ERRANDS_PUBLIC_URL``, else the host and port this process listens on)."""
        self.app = app
        self.settings = settings
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self.store = open_store(settings, self.clock)
        self.hub = Hub(
            self.store,
            poll_s=self.store.log_poll_s,
            max_watches=settings.max_watches,
            max_watches_per_owner=settings.max_watches_per_owner,
            watch_buffer=settings.watch_buffer,
            snapshots=serves_watches,
            # A worker reads the log only to route work (wake-ups, cancellations): less often.
            read_gap_s=self.store.log_read_gap_s * (1 if serves_watches else 4),
        )
        self.metrics = Metrics(app.task_types, app.providers)
        self.hub.on_committed(self.metrics.committed)
        self.metrics.watches.set_function(lambda: self.hub.watch_count)
        self.metrics.reads(self._store_reading)
        count_logged_errors()
        self.supervisor = Supervisor()
        self.guard = AddressPolicy(allow=settings.allow_networks, https_only=settings.notify_https_only)
        self.base_url = base_url or settings.public_url or f"http://{settings.host}:{settings.port}"
        self.worker: Worker | None = None
        self.sweeper: Sweeper | None = None
        self.notifier: Notifier | None = None
        self._worker_id = worker_id
        self._parts: Parts | None = None

    # -- what start() makes --------------------------------------------------------------------

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("the runtime is not started")
        return self._parts

    @property
    def service(self) -> Service:
        return self.parts.service

    @property
    def intake(self) -> Intake:
        return self.parts.intake

    @property
    def notify_admin(self) -> NotifyAdmin:
        return self.parts.notify_admin

    @property
    def scheduler(self) -> Scheduler:
        return self.parts.scheduler

    @property
    def overview(self) -> Overview:
        return self.parts.overview

    @property
    def authenticator(self) -> Authenticator | None:
        return None if self._parts is None else self._parts.authenticator

    @property
    def capabilities(self) -> CapabilitySigner:
        return self.parts.capabilities

    @property
    def callbacks(self) -> Callbacks:
        return self.parts.callbacks

    @property
    def notify_secret(self) -> str:
        return self.parts.credentials.notify_secret

    @property
    def generated_admin_key(self) -> str | None:
        return None if self._parts is None else self._parts.credentials.generated_admin_key

    # -- life cycle ---------------------------------------------------------------------------

    async def start(
        self,
        *,
        workers: bool = True,
        sweeper: bool = True,
        api: bool = False,
        migrate: bool = True,
        notifier: bool | None = None,
    ) -> None:
        """Open the store and start the loops. With ``api``, make sure an admin key exists.
        The notifier runs where the sweeper does unless ``notifier`` says otherwise."""
        await self.store.open(migrate=migrate)
        try:
            self._parts = parts = self._make(await self._credentials(generate_admin_key=api))
            await self.hub.start()
            self.supervisor.spawn("hub", self.hub.run())
            if workers:
                self.worker = Worker(
                    self.app, self.store, self.hub, self.settings, clock=self.clock, rng=self.rng,
                    worker_id=self._worker_id, callbacks=parts.callbacks,
                )  # fmt: skip
                if not self.hub.serves_watches and isinstance(self.store, TaskLog):
                    # Between hints, as often as the worker renews its leases.
                    self.hub.follow_only(self.worker.followed, poll_s=self.settings.heartbeat_interval_s)
                self.supervisor.spawn("worker", self.worker.run())
            if sweeper:
                self.sweeper = Sweeper(
                    self.store,
                    self.settings,
                    clock=self.clock,
                    rng=self.rng,
                    registry=self.app,
                    intake=parts.intake,
                    metrics=self.metrics,
                )
                self.supervisor.spawn("sweeper", self.sweeper.run())
                await parts.scheduler.declare()
                self.supervisor.spawn("scheduler", parts.scheduler.run())
            if sweeper if notifier is None else notifier:
                self.notifier = Notifier(
                    self.app, self.store, self.hub, self.settings, clock=self.clock, rng=self.rng,
                    guard=self.guard, default_secret=parts.credentials.notify_secret, metrics=self.metrics,
                )  # fmt: skip
                self.supervisor.spawn("notifier", self.notifier.run())
            if api and self.settings.admin_key is None:
                self.supervisor.spawn("admin-keys", self._refresh_admin_keys())
        except BaseException:
            await self.supervisor.stop()
            await self.store.close()
            raise

    def _make(self, credentials: Credentials) -> Parts:
        signer = TokenSigner(credentials.token_secret)
        capabilities = CapabilitySigner(credentials.token_secret)
        intake = Intake(
            self.app,
            self.store,
            self.clock,
            capabilities,
            self.supervisor.run_soon,
            self.settings.provider_timeout_s,
            self.settings.stream_max_bytes,
        )
        service = Service(
            self.app, self.store, self.settings, self.clock, signer=signer, guard=self.guard, intake=intake
        )
        return Parts(
            credentials=credentials,
            authenticator=Authenticator(signer, credentials.admin_hashes),
            capabilities=capabilities,
            callbacks=Callbacks(self.base_url, capabilities),
            intake=intake,
            service=service,
            notify_admin=NotifyAdmin(self.store, self.settings, self.clock, self.guard),
            scheduler=Scheduler(self.store, service, self.app, self.settings, clock=self.clock),
            overview=Overview(self.store, service, intake, self.settings, self.clock),
        )

    async def _credentials(self, *, generate_admin_key: bool) -> Credentials:
        if self.settings.secret is not None:
            secret = self.settings.secret.get_secret_value()
        else:
            secret = await self.store.meta_setdefault("token_secret", secrets.token_urlsafe(32))
        generated = None
        if self.settings.admin_key is not None:
            # A configured key replaces the generated ones.
            hashes = {hash_key(self.settings.admin_key.get_secret_value())}
        else:
            hashes = await self.store.admin_key_hashes()
            if not hashes and generate_admin_key:
                generated = new_admin_key()
                await self.store.add_admin_key(hash_key(generated))
                hashes = {hash_key(generated)}
        if self.settings.notify_secret is not None:
            notify_secret = self.settings.notify_secret.get_secret_value()
            signing.secret_key(notify_secret)  # a clear error now rather than at the first delivery
        else:
            notify_secret = await self.store.meta_setdefault("notify_secret", signing.new_secret())
        return Credentials(secret, hashes, notify_secret, generated)

    async def _refresh_admin_keys(self) -> None:
        """Pick up admin keys another node generated after this one started."""
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(StoreError):
                hashes = await self.store.admin_key_hashes()
                if hashes:
                    self.parts.authenticator.set_admin_hashes(hashes)

    async def stop(self) -> None:
        """Stop claiming, let handlers finish within the grace period, then close everything."""
        self.hub.close_watches()
        if self.worker is not None:
            await self.worker.shutdown(self.settings.shutdown_grace_s)
        self.hub.stop()
        if self.notifier is not None:
            await self.notifier.stop(min(5.0, self.settings.shutdown_grace_s))
        await self.supervisor.stop()
        for provider in self.app.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()
        await self.store.close()

    async def _store_reading(self) -> StoreReading:
        """What a scrape of the metrics reads from the store (see :mod:`errands.metrics`)."""
        now = self.clock.now()
        pending: dict[str, int] = {}
        for task_type, count in (await self.store.pending_counts()).items():
            label = self.metrics.type_label(task_type)
            pending[label] = pending.get(label, 0) + count
        holds = await self.store.holds()
        held = {name: max(0.0, holds.get(name, now) - now) for name in self.app.providers}
        lag = max(0, await self.store.last_seq() - self.hub.last_seq)
        return StoreReading(pending, held, lag)

    async def health(self) -> dict[str, Any]:
        """What ``/readyz`` reports: the store reachable and every background loop alive."""
        problems: list[str] = []
        try:
            await self.store.ping()
        except StoreError as exc:
            problems.append(f"store: {exc.message}")
        problems.extend(f"{name}: {state}" for name, state in self.supervisor.failures.items())
        if self.sweeper is not None and self.sweeper.last_error is not None:
            problems.append("sweeper: the last sweep failed")
        if self.sweeper is not None and self.parts.scheduler.last_error is not None:
            problems.append("scheduler: firing schedules failed")
        if self.notifier is not None and self.notifier.last_error is not None:
            problems.append(f"notifier: {self.notifier.last_error}")
        return {"ready": not problems, "problems": problems, "loops": self.supervisor.alive()}
