"""Issue 4 benchmark: errands on PostgreSQL, many processes on one database.

    .venv/bin/python -m bench.bench_postgres [--n 10000] [--workers 1,2,4]

* drain: N no-op tasks submitted one call per task through the in-process Python API
  (``app.submit``), by one submitter or by several concurrent ones in the same process, while
  ``errands worker`` processes run them; tasks/s from the first submit to the last
  ``task.completed`` event, which this process learns from the event log through LISTEN/NOTIFY
  (every change is written to the log, as always); beside it, the share of the machine's CPU
  time busy meanwhile (``machine_busy``, every process's);
* ``--synchronous-commit off`` runs the drains with PostgreSQL's ``synchronous_commit=off``
  (set in the database URL, as a user would): commits no longer wait for their WAL flush;
* cross-node event latency: a worker process reports progress (``--rate`` reports a second,
  from five tasks) stamped with its monotonic clock; a set watch (SSE) of a different node
  (``errands serve``) subtracts the stamp on receipt; then the same while two transactions of
  another application are held open (another database; idle in transaction in errands' own).
  Beside the percentiles, those of each fifth of the reports in the order received: whether
  latency grew while they came (as it does, with ``--seconds 30``, while the transactions stay
  open: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg

from bench.bench_watch import Watcher
from bench.common import ADMIN_KEY, Server, Worker, busy_share, machine, machine_ticks, pct
from errands.config import Settings
from errands.demo import app
from errands.model import EventType

PG = "postgresql://postgres@127.0.0.1:5432"


async def fresh_database(name: str) -> str:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
        # Dropping a database makes PostgreSQL checkpoint, flushing what the last run wrote:
        # do it now rather than in the middle of the next measurement.
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return f"{PG}/{name}"


async def drain(url: str, n: int, workers: int, concurrency: int, submitters: int = 1) -> dict[str, Any]:
    env = {"ERRANDS_CONCURRENCY": str(concurrency), "ERRANDS_LOG_LEVEL": "warning"}
    settings = Settings(db=url, admin_key=ADMIN_KEY, log_level="warning")
    done, warm = asyncio.Event(), asyncio.Event()
    completed = 0
    async with app.running(settings, workers=False, sweeper=False) as runtime:

        def on_event(event: Any) -> None:
            nonlocal completed
            if event.type is EventType.COMPLETED:
                completed += 1
                warm.set()
                if completed >= n:
                    done.set()

        runtime.hub.add_listener(on_event)
        procs = [Worker.on(url, "--app", "errands.demo:app", env=env) for _ in range(workers)]
        try:
            await app.submit("noop", owner="warmup")
            await asyncio.wait_for(warm.wait(), 60)
            completed = 0
            latencies: list[float] = []

            async def submitter(first: int) -> None:
                for i in range(first, n, submitters):
                    t0 = time.perf_counter()
                    await app.submit("noop", owner=f"user{i % 100}")
                    latencies.append(time.perf_counter() - t0)

            start, ticks = time.perf_counter(), machine_ticks()
            await asyncio.gather(*(submitter(k) for k in range(submitters)))
            enqueued = time.perf_counter()
            await asyncio.wait_for(done.wait(), 600)
            end, busy = time.perf_counter(), busy_share(ticks, machine_ticks())
        finally:
            for proc in procs:
                proc.stop()
    return {
        "workers": workers,
        "submitters": submitters,
        "concurrency_per_worker": concurrency,
        "n": n,
        "enqueue_per_s": n / (enqueued - start),
        "submit_p50_ms": pct(latencies, 50) * 1000,
        "submit_p99_ms": pct(latencies, 99) * 1000,
        "end_to_end_per_s": n / (end - start),
        "machine_busy": busy,  # the share of the machine's CPU time busy meanwhile (all of it)
    }


async def cross_node_latency(url: str, rate: int, seconds: float, *, foreign: bool) -> dict[str, Any]:
    """Progress reports at ``rate`` per second in all (five tasks, each at a fifth of it) from a
    worker process, received by one set watch (``/v1/watch``) of another node; with
    ``foreign``, two transactions of another application stay open meanwhile (one on another
    database, one idle in transaction on a table of its own in errands' database)."""
    env = {"ERRANDS_PROGRESS_INTERVAL_S": "0", "ERRANDS_LOG_LEVEL": "warning"}
    node = Server(url, "--no-workers", "--app", "bench.watch_app:app", env=env)
    worker = Worker.on(url, "--app", "bench.watch_app:app", env=env)
    holders = await hold_foreign(url) if foreign else []
    try:
        import httpx

        watcher = Watcher()
        watcher.task = asyncio.create_task(watcher.run(node.port, "/v1/watch"))
        ticks = int(rate * seconds / 5)
        body = {"type": "ticker", "input": {"ticks": ticks, "every_s": 5 / rate, "delay_s": 1}}
        async with httpx.AsyncClient(base_url=node.url, headers=node.headers) as client:
            for _ in range(5):
                (await client.post("/v1/tasks", json={**body, "owner": "bench"})).raise_for_status()
        deadline = time.monotonic() + 60 + seconds * 3
        done_by = time.monotonic() + seconds + 5  # the reports' own time, their delay and a margin
        heard, heard_at = 0, time.monotonic()
        while len(watcher.latencies_ns) < ticks * 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if len(watcher.latencies_ns) != heard:
                heard, heard_at = len(watcher.latencies_ns), time.monotonic()
            elif time.monotonic() > done_by and time.monotonic() - heard_at > 3:
                break  # the rest were merged into the reports after them (see worker/progress.py)
        samples = [ns / 1e6 for ns in watcher.latencies_ns]
        watcher.task.cancel()
    finally:
        for conn in holders:
            await conn.close()
        worker.stop()
        node.stop()
    fifth = max(1, len(samples) // 5)  # in the order received: does latency grow meanwhile?
    parts = [samples[i * fifth : (i + 1) * fifth] for i in range(5)]
    return {
        "events_per_s": rate,
        "foreign_transactions_open": foreign,
        "samples": len(samples),
        "latency_p50_ms": pct(samples, 50),
        "latency_p99_ms": pct(samples, 99),
        "latency_max_ms": max(samples),
        "by_fifth_p50_ms": [round(pct(p, 50), 2) for p in parts if p],
        "by_fifth_p99_ms": [round(pct(p, 99), 2) for p in parts if p],
    }


async def hold_foreign(url: str) -> list[asyncpg.Connection]:
    """Two transactions of another application, each holding a transaction id, left open."""
    other = await asyncpg.connect(f"{PG}/postgres", server_settings={"application_name": "another-app"})
    await other.execute("BEGIN")
    await other.fetchval("SELECT pg_current_xact_id()")
    same = await asyncpg.connect(url, server_settings={"application_name": "another-app"})
    await same.execute("CREATE TABLE IF NOT EXISTS another_app (n integer)")
    await same.execute("BEGIN")
    await same.execute("INSERT INTO another_app VALUES (1)")  # then idle in transaction
    return [other, same]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rate", type=int, default=500, help="progress events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long they are reported")
    parser.add_argument("--submitters", default="1,8")
    parser.add_argument("--synchronous-commit", choices=("on", "off"), default="on")
    parser.add_argument("--no-latency", action="store_true", help="measure the drains only")
    args = parser.parse_args()
    options = "" if args.synchronous_commit == "on" else "?synchronous_commit=off"
    results = []
    for submitters in (int(s) for s in args.submitters.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            url = await fresh_database("errands_bench") + options
            result = await drain(url, args.n, workers, args.concurrency, submitters)
            results.append({**result, "synchronous_commit": args.synchronous_commit})
            print(json.dumps(results[-1]), flush=True)
    if args.no_latency:
        print(json.dumps({"machine": machine()}))
        return
    for foreign in (False, True):
        url = await fresh_database("errands_bench")
        results.append(await cross_node_latency(url, args.rate, args.seconds, foreign=foreign))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
