"""Transactions that are not errands' own, held open on the test server: by the tests of the
event log's bound, and by the churner that runs beside the suite under CI (``python -m
tests.foreign churn``)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from typing import Any

import asyncpg

#: The ways another application holds a transaction open (each one holds a transaction id).
KINDS = ("other_database", "own_table", "reading_errands", "long_statement")
NAME = {"application_name": "another-app"}


class Foreign:
    """A session of another application holding one transaction open, in a thread of its own,
    from :meth:`open` until :meth:`end`."""

    def __init__(self, errands_url: str, other_url: str, kind: str) -> None:
        assert kind in KINDS, kind
        self.kind = kind
        self.url = other_url if kind == "other_database" else errands_url
        self.xid: int | None = None
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"foreign-{kind}")

    def open(self) -> Foreign:
        self._thread.start()
        if not self._opened.wait(20):
            raise AssertionError("the foreign transaction did not open")
        if self._error is not None:
            raise self._error
        return self

    @property
    def is_open(self) -> bool:
        return self._opened.is_set() and self._thread.is_alive() and not self._stop.is_set()

    def end(self) -> None:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), "the foreign transaction did not end"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._hold())
        except BaseException as exc:  # reported by open() or end()
            self._error = exc
            self._opened.set()

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self.url, server_settings=NAME)
        try:
            if self.kind == "own_table":
                await conn.execute("CREATE TABLE IF NOT EXISTS another_app (n integer)")
            isolation = "REPEATABLE READ" if self.kind == "reading_errands" else "READ COMMITTED"
            await conn.execute(f"BEGIN ISOLATION LEVEL {isolation}")
            if self.kind == "own_table":
                await conn.execute("INSERT INTO another_app VALUES (1)")
            elif self.kind == "reading_errands":
                await conn.fetchval("SELECT count(*) FROM errands_tasks")
            self.xid = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
            sleeping = None
            if self.kind == "long_statement":
                sleeping = asyncio.create_task(conn.execute("SELECT pg_sleep(3600)"))
                await _until_active(self.url, conn.get_server_pid())
            self._opened.set()
            await asyncio.to_thread(self._stop.wait)
            if sleeping is not None:
                await _cancel(self.url, conn.get_server_pid())
                with contextlib.suppress(asyncpg.QueryCanceledError):
                    await sleeping
                await conn.execute("ROLLBACK")
            else:
                await conn.execute("COMMIT")
        finally:
            await conn.close()


async def _until_active(url: str, pid: int) -> None:
    conn = await asyncpg.connect(url, server_settings=NAME)
    try:
        async with asyncio.timeout(20):
            while not await conn.fetchval(  # noqa: ASYNC110 - the server's state has no event to await
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid
            ):
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def _cancel(url: str, pid: int) -> None:
    conn = await asyncpg.connect(url, server_settings=NAME)
    try:
        await conn.execute("SELECT pg_cancel_backend($1)", pid)
    finally:
        await conn.close()


async def churn(url: str, hold_s: float = 2.0) -> None:
    """Until killed: transactions with ids, one always open, each held ``hold_s`` (two sessions
    take turns, so the server's oldest running transaction is never younger than that), and
    short writes in between. A lost connection (the suite restarts the server once) is opened
    again."""
    setup = await _connect_again(url)
    await setup.execute("CREATE TABLE IF NOT EXISTS churn (n bigint)")
    await setup.close()

    async def hold(conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("INSERT INTO churn VALUES (1)")
            await asyncio.sleep(hold_s)

    async def write(conn: Any) -> None:
        await conn.execute("INSERT INTO churn VALUES (2)")
        await conn.execute("DELETE FROM churn WHERE n = 2")
        await asyncio.sleep(0.01)

    async def forever(step: Any, delay_s: float = 0.0) -> None:
        await asyncio.sleep(delay_s)
        while True:
            conn = await _connect_again(url)
            try:
                while True:
                    await step(conn)
            except Exception:
                # Whatever broke the session: the server went away, or asyncpg's protocol lost its
                # state with it (InternalClientError, seen once in CI). Connect again, soon.
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)

    await asyncio.gather(forever(hold), forever(hold, hold_s / 2), forever(write))


async def _connect_again(url: str) -> Any:
    while True:
        try:
            return await asyncpg.connect(url, server_settings=NAME, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            await asyncio.sleep(0.2)  # the server is restarting


if __name__ == "__main__":
    assert sys.argv[1] == "churn", sys.argv
    asyncio.run(churn(sys.argv[2]))
