"""The commands that talk to an errands server over HTTP (``submit``, ``get``, ``tasks``,
``watch``, ``cancel``, ``retry``, ``events``, ``stats``, ``token``, ``schedules``), and what every
command shares: one sentence and an exit code for an error.

Output conventions: what a command prints for people is aligned text; ``--json`` prints JSON for
scripts instead. Exit codes: ``0`` done, ``1`` refused or failed (the reason on stderr; a task
followed to an end other than ``completed``), ``2`` a usage or configuration error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import orjson
import typer

from errands.errors import ApiError, ConfigError, ErrandsError, StoreError

T = TypeVar("T")
_URL = "http://127.0.0.1:8000"

client_cli = typer.Typer()

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


def _json_input(text: str) -> Any:
    """An ``--input`` option's JSON (a usage error, exit 2, when it is not JSON)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        fail("--input is not valid JSON.", 2)
    raise AssertionError("unreachable")


def print_json(data: Any) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@client_cli.command()
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
    data = _json_input(input)
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
    print_json(_task_json(task))
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


@client_cli.command()
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


@client_cli.command()
def tasks(
    status: Annotated[str | None, typer.Option(help="Only tasks in this status.")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's tasks (admin keys only).")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    json: JsonOpt = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    token: TokenOpt = None,
) -> None:
    """List tasks, newest first."""
    page = _client_call(url, token, lambda c: c.list(status=status, type=type, owner=owner, limit=limit))
    if json:
        print_json([_task_json(task) for task in page.tasks])
        return
    for task in page.tasks:
        message = f"  {task.message}" if task.message else ""
        typer.echo(
            f"{task.id}  {task.type:<16} {task.status.value:<10} {task.progress:>3}%  "
            f"{task.owner}  {_when(task.created_at)}{message}"
        )
    if not page.tasks:
        typer.echo("no tasks")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
TaskIdArg = Annotated[str, typer.Argument(help="The task's id.")]


def _show_task(task: Any, as_json: bool) -> None:
    """A task as JSON, or as aligned fields for people."""
    data = _task_json(task)
    if as_json:
        print_json(data)
        return
    fields = ["id", "type", "status", "owner", "progress", "message", "attempt", "max_attempts", "key"]
    fields += ["created_at", "started_at", "finished_at", "scheduled_for", "waiting_for", "external_id"]
    for name in fields:
        if data.get(name) is not None:
            typer.echo(f"{name:<14} {data[name]}")
    for name in ("input", "result", "error"):
        if data.get(name) not in (None, {}):
            typer.echo(f"{name:<14} {orjson.dumps(data[name]).decode()}")


@client_cli.command()
def get(task_id: TaskIdArg, json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = None) -> None:
    """Print a task as it is now."""
    _show_task(_client_call(url, token, lambda c: c.get(task_id)), json)


@client_cli.command()
def cancel(task_id: TaskIdArg, json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = None) -> None:
    """Cancel a pending or running task (exit 1 if it had ended)."""
    _show_task(_client_call(url, token, lambda c: c.cancel(task_id)), json)


@client_cli.command()
def retry(task_id: TaskIdArg, json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = None) -> None:
    """Run a failed or timed-out task again (exit 1 if it cannot be retried)."""
    _show_task(_client_call(url, token, lambda c: c.retry(task_id)), json)


@client_cli.command()
def events(
    task_id: TaskIdArg,
    after: Annotated[int, typer.Option(help="Only events after this seq.", min=0)] = 0,
    json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = None,
) -> None:
    """A task's events from its log, oldest first."""
    found = _client_call(url, token, lambda c: c.events(task_id, after=after))
    if json:
        print_json([{"seq": e.seq, "type": e.type, "at": e.at, "task": _task_json(e.task)} for e in found])
        return
    for e in found:
        message = f"  {e.task.message}" if e.task.message else ""
        typer.echo(f"{e.seq:>6}  {e.type:<16} {e.at}  {e.task.status.value:<10}{message}")


def _task_json(task: Any) -> dict[str, Any]:
    """A task as the API gives it: its times in UTC with milliseconds."""
    data: dict[str, Any] = task.model_dump(mode="json")
    for name, value in task.model_dump().items():
        if isinstance(value, datetime.datetime):
            data[name] = _when(value)
    return data


def _when(moment: Any) -> str:
    """A time as the API writes it: UTC, milliseconds."""
    return str(moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds")).replace("+00:00", "Z")


@client_cli.command()
def stats(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Counts by status and type, queue wait and run time (admin)."""
    print_json(dataclasses.asdict(_client_call(url, token, lambda c: c.stats())))


@client_cli.command()
def usage(
    owner: Annotated[
        str | None, typer.Option(help="Only this owner's (admin keys; a token: its own).")
    ] = None,
    type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type.")] = None,
    since: Annotated[
        str | None, typer.Option(help="The first day (UTC), YYYY-MM-DD; 30 days ago by default.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="The last day (UTC), included; today by default.")] = None,
    json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = None,
) -> None:
    """Tasks submitted per day, owner and type: by status, with the credits charged and held."""
    filters = {"owner": owner, "type": type, "since": since, "until": until}
    rows, after = [], None
    while True:
        page = _client_call(url, token, lambda c: c.usage(**filters, after=after, limit=1000))
        rows.extend(page.items)
        if (after := page.next_after) is None:
            break
    if json:
        print_json([dataclasses.asdict(row) for row in rows])
        return
    typer.echo(
        f"{'day':<10}  {'owner':<16} {'type':<16} {'submitted':>9} {'completed':>9} {'failed':>6} "
        f"{'timeout':>7} {'cancelled':>9} {'open':>5} {'charged':>8} {'held':>6}"
    )
    for row in rows:
        n = row.statuses
        typer.echo(
            f"{row.day:<10}  {row.owner:<16} {row.type:<16} {row.submitted:>9} {n['completed']:>9} "
            f"{n['failed']:>6} {n['timeout']:>7} {n['cancelled']:>9} {n['pending'] + n['processing']:>5} "
            f"{row.credits_charged:>8} {row.credits_reserved:>6}"
        )
    if not rows:
        typer.echo("no tasks in that range")


# A negative amount ("-5") is the amount, not an unknown option.
@client_cli.command(context_settings={"ignore_unknown_options": True})
def grant(
    owner: Annotated[str, typer.Argument(help="Whose credits.")],
    amount: Annotated[int, typer.Argument(help="Credits to add (negative: to take back).")],
    note: Annotated[str | None, typer.Option(help="Why, for the ledger.")] = None,
    json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = None,
) -> None:
    """Grant credits to an owner (admin); prints its balance after."""
    balance = _client_call(url, token, lambda c: c.grant(owner, amount, note=note))
    if json:
        print_json(dataclasses.asdict(balance))
        return
    typer.echo(f"{balance.owner}: {balance.balance} to spend, {balance.reserved} held")


@client_cli.command()
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
client_cli.add_typer(schedules_cli, name="schedules")
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
    options = {"tz": tz, "input": _json_input(input), "missed": missed}
    print_json(_client_call(url, token, lambda c: c.put_schedule(name, type=type, cron=cron, **options)))


@schedules_cli.command("pause")
def schedules_pause(name: NameArg, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """No slot fires until it is resumed."""
    print_json(_client_call(url, token, lambda c: c.pause_schedule(name)))


@schedules_cli.command("resume")
def schedules_resume(name: NameArg, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Fire again from the next slot (those that passed while paused do not run)."""
    print_json(_client_call(url, token, lambda c: c.pause_schedule(name, paused=False)))


@schedules_cli.command("delete")
def schedules_delete(name: NameArg, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None) -> None:
    """Delete a schedule (the tasks it submitted stay)."""
    _client_call(url, token, lambda c: c.delete_schedule(name))
    typer.echo(f"deleted {name}")
