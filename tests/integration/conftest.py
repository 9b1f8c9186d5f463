"""Integration fixtures: real stores on real databases, a runtime, an HTTP client on the ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from errands import Errands, model
from errands.api import create_api
from errands.clock import ManualClock
from errands.config import Settings
from errands.model import NewTask, TaskRecord
from errands.runtime import Runtime
from errands.store import open_store
from errands.store.base import Store
from tests.conftest import (
    ADMIN_KEY,
    SECRET,
    create_database,
    drop_database,
    pg_url,
    require_postgres,
    run_sync,
)

STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
_TABLES = (
    "errands_tasks, errands_events, errands_tombstones, errands_meta, errands_admin_keys, "
    "errands_webhook_ids, errands_webhook_deliveries, errands_endpoints, errands_messages, "
    "errands_message_attempts, errands_schedules, errands_flow_rates, errands_credit_balances, "
    "errands_credit_ledger, errands_usage_days"
)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """One database for the session's PostgreSQL tests, migrated once, dropped at the end."""
    require_postgres()
    name = run_sync(create_database("errands_test"))
    url = pg_url(name)

    async def migrate() -> None:
        from errands.clock import SystemClock

        await open_store(Settings(db=url), SystemClock()).migrate()

    run_sync(migrate())
    yield url
    run_sync(drop_database(name))


async def _clean(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"TRUNCATE {_TABLES}")
        await conn.execute("INSERT INTO errands_meta (key, value) VALUES ('horizon', '0')")
    finally:
        await conn.close()


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def database_url(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database of this test's kind: a new SQLite file, or the session's PostgreSQL
    database with every table emptied."""
    if store_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'errands.db'}"
    url: str = request.getfixturevalue("postgres_database")
    await _clean(url)
    return url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def store(database_url: str, clock: ManualClock) -> AsyncIterator[Store]:
    s = open_store(Settings(db=database_url), clock)
    await s.open()
    yield s
    await s.close()


def new_task(task_id: str = "t1", **fields: Any) -> NewTask:
    values: dict[str, Any] = {
        "id": task_id,
        "type": "work",
        "owner": "alice",
        "input": {"n": 1},
        "priority": 0,
        "max_attempts": 3,
        "timeout_s": 60.0,
        "expires_in_s": 3600.0,
        "fingerprint": f"fp-{task_id}",
    }
    values.update(fields)
    return NewTask(**values)


async def complete_as_seen(
    store: Store, clock: ManualClock, claimed: list[TaskRecord], *, return_exceptions: bool = False
) -> list[Any]:
    """Every claimed task's outcome at once (result 1), each decided on its row as claimed, as
    a worker decides it; with ``return_exceptions``, a refused one is its exception."""
    return await asyncio.gather(
        *(
            store.apply(
                r.id,
                lambda row, t=r.lease_token or "": model.complete(
                    row, now=clock.now(), lease_token=t, result=1
                ),
                seen=r,
            )
            for r in claimed
        ),
        return_exceptions=return_exceptions,
    )


def make_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "db": url,
        "admin_key": ADMIN_KEY,
        "secret": SECRET,
        "lease_s": 5.0,
        "poll_s": 0.2,
        "progress_interval_s": 0.05,
        "sweep_interval_s": 3600.0,  # tests sweep by hand
        "retry_base_s": 0.01,
        "retry_cap_s": 0.05,
        "shutdown_grace_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


RuntimeFactory = Callable[..., Awaitable[Runtime]]


@pytest.fixture
async def runtime_factory(database_url: str) -> AsyncIterator[RuntimeFactory]:
    """Start runtimes of an app on this test's database (``app.submit`` goes to the latest);
    all are stopped at the end."""
    started: list[Runtime] = []
    with contextlib.ExitStack() as serving:

        async def start(
            app: Errands,
            *,
            workers: bool = True,
            sweeper: bool = False,
            notifier: bool | None = None,
            clock: Any = None,
            serves_watches: bool = True,
            **overrides: Any,
        ) -> Runtime:
            runtime = Runtime(
                app,
                make_settings(database_url, **overrides),
                clock=clock,
                rng=random.Random(7),
                serves_watches=serves_watches,
            )
            await runtime.start(workers=workers, sweeper=sweeper, api=True, notifier=notifier)
            started.append(runtime)
            serving.enter_context(app.serving(runtime))
            return runtime

        yield start
    for runtime in reversed(started):
        await runtime.stop()


def http(runtime: Runtime, token: str | None = ADMIN_KEY) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_api(runtime)), base_url="http://errands", headers=headers
    )


async def wait_task(
    runtime: Runtime, task_id: str, until: Callable[[Any], bool] | None = None, timeout_s: float = 10.0
) -> Any:
    """The task once ``until(task)`` holds (default: it ended), woken by the hub's events."""
    from errands.model import TaskRecord

    def ok(record: object) -> bool:
        if not isinstance(record, TaskRecord):
            return False
        return until(record) if until is not None else record.status.terminal

    changed = asyncio.Event()

    def listener(event: Any) -> None:
        if event.task_id == task_id:
            changed.set()

    runtime.hub.add_listener(listener)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                changed.clear()
                record = await runtime.store.get(task_id)
                if ok(record):
                    return record
                await changed.wait()
    finally:
        runtime.hub.remove_listener(listener)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for an in-memory condition that another coroutine or thread will make true."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the condition has no event to wait on
            await asyncio.sleep(0.005)


LiveFactory = Callable[..., Awaitable[tuple[Runtime, str]]]


@pytest.fixture
async def live(runtime_factory: RuntimeFactory) -> AsyncIterator[LiveFactory]:
    """Start a runtime and serve its API over real HTTP on a free loopback port."""
    from errands.server import ApiServer, bind, url_of

    servers: list[ApiServer] = []

    async def start(app: Errands, **overrides: Any) -> tuple[Runtime, str]:
        sock = bind("127.0.0.1", 0)
        # Providers call back where the server listens: its URL is the runtime's public one.
        runtime = await runtime_factory(app, **{"public_url": url_of(sock), **overrides})
        server = ApiServer(runtime, sock)
        await server.start()
        servers.append(server)
        return runtime, server.url

    yield start
    for server in servers:
        await server.stop()


async def sse(client: httpx.AsyncClient, path: str, **kwargs: Any) -> AsyncIterator[Any]:
    """The SSE messages of one request, as the SDK parses them."""
    from errands.client import parse_sse

    async with client.stream("GET", path, **kwargs) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async for message in parse_sse(response.aiter_lines()):
            yield message


#: The tables that hold what errands knows about tasks and notifications (not its bookkeeping:
#: meta, admin keys, and the inbound delivery log, which records refusals by design).
STATE_TABLES = (
    "tasks", "events", "tombstones", "endpoints", "messages", "webhook_ids", "schedules", "flow_rates",
    "credit_balances", "credit_ledger", "usage_days",
)  # fmt: skip


async def database_state(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of :data:`STATE_TABLES`, read straight from the database (not through the store,
    whose log reader waits for other transactions on a PostgreSQL server): to show that a refused
    request changed nothing."""
    from errands.store import sqlite_path

    path = sqlite_path(url)
    state: dict[str, list[tuple[Any, ...]]] = {}
    if path is not None:
        import sqlite3

        conn = sqlite3.connect(path)
        try:
            for table in STATE_TABLES:
                state[table] = sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
        finally:
            conn.close()
        return state
    import asyncpg

    pg = await asyncpg.connect(url)
    try:
        for table in STATE_TABLES:
            rows = await pg.fetch(f"SELECT * FROM errands_{table}")
            state[table] = sorted((tuple(r) for r in rows), key=repr)
    finally:
        await pg.close()
    return state


async def log_rows(url: str) -> int:
    """How many events the log holds, counted in the database itself."""
    return len((await database_state(url))["events"])
