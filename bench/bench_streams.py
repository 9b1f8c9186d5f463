"""Issue 14 benchmark: output streams, from ``ctx.stream`` in a handler to SSE watchers.

    .venv/bin/python -m bench.bench_streams [--stores sqlite,postgres] [--seconds 10]

Two shapes, each on SQLite and on PostgreSQL, with ``errands serve`` running the handlers in
its own process (``bench.watch_app:streamer``, each chunk stamped with CLOCK_MONOTONIC):

* ``many``: 100 tasks, each streaming 100 chunks a second, each watched by one SSE client;
* ``fanout``: one task streaming 100 chunks a second to 1,000 SSE clients.

Measured: chunk latency from ``ctx.stream`` to the watcher (p50/p99/max), the stream events
(writes) and, on PostgreSQL, the commits per second of errands' database over the run, and the
CPU the server process and the watchers' process used (seconds of CPU per second: 1.0 is one
core of the two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from typing import Any

import asyncpg
import httpx

from bench.bench_postgres import fresh_database
from bench.common import Server, cpu_s, machine, open_sse, pct


class ChunkWatcher:
    """One SSE connection over a raw asyncio stream; the latency of every chunk it receives."""

    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.chunks = 0
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self, port: int, path: str) -> None:
        reader, writer = await open_sse(port, path)
        pending = b""
        try:
            while True:
                # Whole reads and one regex per read, not a parse per line: the client shares
                # the two cores with the server and must cost as little as possible per chunk.
                data = await reader.read(1 << 16)
                if not data:
                    return
                now = time.perf_counter_ns()
                self.ready.set()
                pending += data
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                complete, pending = pending[: cut + 2], pending[cut + 2 :]
                for group in _CHUNKS.findall(complete):
                    for stamp in _STAMP.findall(group):
                        self.latencies_ns.append(now - int(stamp))
                        self.chunks += 1
        finally:
            writer.close()


_CHUNKS = re.compile(rb'"chunks":\[([^\]]*)\]')
_STAMP = re.compile(rb"([0-9]+),")


async def xact_commits(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value: int = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return value
    finally:
        await conn.close()


async def run_shape(
    db: str, store: str, shape: str, seconds: float, rate: int, flush_s: float
) -> dict[str, Any]:
    tasks, watchers_per_task = (100, 1) if shape == "many" else (1, 1000)
    env = {
        "ERRANDS_CONCURRENCY": str(tasks + 10),
        "ERRANDS_MAX_WATCHES_PER_OWNER": "5000",
        "ERRANDS_STREAM_FLUSH_S": str(flush_s),
    }
    server = Server(db, "--app", "bench.watch_app:app", env=env)
    watchers: list[ChunkWatcher] = []
    try:
        chunks = int(rate * seconds)
        connect_s = 3 + tasks * watchers_per_task / 300
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
            ids = []
            for _ in range(tasks):
                body = {
                    "type": "streamer",
                    "input": {"chunks": chunks, "every_s": 1 / rate, "delay_s": connect_s},
                }
                ids.append((await client.post("/v1/tasks", json=body)).json()["id"])
        for task_id in ids:
            for _ in range(watchers_per_task):
                w = ChunkWatcher()
                w.task = asyncio.create_task(w.run(server.port, f"/v1/tasks/{task_id}/watch?streams=only"))
                watchers.append(w)
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers)), 60)
        # The run: from the first chunk (connect_s after submit) to the last.
        await asyncio.sleep(max(0.0, connect_s - 1))
        commits_before = await xact_commits(db) if store == "postgres" else 0
        cpu_before, t0, client_before = cpu_s(server.proc.pid), time.monotonic(), time.process_time()
        deadline = t0 + seconds * 3 + 30
        while any(w.chunks < chunks for w in watchers) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - t0
        cpu = (cpu_s(server.proc.pid) - cpu_before) / elapsed
        client_cpu = (time.process_time() - client_before) / elapsed
        commits = (await xact_commits(db) - commits_before) / elapsed if store == "postgres" else None
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
            params = {"limit": 1000, "streams": "only"}
            events = (await client.get(f"/v1/tasks/{ids[0]}/events", params=params)).json()["events"]
        writes_per_task = sum(1 for e in events if e["type"] == "task.stream")
    finally:
        for w in watchers:
            if w.task is not None:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in watchers if w.task), return_exceptions=True)
        server.stop()
    samples = [ns / 1e6 for w in watchers for ns in w.latencies_ns]
    return {
        "store": store,
        "shape": shape,
        "tasks": tasks,
        "watchers": tasks * watchers_per_task,
        "chunks_per_s_per_task": rate,
        "stream_flush_s": flush_s,
        "chunks_received": len(samples),
        "chunks_expected": chunks * tasks * watchers_per_task,
        "latency_p50_ms": round(pct(samples, 50), 2),
        "latency_p99_ms": round(pct(samples, 99), 2),
        "latency_max_ms": round(max(samples), 2),
        "stream_writes_per_s": round(writes_per_task * tasks / seconds, 1),
        "pg_commits_per_s": None if commits is None else round(commits, 1),
        "server_cpu_s_per_s": round(cpu, 2),
        "watchers_cpu_s_per_s": round(client_cpu, 2),  # this process: every watcher's reads
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--shapes", default="many,fanout")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=100, help="chunks per second per task")
    parser.add_argument("--flush-s", type=float, default=0.02, help="ERRANDS_STREAM_FLUSH_S")
    args = parser.parse_args()
    for store in args.stores.split(","):
        for shape in args.shapes.split(","):
            if store == "sqlite":
                db = f"sqlite:///{tempfile.mkdtemp(prefix='errands-bench-')}/errands.db"
            else:
                db = await fresh_database("errands_bench")
            print(
                json.dumps(await run_shape(db, store, shape, args.seconds, args.rate, args.flush_s)),
                flush=True,
            )
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    asyncio.run(main())
