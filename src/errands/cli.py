"""The ``errands`` command: a thin layer over the runtime and the client that reads ``ERRANDS_*``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import orjson
import typer

from errands.app import Errands
from errands.config import Settings, load_settings
from errands.errors import ApiError, ConfigError, ErrandsError, StoreError
from errands.logs import configure

T = TypeVar("T")

cli = typer.Typer(
    name="errands",
    help="errands: a self-hosted service for long-running jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

AppOpt = Annotated[
    str | None, typer.Option("--app", envvar="ERRANDS_APP", help="module:attribute of your Errands app.")
]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", envvar="ERRANDS_DB", help="sqlite:///path.db (default sqlite:///errands.db)."),
]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option("--concurrency", envvar="ERRANDS_CONCURRENCY", help="Handlers run at once per process."),
]
UrlOpt = Annotated[str, typer.Option("--url", envvar="ERRANDS_URL", help="The errands server to talk to.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar=["ERRANDS_TOKEN", "ERRANDS_ADMIN_KEY"], help="Admin key or owner token."),
]


def fail(message: str, code: int = 1) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed; errands errors become one plain sentence."""
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, T]], T] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    try:
        return runner(coro)
    except ConfigError as exc:
        fail(exc.message, 2)
    except StoreError as exc:
        fail(f"{exc.message} {exc.__cause__ or ''}".strip(), 1)
    except ErrandsError as exc:
        fail(exc.message, 1)
    raise AssertionError("unreachable")


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
    """Run the HTTP API, workers and the sweeper."""
    from errands.clock import SystemClock
    from errands.runtime import Runtime
    from errands.server import serve as serve_forever
    from errands.store import open_store

    settings = _settings(app=app, db=db, host=host, port=port, concurrency=concurrency)

    def ready(runtime: Runtime, url: str) -> None:
        name = settings.app or "the built-in demo app"
        typer.echo(f"errands is serving {name} at {url} (database: {settings.db})")
        if dev_provider_url:
            typer.echo(f"The demo's fake_ai tasks run on a development provider at {dev_provider_url}")
        if runtime.generated_admin_key:
            typer.echo("A new admin key was generated. It is shown only once; keep it:")
            typer.echo(f"  export ERRANDS_URL={url} ERRANDS_ADMIN_KEY={runtime.generated_admin_key}")
        else:
            typer.echo("Use the admin key printed at first start, or the one in ERRANDS_ADMIN_KEY.")
        typer.echo(f"API reference: {url}/docs")
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
        sock = bind(host, port)
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
    """Run workers only (several may share one database)."""
    from errands.runtime import Runtime
    from errands.server import work

    settings = _settings(app=app, db=db, concurrency=concurrency)

    def ready(runtime: Runtime) -> None:
        worker_id = runtime.worker.id if runtime.worker else "?"
        typer.echo(f"errands worker {worker_id} is running (database: {settings.db})")
        sys.stdout.flush()

    try:
        errands_app = load_app(settings.app)
    except ConfigError as exc:
        fail(exc.message, 2)
    run(work(errands_app, settings, on_ready=ready))


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


def _client_call(url: str, token: str | None, call: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    from errands.client import AsyncClient

    async def go() -> T:
        async with AsyncClient(url, token) as client:
            return await call(client)

    try:
        return run(go())
    except ApiError as exc:  # pragma: no cover - run() already reports errands errors
        fail(exc.message)
    raise AssertionError("unreachable")


def _print_json(data: Any) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@cli.command()
def submit(
    type: Annotated[str, typer.Argument(help="The task type.")],
    input: Annotated[str, typer.Option("--input", help="The input, a JSON object.")] = "{}",
    id: Annotated[
        str | None, typer.Option("--id", help="Your id for the task (makes submit idempotent).")
    ] = None,
    owner: Annotated[str | None, typer.Option(help="Owner of the task (admin keys only).")] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
    run_at: Annotated[
        str | None, typer.Option("--run-at", help="When it may first run (RFC 3339, with an offset).")
    ] = None,
    delay: Annotated[
        float | None, typer.Option("--delay", help="Seconds to wait before its first run.", min=0)
    ] = None,
    start_within: Annotated[
        float | None, typer.Option("--start-within", help="Time out if not started this many seconds after.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Whose share of per-key limits it uses (default: the owner).")
    ] = None,
    debounce_key: Annotated[
        str | None,
        typer.Option("--debounce-key", help="Replace pending tasks of the type with this key."),
    ] = None,
    debounce: Annotated[
        float | None, typer.Option("--debounce", help="With --debounce-key: wait this many seconds first.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the task until it ends.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """Submit a task and print it (or follow it with --wait)."""
    try:
        data = orjson.loads(input)
    except orjson.JSONDecodeError:
        fail("--input is not valid JSON.", 2)
    if not isinstance(data, dict):
        fail("--input must be a JSON object.", 2)

    async def call(client: Any) -> Any:
        task = await client.submit(
            type,
            data,
            id=id,
            owner=owner,
            priority=priority,
            run_at=run_at,
            delay_s=delay,
            start_within_s=start_within,
            key=key,
            debounce_key=debounce_key,
            debounce_s=debounce,
        )
        if wait:
            typer.echo(f"submitted {task.id}", err=True)
            task = await follow(client, task.id, streams=False)  # stdout is the task's JSON
        return task

    task = _client_call(url, token, call)
    _print_json(task.model_dump(mode="json"))
    if wait and task.status != "completed":
        raise typer.Exit(1)


async def follow(client: Any, task_id: str, *, streams: bool = True) -> Any:
    """Draw a live progress bar for a task until it ends (on stderr), and print what it streams
    as it comes (on stdout: text as it is, other chunks as JSON lines); return the final task."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from errands.client import StreamChunk

    console = Console(stderr=True)
    columns = [
        TextColumn("[bold]{task.fields[status]:<10}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    ]
    final = None
    with Progress(*columns, console=console, transient=False, redirect_stdout=False) as bar:
        line = bar.add_task(task_id, total=100, status="…", note="")
        # With streams, from the task's first event: what it streamed before is printed too.
        printed: set[str] = set()
        async for event in client.watch(task_id, streams=streams, after=0 if streams else None):
            if isinstance(event, StreamChunk):
                text = event.value if isinstance(event.value, str) else f"{event}\n"
                if event.index == 0 and event.name in printed:  # the stream starts over
                    text = f"\n[{event.name}, attempt {event.attempt}, from the start]\n{text}"
                printed.add(event.name)
                sys.stdout.write(text)
                sys.stdout.flush()
                continue
            task = event.task
            note = task.message or ""
            if task.error is not None and task.status.value in ("pending", "failed", "timeout", "cancelled"):
                note = f"{task.error.code}: {task.error.message}"
            if task.max_attempts > 1 and task.attempt > 1:
                note = f"attempt {task.attempt}/{task.max_attempts} {note}"
            bar.update(line, completed=task.progress, status=task.status.value, note=note[:80])
            final = task
    return final


@cli.command()
def watch(
    task_id: Annotated[str, typer.Argument(help="The task to follow.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
    streams: Annotated[bool, typer.Option(help="Print what the task streams (stdout).")] = True,
) -> None:
    """Follow a task live until it ends; exit 0 only if it completed."""
    task = _client_call(url, token, lambda c: follow(c, task_id, streams=streams))
    if task is None or task.status != "completed":
        raise typer.Exit(1)


@cli.command()
def tasks(
    status: Annotated[str | None, typer.Option(help="Only tasks in this status.")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's tasks (admin keys only).")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """List tasks, newest first."""
    page = _client_call(url, token, lambda c: c.list(status=status, type=type, owner=owner, limit=limit))
    for task in page.tasks:
        message = f"  {task.message}" if task.message else ""
        typer.echo(
            f"{task.id}  {task.type:<16} {task.status.value:<10} {task.progress:>3}%  "
            f"{task.owner}  {task.created_at.isoformat(timespec='seconds')}{message}"
        )
    if not page.tasks:
        typer.echo("no tasks")


@cli.command()
def stats(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Counts by status and type, queue wait and run time (admin)."""
    _print_json(_client_call(url, token, lambda c: c.stats()))


@cli.command()
def token(
    owner: Annotated[str, typer.Argument(help="The owner the token acts for.")],
    task_id: Annotated[str | None, typer.Option("--task-id", help="Limit the token to one task.")] = None,
    ttl_s: Annotated[int, typer.Option("--ttl-s", help="Lifetime in seconds.")] = 3600,
    read_only: Annotated[bool, typer.Option("--read-only", help="Only the read scope.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """Mint an owner token (admin)."""
    scopes = ["read"] if read_only else ["read", "write"]
    typer.echo(
        _client_call(url, token, lambda c: c.mint_token(owner, scopes=scopes, task_id=task_id, ttl_s=ttl_s))
    )


schedules_cli = typer.Typer(help="Cron schedules (admin): list, set, pause, resume, delete.")
cli.add_typer(schedules_cli, name="schedules")
NameArg = Annotated[str, typer.Argument(help="The schedule's name.")]


@schedules_cli.command("list")
def schedules_list(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Every schedule and its next run."""
    found = _client_call(url, token, lambda c: c.schedules())
    for s in found:
        when = "paused" if s["paused"] else s["next_at"] or "no more runs"
        typer.echo(f"{s['name']:<24} {s['cron']:<16} {s['tz']:<20} {s['type']:<16} {when}")
    if not found:
        typer.echo("no schedules")


@schedules_cli.command("set")
def schedules_set(
    name: NameArg,
    cron: Annotated[str, typer.Option(help="When: a cron expression, e.g. '0 9 * * *'.")],
    type: Annotated[str, typer.Option("--type", help="The task type it submits.")],
    tz: Annotated[str, typer.Option(help="The time zone the expression is read in.")] = "UTC",
    input: Annotated[str, typer.Option("--input", help="The tasks' input, a JSON object.")] = "{}",
    missed: Annotated[str, typer.Option(help="Missed slots: 'last' runs the latest, 'skip' none.")] = "last",
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """Create or replace a schedule; print it with its next runs."""
    try:
        data = orjson.loads(input)
    except orjson.JSONDecodeError:
        fail("--input is not valid JSON.", 2)
    options = {"tz": tz, "input": data, "missed": missed}
    _print_json(_client_call(url, token, lambda c: c.put_schedule(name, type=type, cron=cron, **options)))


@schedules_cli.command("pause")
def schedules_pause(name: NameArg, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """No slot fires until it is resumed."""
    _print_json(_client_call(url, token, lambda c: c.pause_schedule(name)))


@schedules_cli.command("resume")
def schedules_resume(name: NameArg, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Fire again from the next slot (those that passed while paused do not run)."""
    _print_json(_client_call(url, token, lambda c: c.pause_schedule(name, paused=False)))


@schedules_cli.command("delete")
def schedules_delete(name: NameArg, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Delete a schedule (the tasks it submitted stay)."""
    _client_call(url, token, lambda c: c.delete_schedule(name))
    typer.echo(f"deleted {name}")


def main() -> None:
    cli()
