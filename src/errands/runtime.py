"""One running errands process: store, hub, workers, sweeper, and their supervision."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Coroutine
from typing import Any

from errands import signing
from errands.app import Errands
from errands.auth import Authenticator, CapabilitySigner, TokenSigner, hash_key, new_admin_key
from errands.clock import Clock, SystemClock
from errands.config import Settings
from errands.errors import StoreError
from errands.hub import Hub
from errands.notify.endpoints import NotifyAdmin
from errands.notify.notifier import Notifier
from errands.providers import Callbacks
from errands.service import Service
from errands.store import open_store
from errands.sweeper import Sweeper
from errands.worker import Worker

log = logging.getLogger("errands.runtime")


class Supervisor:
    """Keeps every background loop of the process; a loop that ends on its own is reported."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._transient: set[asyncio.Task[Any]] = set()
        self.failures: dict[str, str] = {}
        self._stopping = False

    def run_soon(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        """A one-off background job (calling a provider, say): kept, logged if it fails,
        cancelled at shutdown."""
        task = asyncio.create_task(coro, name=f"errands-{name}")
        self._transient.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._transient.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background job %s failed: %s", name, t.exception())

        task.add_done_callback(done)

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"errands-{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._ended(name, t))
        return task

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("background loop %s crashed", name, exc_info=error)
            self.failures[name] = f"crashed: {type(error).__name__}"
        else:
            self.failures[name] = "stopped"

    def alive(self) -> dict[str, bool]:
        return {name: not task.done() for name, task in self._tasks.items()}

    async def stop(self) -> None:
        self._stopping = True
        everything = [*self._tasks.values(), *self._transient]
        for task in everything:
            task.cancel()
        if everything:
            await asyncio.wait(everything, timeout=10)


class Runtime:
    """Everything one process runs for ``app``; start with :meth:`start`, end with :meth:`stop`."""

    def __init__(
        self,
        app: Errands,
        settings: Settings,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        worker_id: str | None = None,
        serves_watches: bool = True,
    ) -> None:
        """``serves_watches=False`` for a process that will not serve the API (a worker): its
        hub then reads the log without task snapshots."""
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
        self.service = Service(app, self.store, settings, self.clock)
        self.notify_admin = NotifyAdmin(self.store, settings, self.clock)
        self.supervisor = Supervisor()
        self.service.run_soon = self.supervisor.run_soon
        self.worker: Worker | None = None
        self.sweeper: Sweeper | None = None
        self.notifier: Notifier | None = None
        self.notify_secret: str | None = None
        self.authenticator: Authenticator | None = None
        self.capabilities: CapabilitySigner | None = None
        self.callbacks: Callbacks | None = None
        self.generated_admin_key: str | None = None
        self._worker_id = worker_id

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
            await self._credentials(generate_admin_key=api)
            await self.hub.start()
            self.store.add_remote_listener(self.hub.wake)
            self.supervisor.spawn("hub", self.hub.run())
            if workers:
                self.worker = Worker(
                    self.app,
                    self.store,
                    self.hub,
                    self.settings,
                    clock=self.clock,
                    rng=self.rng,
                    worker_id=self._worker_id,
                    callbacks=self.callbacks,
                )
                self.supervisor.spawn("worker", self.worker.run())
            if sweeper:
                self.sweeper = Sweeper(
                    self.store,
                    self.settings,
                    clock=self.clock,
                    rng=self.rng,
                    app=self.app,
                    supervisor=self.supervisor,
                )
                self.supervisor.spawn("sweeper", self.sweeper.run())
            if sweeper if notifier is None else notifier:
                assert self.notify_secret is not None
                self.notifier = Notifier(
                    self.app,
                    self.store,
                    self.settings,
                    clock=self.clock,
                    rng=self.rng,
                    default_secret=self.notify_secret,
                )
                self.supervisor.spawn("notifier", self.notifier.run())
            if api and self.settings.admin_key is None:
                self.supervisor.spawn("admin-keys", self._refresh_admin_keys())
        except BaseException:
            await self.supervisor.stop()
            await self.store.close()
            raise
        self.app._bind(self)

    async def _credentials(self, *, generate_admin_key: bool) -> None:
        if self.settings.secret is not None:
            secret = self.settings.secret.get_secret_value()
        else:
            secret = await self.store.meta_setdefault("token_secret", secrets.token_urlsafe(32))
        if self.settings.admin_key is not None:
            # A configured key replaces the generated ones.
            hashes = {hash_key(self.settings.admin_key.get_secret_value())}
        else:
            hashes = await self.store.admin_key_hashes()
            if not hashes and generate_admin_key:
                key = new_admin_key()
                await self.store.add_admin_key(hash_key(key))
                self.generated_admin_key = key
                hashes = {hash_key(key)}
        if self.settings.notify_secret is not None:
            self.notify_secret = self.settings.notify_secret.get_secret_value()
            signing.secret_key(self.notify_secret)  # a clear error now rather than at the first delivery
        else:
            self.notify_secret = await self.store.meta_setdefault("notify_secret", signing.new_secret())
        signer = TokenSigner(secret)
        self.authenticator = Authenticator(signer, hashes)
        self.service.signer = signer
        self.capabilities = CapabilitySigner(secret)
        base = self.settings.public_url or f"http://{self.settings.host}:{self.settings.port}"
        self.callbacks = Callbacks(base, self.capabilities)

    async def _refresh_admin_keys(self) -> None:
        """Pick up admin keys another node generated after this one started."""
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(StoreError):
                hashes = await self.store.admin_key_hashes()
                if self.authenticator is not None and hashes:
                    self.authenticator.set_admin_hashes(hashes)

    async def stop(self) -> None:
        """Stop claiming, let handlers finish within the grace period, then close everything."""
        self.app._bind(None)
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
        if self.notifier is not None and self.notifier.last_error is not None:
            problems.append(f"notifier: {self.notifier.last_error}")
        return {"ready": not problems, "problems": problems, "loops": self.supervisor.alive()}
