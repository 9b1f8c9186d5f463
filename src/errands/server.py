"""Running a process: ``serve`` (API, workers, sweeper) and ``worker`` (workers only).

Shutdown is graceful: the first SIGTERM or SIGINT stops accepting requests and claiming tasks,
lets running handlers finish within ``shutdown_grace_s``, gives the rest back to the queue and
closes the store; a second signal cuts the wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from errands.api import create_api
from errands.app import Errands
from errands.config import Settings
from errands.errors import ConfigError
from errands.logs import protect
from errands.runtime import Runtime

log = logging.getLogger("errands.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: errands decides how the process stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int, *, choose: str = "--port N (ERRANDS_PORT), or --port 0") -> socket.socket:
    """Bind the listening socket up front, so a taken port is one clear sentence (``choose``
    says how to choose another)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"Port {port} on {host} is already in use: choose another with {choose} for any free port."
            ) from None
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _settle_memory() -> None:
    """A process of errands' own, started: what it made so far (modules, the app, the loops)
    lives as long as it does, so the collector's full passes need not walk it again and again,
    and its young objects are collected less often (a request or a task makes thousands).
    Only in processes errands runs, never in an app that embeds it."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _on_signals(handler: Callable[[], None]) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove


def url_of(sock: socket.socket) -> str:
    """The base URL of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


class ApiServer:
    """The HTTP API of a started runtime, served by uvicorn on a bound socket in this loop."""

    def __init__(self, runtime: Runtime, sock: socket.socket) -> None:
        self.runtime = runtime
        self._sock = sock
        self.url = url_of(sock)
        config = uvicorn.Config(
            create_api(runtime),
            log_level=runtime.settings.log_level.lower(),
            log_config=None,  # errands' own handler and format (errands.logs) for uvicorn too
            access_log=False,  # request URLs may carry ?access_token=
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
            proxy_headers=False,  # errands never uses the client's address
            ws_max_size=64 * 1024,
        )
        self._server = _Uvicorn(config)
        self._task: asyncio.Task[None] | None = None
        protect()  # uvicorn configured its log handlers just now

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        # uvicorn only exposes a `started` flag; it turns true within milliseconds.
        while not self._server.started and not self._task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        if self._task.done():
            await self._task

    def request_stop(self) -> None:
        """Stop accepting requests; a second call drops open connections at once."""
        if self._server.should_exit:
            self._server.force_exit = True
        self.runtime.hub.close_watches()  # open streams end, so the server can stop
        self._server.should_exit = True

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        self.request_stop()
        await self.wait()


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, sock: socket.socket, *, log_level: str = "warning") -> AsyncIterator[None]:
    """Serve another ASGI app (the dev provider) on ``sock`` for the duration of the block."""
    config = uvicorn.Config(
        app, log_level=log_level.lower(), log_config=None, access_log=False, lifespan="on"
    )
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn only has a flag
            await asyncio.sleep(0.005)
        if task.done():
            await task
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def metrics_endpoint(runtime: Runtime) -> AsyncIterator[str | None]:
    """``/metrics`` for anyone who reaches ``ERRANDS_METRICS_LISTEN`` (a private port), for the
    duration of the block; its base URL, or ``None`` when the setting is not given."""
    address = runtime.settings.metrics_address
    if address is None:
        yield None
        return

    async def metrics(request: Request) -> Response:
        del request
        return Response(await runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    sock = bind(*address, choose="ERRANDS_METRICS_LISTEN, or port 0 in it")
    async with serve_asgi(Starlette(routes=[Route("/metrics", metrics)]), sock):
        yield url_of(sock)


async def serve(
    app: Errands,
    settings: Settings,
    *,
    workers: bool = True,
    on_ready: Callable[[Runtime, str, str | None], None] | None = None,
) -> None:
    """Run the API, the workers and the sweeper until a signal arrives; ``on_ready`` is told
    the API's base URL and the private metrics endpoint's (``None`` without one)."""
    sock = bind(settings.host, settings.port)
    # Providers call back where this process listens, unless ERRANDS_PUBLIC_URL says otherwise.
    runtime = Runtime(app, settings, base_url=settings.public_url or url_of(sock))
    await runtime.start(workers=workers, sweeper=True, api=True)
    api = ApiServer(runtime, sock)

    def request_stop() -> None:
        if api._server.should_exit and runtime.worker is not None:
            runtime.worker.hurry()
        api.request_stop()

    remove = _on_signals(request_stop)
    try:
        async with metrics_endpoint(runtime) as metrics_url:
            with app.serving(runtime):
                await api.start()
                _settle_memory()
                if on_ready is not None:
                    on_ready(runtime, api.url, metrics_url)
                await api.wait()
    finally:
        remove()
        sock.close()
        await runtime.stop()


async def work(
    app: Errands, settings: Settings, *, on_ready: Callable[[Runtime, str | None], Any] | None = None
) -> None:
    """Run workers only (no API, no sweeper) until a signal arrives; ``on_ready`` is told the
    private metrics endpoint's base URL (``None`` without one)."""
    runtime = Runtime(app, settings, serves_watches=False)
    await runtime.start(workers=True, sweeper=False, api=False)
    stop = asyncio.Event()

    def request_stop() -> None:
        if stop.is_set() and runtime.worker is not None:
            runtime.worker.hurry()
        stop.set()

    remove = _on_signals(request_stop)
    try:
        async with metrics_endpoint(runtime) as metrics_url:
            with app.serving(runtime):
                _settle_memory()
                if on_ready is not None:
                    on_ready(runtime, metrics_url)
                await stop.wait()
    finally:
        remove()
        await runtime.stop()
