"""Fixtures shared by every level of the suite."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

ADMIN_KEY = "eka_test-admin-key"
SECRET = "test-token-secret"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read ERRANDS_* variables; the developer's own must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("ERRANDS_"):
            monkeypatch.delenv(name)


PG_ADMIN_URL = os.environ.get("ERRANDS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_url(database: str) -> str:
    """The URL of another database on the test PostgreSQL server."""
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def postgres_unavailable() -> str | None:
    """Why the PostgreSQL half of the suite cannot run here, or None when it can."""
    try:
        import asyncpg  # noqa: F401 - only checking that the driver is installed
    except ImportError:
        return "asyncpg is not installed"
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(PG_ADMIN_URL)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5432), timeout=2):
            return None
    except OSError:
        return f"no PostgreSQL server at {parsed.hostname}:{parsed.port or 5432}"


def require_postgres() -> None:
    reason = postgres_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL must run under CI: {reason}")
    pytest.skip(reason)


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    import asyncio
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def create_database(prefix: str) -> str:
    import secrets

    import asyncpg

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[str]:
    """A new database of the test server with errands' schema, dropped afterwards: its URL."""
    from errands.clock import SystemClock
    from errands.config import Settings
    from errands.store import open_store

    name = await create_database(prefix)
    try:
        url = pg_url(name)
        await open_store(Settings(db=url), SystemClock()).migrate()
        yield url
    finally:
        await drop_database(name)


@pytest.fixture(scope="session", autouse=True)
def _another_app_churning() -> Iterator[None]:
    """Under CI, another application churns transactions on another database of the test server
    for the whole run, one of them always open (``tests/foreign.py``): nothing of errands may
    wait for it, so the PostgreSQL half of the suite passes beside it."""
    if os.environ.get("CI") != "true" or postgres_unavailable() is not None:
        yield
        return
    name = run_sync(create_database("another_app"))
    with tempfile.TemporaryFile() as errors:
        churner = subprocess.Popen(
            [sys.executable, "-m", "tests.foreign", "churn", pg_url(name)],
            cwd=Path(__file__).parent.parent,
            stderr=errors,
        )
        try:
            yield
            if churner.poll() is not None:
                errors.seek(0)
                said = errors.read().decode(errors="replace")[-2000:]
                pytest.fail(f"the churner stopped early ({churner.returncode}):\n{said}")
        finally:
            churner.terminate()
            churner.wait(10)
            run_sync(drop_database(name))
