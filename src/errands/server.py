"""Running a process: ``serve`` (API, workers, sweeper) and ``worker`` (workers only).

Shutdown is graceful: the first SIGTERM or SIGINT stops accepting requests and claiming tasks,
lets running handlers finish within ``shutdown_grace_s``, gives the rest back to the queue and
closes the store; a second signal cuts the wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from errands.app import Errands
from errands.config import Settings
from errands.errors import ConfigError
from errands.runtime import Runtime

log = logging.getLogger("errands.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: errands decides how the process stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a taken port is one clear sentence."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"Port {port} on {host} is already in use.") from None
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


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


async def serve(
    app: Errands,
    settings: Settings,
    *,
    workers: bool = True,
    on_ready: Callable[[Runtime, str], None] | None = None,
) -> None:
    """Run the API, the workers and the sweeper until a signal arrives."""
    from errands.api import create_api

    sock = bind(settings.host, settings.port)
    runtime = Runtime(app, settings)
    await runtime.start(workers=workers, sweeper=True, api=True)
    port = sock.getsockname()[1]
    url = f"http://{settings.host if ':' not in settings.host else f'[{settings.host}]'}:{port}"
    config = uvicorn.Config(
        create_api(runtime),
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        server_header=False,
        proxy_headers=False,  # errands never uses the client's address
    )
    server = _Uvicorn(config)
    stopping = asyncio.Event()

    def request_stop() -> None:
        if server.should_exit:
            server.force_exit = True
            if runtime.worker is not None:
                runtime.worker.hurry()
        server.should_exit = True
        stopping.set()

    remove = _on_signals(request_stop)
    try:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        # uvicorn only exposes a `started` flag; it turns true within milliseconds.
        while not server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if serving.done():
            await serving
        if on_ready is not None:
            on_ready(runtime, url)
        await serving
    finally:
        remove()
        sock.close()
        await runtime.stop()


async def work(app: Errands, settings: Settings, *, on_ready: Callable[[Runtime], Any] | None = None) -> None:
    """Run workers only (no API, no sweeper) until a signal arrives."""
    runtime = Runtime(app, settings)
    await runtime.start(workers=True, sweeper=False, api=False)
    stop = asyncio.Event()

    def request_stop() -> None:
        if stop.is_set() and runtime.worker is not None:
            runtime.worker.hurry()
        stop.set()

    remove = _on_signals(request_stop)
    try:
        if on_ready is not None:
            on_ready(runtime)
        await stop.wait()
    finally:
        remove()
        await runtime.stop()
