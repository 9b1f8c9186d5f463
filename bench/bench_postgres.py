"""Issue 4 benchmark: errands on PostgreSQL, many processes on one database.

    .venv/bin/python -m bench.bench_postgres [--n 10000] [--workers 1,2,4]

* drain: N no-op tasks submitted one call per task through the in-process Python API
  (``app.submit``), by one submitter or by several concurrent ones in the same process, while
  ``errands worker`` processes run them; tasks/s from the first submit to the last
  ``task.completed`` event, which this process learns from the event log through LISTEN/NOTIFY
  (every change is written to the log, as always);
* ``--synchronous-commit off`` runs the drains with PostgreSQL's ``synchronous_commit=off``
  (set in the database URL, as a user would): commits no longer wait for their WAL flush;
* cross-node event latency: a worker process reports progress stamped with its monotonic clock;
  an SSE watcher of a different node (``errands serve``) subtracts the stamp on receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg

from bench.bench_watch import Watcher
from bench.common import ADMIN_KEY, Server, Worker, machine, pct
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

            start = time.perf_counter()
            await asyncio.gather(*(submitter(k) for k in range(submitters)))
            enqueued = time.perf_counter()
            await asyncio.wait_for(done.wait(), 600)
            end = time.perf_counter()
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
    }


async def cross_node_latency(url: str, watchers: int, ticks: int) -> dict[str, Any]:
    env = {"ERRANDS_PROGRESS_INTERVAL_S": "0", "ERRANDS_LOG_LEVEL": "warning"}
    node = Server(url, "--no-workers", "--app", "bench.watch_app:app", env=env)
    worker = Worker.on(url, "--app", "bench.watch_app:app", env=env)
    try:
        import httpx

        async with httpx.AsyncClient(base_url=node.url, headers=node.headers) as client:
            body = {"type": "ticker", "input": {"ticks": ticks, "every_s": 0.1, "delay_s": 2}}
            task = (await client.post("/v1/tasks", json=body)).json()
        clients = [Watcher() for _ in range(watchers)]
        for w in clients:
            w.task = asyncio.create_task(w.run(node.port, f"/v1/tasks/{task['id']}/watch"))
        deadline = time.monotonic() + 60 + ticks * 0.3
        while any(len(w.latencies_ns) < ticks for w in clients) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        samples = [ns / 1e6 for w in clients for ns in w.latencies_ns]
        for w in clients:
            assert w.task is not None
            w.task.cancel()
    finally:
        worker.stop()
        node.stop()
    return {
        "cross_node_watchers": watchers,
        "samples": len(samples),
        "latency_p50_ms": pct(samples, 50),
        "latency_p99_ms": pct(samples, 99),
        "latency_max_ms": max(samples),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--ticks", type=int, default=200)
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
    url = await fresh_database("errands_bench")
    results.append(await cross_node_latency(url, 1, args.ticks))
    print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
