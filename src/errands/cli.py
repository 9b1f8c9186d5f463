"""The ``errands`` command: a thin layer over the runtime and the client that reads ``ERRANDS_*``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

import typer

from errands.app import Errands
from errands.cli_client import client_cli, fail, print_json, run
from errands.config import Settings, load_settings
from errands.errors import ConfigError
from errands.logs import configure

T = TypeVar("T")

cli = typer.Typer(
    name="errands",
    help="errands: a self-hosted service for long-running jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# submit, get, tasks, watch, cancel, retry, events, stats, usage, grant, token, schedules
cli.add_typer(client_cli)

AppOpt = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar="ERRANDS_APP",
        help="Your Errands app as module:attribute (default: the built-in demo app).",
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="ERRANDS_DB",
        help="sqlite:///path.db or postgresql://user:password@host/dbname (default sqlite:///errands.db).",
    ),
]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option("--concurrency", envvar="ERRANDS_CONCURRENCY", help="Handlers run at once per process."),
]


def load_app(spec: str | None) -> Errands:
    """The app named by ``module:attribute`` (``attribute`` defaults to ``app``), or the demo."""
    if spec is None:
        from errands.demo import app

        return app
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"Cannot import the app module '{module_name}': {exc}.") from None
    except Exception as exc:
        raise ConfigError(
            f"Importing the app module '{module_name}' failed: {type(exc).__name__}: {exc}."
        ) from None
    found = getattr(module, attribute or "app", None)
    if not isinstance(found, Errands):
        raise ConfigError(f"'{spec}' is not an errands app (an instance of errands.Errands).")
    return found


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"ERRANDS_LOG_LEVEL '{settings.log_level}' is not a log level.")
    configure(level, settings.log_format)


def _settings(**overrides: Any) -> Settings:
    try:
        settings = load_settings(**overrides)
        configure_logging(settings)
        return settings
    except ConfigError as exc:
        fail(exc.message, 2)
    raise AssertionError("unreachable")


@cli.command()
def serve(
    app: AppOpt = None,
    db: DbOpt = None,
    host: Annotated[str | None, typer.Option(envvar="ERRANDS_HOST", help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(envvar="ERRANDS_PORT", help="Port to listen on.")] = None,
    concurrency: ConcurrencyOpt = None,
    workers: Annotated[bool, typer.Option(help="Run workers in this process too.")] = True,
) -> None:
    """Run the HTTP API, workers and the sweeper, for your app or, without --app, the demo."""
    from errands.clock import SystemClock
    from errands.runtime import Runtime
    from errands.server import serve as serve_forever
    from errands.store import open_store

    settings = _settings(app=app, db=db, host=host, port=port, concurrency=concurrency)

    def ready(runtime: Runtime, url: str, metrics_url: str | None) -> None:
        name = settings.app or "the built-in demo app"
        typer.echo(f"errands is serving {name} at {url} (database: {settings.db})")
        _announce_metrics(metrics_url)
        if dev_provider_url:
            typer.echo(f"The demo's fake_ai tasks run on a development provider at {dev_provider_url}")
        if runtime.generated_admin_key:
            typer.echo("A new admin key was generated. It is shown only once; keep it:")
            typer.echo(f"  export ERRANDS_URL={url} ERRANDS_ADMIN_KEY={runtime.generated_admin_key}")
        else:
            typer.echo("Use the admin key printed at first start, or the one in ERRANDS_ADMIN_KEY.")
        typer.echo(f"Console: {url}/console   API reference: {url}/docs")
        sys.stdout.flush()

    try:
        errands_app = load_app(settings.app)
        open_store(settings, SystemClock())  # a bad database URL stops us before anything starts
    except ConfigError as exc:
        fail(exc.message, 2)
    dev_provider_url = ""

    async def main() -> None:
        nonlocal dev_provider_url
        async with _demo_dev_provider(settings) as dev_provider_url:
            await serve_forever(errands_app, settings, workers=workers, on_ready=ready)

    run(main())


def _announce_metrics(metrics_url: str | None) -> None:
    if metrics_url is not None:
        typer.echo(f"Metrics for Prometheus (no key): {metrics_url}/metrics")


@contextlib.asynccontextmanager
async def _demo_dev_provider(settings: Settings) -> AsyncIterator[str]:
    """Serving the demo without a dev provider configured: run one in this process (its URL)."""
    from errands import demo

    if settings.app is not None or demo.DEV_PROVIDER_URL:
        yield ""
        return
    from errands.devprovider import DevProvider
    from errands.server import bind, serve_asgi

    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    demo.use_dev_provider(url)
    provider = DevProvider()
    async with serve_asgi(provider.app, sock):
        yield url


@cli.command("dev-provider")
def dev_provider(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="ERRANDS_DEV_PROVIDER_PORT", help="Port to listen on.")] = 8001,
    secret: Annotated[
        str | None,
        typer.Option(envvar="ERRANDS_DEV_PROVIDER_SECRET", help="Webhook signing secret (whsec_…)."),
    ] = None,
    delay_s: Annotated[float, typer.Option(help="How long a job runs.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Progress reports per job.")] = 3,
    jitter_s: Annotated[float, typer.Option(help="Random extra delay per webhook.")] = 0.0,
    drop: Annotated[float, typer.Option(help="Probability a webhook is never sent.")] = 0.0,
    duplicate: Annotated[float, typer.Option(help="Probability a webhook is sent twice.")] = 0.0,
    bad_signature: Annotated[float, typer.Option(help="Probability a webhook is signed badly.")] = 0.0,
    reorder: Annotated[float, typer.Option(help="Probability a stale report follows the final one.")] = 0.0,
    fail_rate: Annotated[float, typer.Option("--fail", help="Probability a job fails.")] = 0.0,
    stream: Annotated[int, typer.Option(help="Text chunks a job streams per progress report.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for the misbehaviour, for repeatable runs.")] = None,
) -> None:
    """Run a fake AI service that reports by signed webhook (for development and tests)."""
    from errands.devprovider import DEV_SECRET, Chaos, DevProvider
    from errands.server import bind, serve_asgi

    chaos = Chaos(
        delay_s=delay_s,
        steps=steps,
        jitter_s=jitter_s,
        drop=drop,
        duplicate=duplicate,
        bad_signature=bad_signature,
        reorder=reorder,
        fail=fail_rate,
        stream=stream,
    )
    try:
        provider = DevProvider(secret or DEV_SECRET, chaos, seed=seed)
        sock = bind(host, port, choose="--port N, or --port 0")
    except ConfigError as exc:
        fail(exc.message, 2)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with serve_asgi(provider.app, sock):
            typer.echo(f"errands dev-provider is listening at http://{host}:{sock.getsockname()[1]}")
            sys.stdout.flush()
            await stop.wait()

    run(main())


@cli.command()
def worker(app: AppOpt = None, db: DbOpt = None, concurrency: ConcurrencyOpt = None) -> None:
    """Run workers only, of your app or, without --app, of the demo (several may share one database)."""
    from errands.runtime import Runtime
    from errands.server import work

    settings = _settings(app=app, db=db, concurrency=concurrency)

    def ready(runtime: Runtime, metrics_url: str | None) -> None:
        worker_id = runtime.worker.id if runtime.worker else "?"
        typer.echo(f"errands worker {worker_id} is running (database: {settings.db})")
        _announce_metrics(metrics_url)
        sys.stdout.flush()

    try:
        errands_app = load_app(settings.app)
    except ConfigError as exc:
        fail(exc.message, 2)
    run(work(errands_app, settings, on_ready=ready))


@cli.command("types")
def list_types(
    app: AppOpt = None,
    json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
) -> None:
    """The task types an app runs (the demo's, without --app): who runs each, and its limits."""
    try:
        registry = load_app(app)
    except ConfigError as exc:
        fail(exc.message, 2)
    rows = [
        {
            "type": t.name,
            "runs_on": _runs_on(t),
            "timeout_s": t.timeout_s,
            "max_attempts": t.max_attempts,
            "limits": [limit.describe() for limit in t.limits],
        }
        for t in sorted(registry.task_types.values(), key=lambda t: t.name)
    ]
    if json:
        print_json(rows)
        return
    for t in sorted(registry.task_types.values(), key=lambda t: t.name):
        extras = [f"timeout {t.timeout_s:g} s"] if t.timeout_s else []
        extras += [f"{t.max_attempts} attempts"] if t.max_attempts else []
        extras += [limit.describe() for limit in t.limits]
        typer.echo(f"{t.name:<20} {_runs_on(t):<24} {', '.join(extras)}".rstrip())


def _runs_on(task_type: Any) -> str:
    return f"provider {task_type.provider.name}" if task_type.provider is not None else "handler"


@cli.command()
def migrate(db: DbOpt = None) -> None:
    """Bring the database schema up to date."""
    from errands.clock import SystemClock
    from errands.store import open_store

    settings = _settings(db=db)

    async def go() -> list[int]:
        return await open_store(settings, SystemClock()).migrate()

    applied = run(go())
    typer.echo(f"applied migrations {applied}" if applied else "the schema is up to date")


def main() -> None:
    cli()
