"""What a session of errands knows of other applications' transactions (migration 0018): the
log's bound and what precedes a commit's events read PostgreSQL's sessions (pg_stat_activity,
whose cost grows with every session of the server) only when nothing cheaper answers, and never
let a transaction of errands' be passed while it runs.

Each call here runs in a transaction of its own, on a session with ``track_functions = 'pl'``:
whether it read the sessions is whether it called ``errands_classify``, read from the session's
function statistics before and after it, in the same transaction (they are not sent on before
it ends)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from errands.store.postgres import session_settings
from tests.conftest import migrated_database

pytestmark = pytest.mark.postgres

CLASSIFY_CALLS = (
    "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions WHERE funcname = 'errands_classify'"
)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with migrated_database("errands_known") as url:
        yield url


async def session(url: str, application: str = "errands") -> asyncpg.Connection:
    settings = {**session_settings(), "application_name": application}
    conn: asyncpg.Connection = await asyncpg.connect(url, server_settings=settings)
    await conn.execute("SET track_functions = 'pl'")
    return conn


async def holding(url: str, application: str) -> asyncpg.Connection:
    """A session of ``application`` with a transaction that has its id, left open."""
    conn = await session(url, application)
    await conn.execute("BEGIN")
    await conn.fetchval("SELECT pg_current_xact_id()")
    return conn


async def after(conn: asyncpg.Connection) -> tuple[int | None, int, int]:
    """errands_after in a writing transaction of its own: what it returned, whether it read the
    sessions (0 or 1), and what it must return when not NULL (the last seq below its base)."""
    async with conn.transaction():
        calls = await conn.fetchval(CLASSIFY_CALLS)
        row = await conn.fetchrow(
            "SELECT errands_after(pg_current_xact_id()::text::bigint << 16) AS after, "
            "(SELECT coalesce(max(seq), 0) FROM errands_events "
            " WHERE seq < pg_current_xact_id()::text::bigint << 16) AS below"
        )
        assert row is not None
        return row["after"], int(await conn.fetchval(CLASSIFY_CALLS) - calls), row["below"]


async def until_known(conn: asyncpg.Connection) -> tuple[int, int]:
    """Call errands_after until it is not NULL (another server transaction may hold it back a
    moment, and one that took its id after a snapshot always does): what it returned, and how
    many of the calls looked at the sessions."""
    looks = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found, looked, below = await after(conn)
        looks += looked
        if found is not None:
            assert found == below
            return found, looks
    raise AssertionError("errands_after stayed NULL with no older transaction of errands' running")


async def close(*conns: Any) -> None:
    for conn in conns:
        await conn.close()


async def test_an_older_transaction_of_errands_makes_the_commit_wait_however_long_it_runs(url: str) -> None:
    """While an older transaction of errands' runs, errands_after is NULL, even with an older one
    of another application's running too; it looks at the sessions at most once per 20 ms
    meanwhile (in between, an older transaction is most likely errands' again). Once it has
    ended, the foreign one, learnt at the first look, holds nothing back."""
    foreign = await holding(url, "another-app")
    ours = await holding(url, "errands")
    me = await session(url)
    try:
        calls = reads = 0
        started = time.monotonic()
        while time.monotonic() - started < 0.2:
            found, looked, _ = await after(me)
            assert found is None
            calls, reads = calls + 1, reads + looked
        elapsed = time.monotonic() - started
        assert 1 <= reads <= 2 + elapsed / 0.02, (reads, calls, elapsed)
        await ours.execute("COMMIT")
        await until_known(me)
    finally:
        await close(foreign, ours, me)


async def test_a_session_learns_an_older_foreign_transaction_and_then_passes_it_unread(url: str) -> None:
    """A session that meets an older transaction it knows nothing of reads the sessions, learns
    that it is another application's and passes it; from then on it passes it without reading
    them."""
    foreign = await holding(url, "another-app")
    me = await session(url)
    try:
        _, looks = await until_known(me)
        assert looks >= 1  # what it knows, it learnt from the sessions
        known = await me.fetchval("SELECT current_setting('errands.foreign', true)")
        held = await foreign.fetchval("SELECT pg_current_xact_id()::text")
        assert held in known.split(",")
        # From then on it is known: most calls pass it, and few read the sessions (a short
        # transaction of another database, which the suite may run beside, is looked up).
        calls = [await after(me) for _ in range(40)]
        assert sum(found is not None for found, _, _ in calls) >= 20
        assert sum(looked for _, looked, _ in calls) <= 20
    finally:
        await close(foreign, me)


async def test_the_bound_passes_a_known_foreign_transaction_without_reading_the_sessions(url: str) -> None:
    """Events committed above an older foreign transaction: the first read of the bound reads the
    sessions and passes it; the next passes it on what the session learnt, without reading them.
    A transaction of errands' that began before the events holds the bound below them."""
    foreign = await holding(url, "another-app")
    writer = await session(url)
    reader = await session(url)
    try:
        async with writer.transaction():
            top = await writer.fetchval(
                "INSERT INTO errands_events (seq, type, at, task_id, owner, task_type, status, task) "
                "VALUES (pg_current_xact_id()::text::bigint << 16 | 1, 'task.created', 0, 't', 'o', 'w', "
                "'pending', '') RETURNING seq"
            )
        for expected_reads in (1, 0):
            async with reader.transaction():
                calls = await reader.fetchval(CLASSIFY_CALLS)
                bound = await reader.fetchval("SELECT errands_log_bound()")
                assert bound > top
                assert await reader.fetchval(CLASSIFY_CALLS) - calls == expected_reads
        ours = await holding(url, "errands")
        try:
            async with writer.transaction():
                above = await writer.fetchval(
                    "INSERT INTO errands_events (seq, type, at, task_id, owner, task_type, status, task) "
                    "VALUES (pg_current_xact_id()::text::bigint << 16 | 1, 'task.created', 0, 'u', 'o', "
                    "'w', 'pending', '') RETURNING seq"
                )
            ours_base = int(await ours.fetchval("SELECT pg_current_xact_id()::text::bigint")) << 16
            async with reader.transaction():
                assert await reader.fetchval("SELECT errands_log_bound()") == ours_base < above
        finally:
            await ours.close()
    finally:
        await close(foreign, writer, reader)
