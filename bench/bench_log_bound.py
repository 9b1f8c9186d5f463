"""Issue 13 benchmark: what one read of the PostgreSQL event log costs with its bound computed from
errands' own sessions (``errands_log``, migration 0007) beside the old bound (the oldest
transaction of the whole server), as the server's sessions grow.

    .venv/bin/python -m bench.bench_log_bound [--sessions 0,30,90] [--reads 2000]

Each round opens the given number of idle sessions (a third named ``errands``, the rest another
application's), then times ``--reads`` reads of each kind, alternating, on one connection, with
the log empty after the cursor (the common case: a hub woken by a commit it already has).

Then, while an older transaction of errands' is still running (most of the time, under load),
the bound alone and what each statement that writes events pays for what precedes them (a
commit of one statement that calls ``errands_after``), each as migration 0018 made it and as it
was before (both read the sessions every time; kept here under names of their own), timed the
same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from typing import Any

import asyncpg

from bench.bench_postgres import PG, fresh_database
from bench.common import machine
from errands.clock import SystemClock
from errands.config import Settings
from errands.store import open_store
from errands.store.migrations import migrations
from errands.store.postgres import session_settings

NEW = "SELECT * FROM errands_log($1, $2, false)"
#: The read before migration 0007, written out (events below the server's oldest transaction).
OLD = """
WITH b AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16 AS bound)
SELECT e.seq, e.type, e.at, e.task_id, e.owner, e.task_type, e.status, NULL::bytea,
       coalesce((SELECT max(seq) FROM errands_events) >= b.bound, false)
FROM b LEFT JOIN errands_events e ON e.seq > $1 AND e.seq < b.bound
ORDER BY e.seq LIMIT $2
"""


#: A commit of one statement that calls errands_after, as a write statement does.
AFTER = "SELECT {}(pg_current_xact_id()::text::bigint << 16)"


def _as_before_0018() -> str:
    """errands_after and the bound it asked before migration 0018 (both read pg_stat_activity
    whenever an older transaction was running), as migrations 0007 and 0016 wrote them, under
    names of their own."""
    texts = {name: sql for _, name, sql in migrations("postgres")}
    bound = re.search(r"CREATE FUNCTION errands_log_bound\(\).*?\n\$\$;", texts["0007_log_bound.sql"], re.S)
    after = re.search(r"CREATE FUNCTION errands_after\(.*?\n\$\$;", texts["0016_after.sql"], re.S)
    if bound is None or after is None:
        raise RuntimeError("migrations 0007 and 0016 no longer define the functions as they did")
    both = f"{bound.group(0)}\n{after.group(0)}"
    return both.replace("errands_log_bound", "bench_bound_0007").replace("errands_after", "bench_after_0016")


async def timed(conn: asyncpg.Connection, sql: str, args: tuple[int, ...], reads: int) -> float:
    start = time.perf_counter()
    for _ in range(reads):
        await conn.fetch(sql, *args)
    return (time.perf_counter() - start) / reads * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", default="0,30,90")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    url = await fresh_database("errands_bench")
    store = open_store(Settings(db=url), SystemClock())
    await store.migrate()
    conn = await asyncpg.connect(url, server_settings=session_settings())
    after = int(await conn.fetchval("SELECT errands_log_bound()"))
    counts = [int(n) for n in args.sessions.split(",")]

    async def each(label: dict[str, Any], pair: tuple[str, str], names: tuple[str, str], *given: int) -> None:
        for count in counts:
            timings = await measure(conn, url, count, args.reads, args.rounds, pair, given)
            print(json.dumps({"idle_sessions": count, **label, **dict(zip(names, timings, strict=True))}))

    reads = (NEW, OLD), ("new_bound_us_per_read", "old_bound_us_per_read")
    await each({"events_waiting": False}, *reads, after, 1000)
    # Events waiting above the oldest transaction (one of errands' own, still writing): the
    # new bound then reads pg_stat_activity; the old one is the same read as before.
    writing = await asyncpg.connect(url, server_settings=session_settings())
    await writing.execute("BEGIN")
    await writing.fetchval("SELECT pg_current_xact_id()")
    await conn.execute(
        "INSERT INTO errands_events VALUES ((pg_current_xact_id()::text::bigint << 16), "
        "'task.created', 0, 'bench', 'bench', 'noop', 'pending', '')"
    )
    await each({"events_waiting": True}, *reads, after, 1000)
    await conn.execute(_as_before_0018())
    label = {"events_waiting": True, "older_transaction_of_errands_running": True}
    bounds = "SELECT errands_log_bound()", "SELECT bench_bound_0007()"
    await each(label, bounds, ("bound_us_per_call", "bound_before_0018_us_per_call"))
    commits = AFTER.format("errands_after"), AFTER.format("bench_after_0016")
    await each(label, commits, ("after_us_per_commit", "after_before_0018_us_per_commit"))
    await writing.close()
    await conn.close()
    print(json.dumps({"machine": machine(), "server": PG}))


async def measure(
    conn: asyncpg.Connection,
    url: str,
    count: int,
    reads: int,
    rounds: int,
    pair: tuple[str, str],
    args: tuple[int, ...],
) -> tuple[float, float]:
    """The median time of each statement of ``pair`` (in turns, ``rounds`` of ``reads`` calls)
    beside ``count`` idle sessions, a third of them errands'."""
    idle = [
        await asyncpg.connect(
            url, server_settings=session_settings() if i % 3 == 0 else {"application_name": "other"}
        )
        for i in range(count)
    ]
    first, second = [], []
    for _ in range(rounds):
        first.append(await timed(conn, pair[0], args, reads))
        second.append(await timed(conn, pair[1], args, reads))
    for session in idle:
        await session.close()
    return round(statistics.median(first), 1), round(statistics.median(second), 1)


if __name__ == "__main__":
    asyncio.run(main())
