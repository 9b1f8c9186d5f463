"""The app object users decorate: a registry of task types, with the means to run it in-process
and to serve its API from inside another ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from errands.api import create_api
from errands.api.errors import response_for
from errands.auth import SYSTEM
from errands.clock import Clock
from errands.config import Settings, load_settings
from errands.errors import ApiError, Unavailable
from errands.inputs import validate
from errands.model import Task
from errands.model.credits import Balance
from errands.registry import Registry
from errands.runtime import Runtime
from errands.service import SubmitRequest, TokenRequest


class Errands(Registry):
    """The task types of an app and who performs them, and the in-process entry point for
    submitting tasks.

    ::

        app = Errands()

        @app.task("photography", timeout_s=600, max_attempts=3)
        async def photography(ctx: TaskContext, input: dict) -> dict:
            await ctx.progress(30, "generating")
            return {"images": [...]}

    Serve it with ``errands serve --app module:app``, or run it inside your own program with
    ``async with app.running(): await app.submit("photography", {...})``, its API mounted in
    your ASGI app with :meth:`asgi`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._runtime: Runtime | None = None
        self._mounted = False

    @contextlib.contextmanager
    def serving(self, runtime: Runtime) -> Iterator[Runtime]:
        """``app.submit`` goes to ``runtime`` for the duration of the block (the server and
        :meth:`running` use it; a handler may submit follow-up tasks)."""
        previous, self._runtime = self._runtime, runtime
        try:
            yield runtime
        finally:
            self._runtime = previous

    @contextlib.asynccontextmanager
    async def running(
        self,
        settings: Settings | None = None,
        *,
        workers: bool = True,
        sweeper: bool = True,
        notifier: bool | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> AsyncIterator[Runtime]:
        """Run the store, workers, sweeper and notifier in this process for the duration of the
        block (the notifier runs where the sweeper does unless ``notifier`` says otherwise);
        the API of :meth:`asgi` serves it meanwhile. Leaving the block stops claiming, lets
        running handlers finish within ``shutdown_grace_s`` and closes the store."""
        runtime = Runtime(self, settings or load_settings(), clock=clock, rng=rng)
        await runtime.start(workers=workers, sweeper=sweeper, notifier=notifier)
        try:
            with (
                self.serving(runtime),
                _signals_end_watches(runtime) if self._mounted else contextlib.nullcontext(),
            ):
                yield runtime
        finally:
            await runtime.stop()

    def asgi(self) -> ASGIApp:
        """errands' HTTP API as an ASGI app to mount in an app of your own: one process, no
        second service. It serves the runtime that :meth:`running` starts in your app's
        lifespan (before and after, it answers ``503 unavailable``)::

            @contextlib.asynccontextmanager
            async def lifespan(api: FastAPI) -> AsyncIterator[None]:
                async with errands.running():
                    yield

            api = FastAPI(lifespan=lifespan)
            api.mount("/errands", errands.asgi())

        Its routes are the API's, below the mount's path (``/errands/v1/tasks/{id}/watch``).
        While it runs, SIGTERM and SIGINT also end its open watches (a second one cuts the
        workers' grace short) before they do what they did: a server such as uvicorn waits for
        open responses before it runs the lifespan's shutdown, and a watch would hold it."""
        self._mounted = True
        return _MountedApi(self)

    def mint_token(
        self,
        owner: str,
        *,
        scopes: Sequence[str] = ("read", "write"),
        task_id: str | None = None,
        ttl_s: float = 3600,
    ) -> str:
        """An owner token (``eto_…``), as ``POST /v1/tokens`` mints, for your front end to call
        the API as ``owner``: it sees that owner's tasks only (another's are ``404``), and only
        task ``task_id`` when given; ``scopes`` ``read`` and/or ``write``; it expires after
        ``ttl_s`` (up to 30 days). Same rules as the API: a value it would refuse raises
        :class:`errands.errors.InvalidRequest`."""
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        request = validate(
            TokenRequest, {"owner": owner, "scopes": list(scopes), "task_id": task_id, "ttl_s": float(ttl_s)}
        )
        return str(self._runtime.service.mint_token(request, SYSTEM)["token"])

    async def submit(
        self,
        type: str,
        input: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        id: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        expires_in_s: float | None = None,
        notify_url: str | None = None,
        run_at: datetime | None = None,
        delay_s: float | None = None,
        start_within_s: float | None = None,
        key: str | None = None,
        debounce_key: str | None = None,
        debounce_s: float | None = None,
        cost: int | None = None,
    ) -> Task:
        """Submit a task from code living next to the service; returns at once with the task.

        Same rules as ``POST /v1/tasks``: an ``id`` makes the call idempotent; a value the API
        would refuse raises the same error (:class:`errands.errors.InvalidRequest`, with the
        same message). ``run_at`` (an aware datetime) or ``delay_s`` delays its first run;
        never started within ``start_within_s`` of then, it ends ``timeout`` (``not_started``).
        ``key`` names whose share of ``per="key"`` limits it uses (default: its owner's).
        ``debounce_key``: this task replaces the owner's pending tasks of the type with the same
        key (they end ``cancelled``, code ``debounced``); ``debounce_s`` delays it that long.
        ``cost``: the credits it reserves of its owner's (default: its type's); one the balance
        cannot cover raises :class:`errands.errors.InsufficientCredits`.
        """
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        request = validate(
            SubmitRequest,
            {
                "type": type,
                "input": {} if input is None else input,
                "owner": owner,
                "id": id,
                "priority": priority,
                "timeout_s": None if timeout_s is None else float(timeout_s),
                "max_attempts": max_attempts,
                "expires_in_s": None if expires_in_s is None else float(expires_in_s),
                "notify_url": notify_url,
                "run_at": run_at,
                "delay_s": None if delay_s is None else float(delay_s),
                "start_within_s": None if start_within_s is None else float(start_within_s),
                "key": key,
                "debounce_key": debounce_key,
                "debounce_s": None if debounce_s is None else float(debounce_s),
                "cost": cost,
            },
        )
        record, _ = await self._runtime.service.submit(request, SYSTEM)
        return record.to_task()

    async def grant(self, owner: str, amount: int, *, note: str | None = None) -> Balance:
        """Add ``amount`` credits to the owner's balance (take them back when negative)."""
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        return await self._runtime.service.accounts.grant(owner, amount, note, SYSTEM)

    async def balance(self, owner: str) -> Balance:
        """The owner's credits: what it may spend, and what its unfinished tasks hold."""
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        return await self._runtime.store.balance(owner)

    async def submit_many(self, tasks: list[dict[str, Any]]) -> list[Task | ApiError]:
        """Up to 1,000 submissions in one transaction, each a dict of ``POST /v1/tasks``'s body
        (``{"type", "input"?, "id"?, "owner"?, …}``): for each, in order, its task or the error
        that refused it (returned, not raised: one refused item refuses only itself)."""
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        answers = await self._runtime.service.submit_many(tasks, SYSTEM)
        return [a[0].to_task() if isinstance(a, tuple) else a for a in answers]


class _MountedApi:
    """The API of whichever runtime the app is serving (see :meth:`Errands.asgi`)."""

    def __init__(self, app: Errands) -> None:
        self._app = app
        self._served: tuple[Runtime, ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return  # a mount hears no lifespan: the host's lifespan runs `running()`
        runtime = self._app._runtime
        if runtime is None:
            await response_for(Unavailable("errands is not running: run `app.running()` in the lifespan."))(
                scope, receive, send
            )
            return
        if self._served is None or self._served[0] is not runtime:
            self._served = (runtime, create_api(runtime))
        # Starlette's Mount leaves the whole path in `path` and its prefix in `root_path`.
        root: str = scope.get("root_path", "")
        if root and scope["path"].startswith(root):
            scope = {**scope, "path": scope["path"][len(root) :] or "/"}
        await self._served[1](scope, receive, send)


@contextlib.contextmanager
def _signals_end_watches(runtime: Runtime) -> Iterator[None]:
    """For the duration of the block, SIGTERM and SIGINT end the open watches (a second one
    hurries the workers' shutdown), then call the handler they had (the server's). A signal
    whose action is the default is left alone: then no server waits on open responses."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    loop = asyncio.get_running_loop()
    before: dict[int, Callable[[int, FrameType | None], Any]] = {}
    heard: list[int] = []

    def stopping() -> None:
        runtime.hub.close_watches()
        if heard and runtime.worker is not None:
            runtime.worker.hurry()
        heard.append(1)

    def handler(sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of whatever runs: the loop takes it from here.
        with contextlib.suppress(RuntimeError):  # the loop closed
            loop.call_soon_threadsafe(stopping)
        before[sig](sig, frame)

    for name in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(name)
        if callable(current):
            before[name] = current
            signal.signal(name, handler)
    try:
        yield
    finally:
        for number, previous in before.items():
            if signal.getsignal(number) is handler:
                signal.signal(number, previous)
