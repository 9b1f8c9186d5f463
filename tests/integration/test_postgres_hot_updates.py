"""A change of a task that leaves its indexed columns as they were is a heap-only update.

A progress report or a stream's positions (or a renewed lease) changes no indexed column of
``errands_tasks`` (migration 0019): PostgreSQL then writes no index entry for it and prunes the
old versions within their page. Were one of those columns indexed (by any index, whatever its
WHERE), every such change would add an entry to each index of the row, and while PostgreSQL must
keep every version (a transaction open elsewhere) each read of the row would pass all of them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from errands import model
from errands.clock import SystemClock
from errands.config import Settings
from errands.store import open_store
from errands.store.postgres.sql import STATEMENTS
from errands.store.records import ClaimSpec
from tests.conftest import migrated_database
from tests.integration.conftest import new_task

pytestmark = pytest.mark.postgres

#: What a change that leaves a task's status as it is writes: a progress report (progress,
#: message), a stream's positions, a renewed lease; and every change (seq, updated_at).
#: (Reports are made few enough here to fit beside the row in its page however many versions
#: PostgreSQL must keep: a transaction open elsewhere on the server must not fail the test.)
REPORTS = 6
UNINDEXED = ("seq", "updated_at", "progress", "message", "stream_positions", "lease_expires_at")


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with migrated_database("errands_hot") as url:
        yield url


async def test_no_index_of_tasks_holds_a_column_that_a_change_of_progress_writes(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname AS name, "
            "ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = i.indrelid "
            "      AND a.attnum = ANY(i.indkey)) AS keys, "
            "coalesce(pg_get_expr(i.indexprs, i.indrelid), '') || ' ' "
            "|| coalesce(pg_get_expr(i.indpred, i.indrelid), '') AS rest "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'errands_tasks'::regclass"
        )
    finally:
        await conn.close()
    assert len(rows) > 10  # (the query found the indexes)
    held = {
        (row["name"], column)
        for row in rows
        for column in UNINDEXED
        if column in row["keys"] or re.search(rf"\b{column}\b", row["rest"])
    }
    assert held == set()


async def test_progress_reports_are_heap_only_updates(url: str) -> None:
    clock = SystemClock()
    store = open_store(Settings(db=url), clock)
    await store.open()
    try:
        await store.create(new_task("t1"))
        [claimed] = await store.claim(worker_id="w", specs=[ClaimSpec("work")], limit=1, lease_s=60)
        token = claimed.lease_token or ""
        for n in range(1, REPORTS + 1):
            await store.apply(
                "t1",
                lambda r, n=n: model.report_progress(
                    r, now=clock.now(), lease_token=token, progress=n, message=f"step {n}"
                ),
            )
    finally:
        await store.close()  # its sessions end, which sends their statistics
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + 60
        while True:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            updated, hot = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'errands_tasks'"
            )
            if updated >= 1 + REPORTS or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert updated == 1 + REPORTS  # the claim (which changes the status: not heap-only), the reports
    assert hot == REPORTS


async def test_the_fan_outs_question_is_read_from_the_index_of_ends_it_asks_of(url: str) -> None:
    """(Were its WHERE not the index's, the plan would read every event after the cursor.)"""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET enable_seqscan = off")  # an empty table: what the plan may use
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {STATEMENTS.notify_urls_after}", 0))
    finally:
        await conn.close()
    assert "errands_events_notify_url" in plan


def test_the_ends_it_asks_of_are_those_a_notify_url_hears_of() -> None:
    """The statement, the index (fresh and migrated) and the fan-out's policy name the same."""
    from errands.model import NOTIFY_URL_MARK
    from errands.notify.policy import END_EVENTS
    from errands.store.migrations import fresh_schema, migrations

    ends = {e.value for e in END_EVENTS}
    [migration] = [sql for version, _, sql in migrations("postgres") if version == 19]
    mark = re.escape(NOTIFY_URL_MARK.decode())
    where = re.compile(rf"type IN \(([^)]*)\)\s+AND position\('{mark}'::bytea IN task\) > 0")
    for text in (STATEMENTS.notify_urls_after, fresh_schema("postgres"), migration):
        listed = where.search(text)
        assert listed is not None
        assert set(re.findall(r"'([^']*)'", listed.group(1))) == ends
