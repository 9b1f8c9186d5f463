"""Issue 6 benchmark: outbound webhooks from ``errands serve`` to a local receiver.

    .venv/bin/python -m bench.bench_notify [--tasks 3000] [--paced 1000] [--rate 100] [--stores …]

An endpoint subscribed to ``task.completed`` receives one signed webhook per task. The receiver is
a minimal keep-alive HTTP server in this process that answers ``200`` at once and notes when each
webhook arrived.

* ``burst``: ``--tasks`` no-op tasks submitted as fast as 8 connections allow; reports tasks/s
  end to end (first submit to last webhook received), and the same run without an endpoint for
  comparison (the cost of notifying), plus delivery latency (task ``finished_at`` to arrival).
* ``paced``: ``--paced`` tasks at ``--rate``/s: delivery latency under steady load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import orjson

from bench.common import Server, machine, pct

PG_URL = "postgresql://postgres@127.0.0.1:5432/errands_bench"


class Receiver:
    def __init__(self) -> None:
        self.arrivals: dict[str, tuple[float, float]] = {}  # webhook-id -> (arrived, finished_at)
        self.done = asyncio.Event()
        self.expect = 0
        self.handlers: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        """End the connections still open (Python 3.11 logs handlers cancelled at loop exit)."""
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length, message_id = 0, ""
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"webhook-id":
                        message_id = value.strip().decode()
                body = await reader.readexactly(length)
                arrived = time.time()
                finished = orjson.loads(body)["data"]["task"]["finished_at"]
                self.arrivals[message_id] = (arrived, datetime.fromisoformat(finished).timestamp())
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                if len(self.arrivals) >= self.expect:
                    self.done.set()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()
        finally:
            self.handlers.discard(task)


async def submit(server: Server, n: int, *, rate: float | None = None, connections: int = 8) -> float:
    """Submit ``n`` noop tasks; return when the first was sent."""
    queue = list(range(n))
    start = time.time()

    async def one(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            if rate is not None:
                delay = start + (n - 1 - i) / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            r = await client.post("/v1/tasks", json={"type": "noop", "owner": "bench"})
            assert r.status_code == 202, r.text

    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
        await asyncio.gather(*(one(client) for _ in range(connections if rate is None else 4)))
    return start


async def wait_completed(server: Server, n: int) -> float:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
        while (await client.get("/v1/stats")).json()["by_status"]["completed"] < n:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # another process: its stats are the signal
    return time.time()


async def fresh(store: str, tmp: str, name: str) -> str:
    if store == "sqlite":
        return f"sqlite:///{tmp}/{name}.db"
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    await conn.execute('DROP DATABASE IF EXISTS "errands_bench" WITH (FORCE)')
    await conn.execute('CREATE DATABASE "errands_bench"')
    await conn.close()
    return PG_URL


async def run(store: str, tasks: int, paced: int, rate: float) -> list[dict[str, Any]]:
    env = {"ERRANDS_CONCURRENCY": "200", "ERRANDS_NOTIFY_ALLOW_NETWORKS": "127.0.0.0/8"}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # Without an endpoint: the baseline.
        server = Server(await fresh(store, tmp, "plain"), env=env)
        try:
            start = await submit(server, tasks)
            baseline = tasks / (await wait_completed(server, tasks) - start)
        finally:
            server.stop()
        receiver = Receiver()
        listener = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        server = Server(await fresh(store, tmp, "notify"), env=env)
        try:
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
                r = await client.post(
                    "/v1/endpoints", json={"url": f"http://127.0.0.1:{port}/", "events": ["task.completed"]}
                )
                assert r.status_code == 201, r.text
            receiver.expect = tasks
            start = await submit(server, tasks)
            await asyncio.wait_for(receiver.done.wait(), 300)
            last = max(a for a, _ in receiver.arrivals.values())
            latencies = [(a - f) * 1000 for a, f in receiver.arrivals.values()]
            results.append(
                {
                    "store": store,
                    "mode": "burst",
                    "tasks": tasks,
                    "without_endpoint_tasks_per_s": round(baseline),
                    "with_endpoint_tasks_per_s": round(tasks / (last - start)),
                    "delivery_latency_p50_ms": round(pct(latencies, 50), 1),
                    "delivery_latency_p99_ms": round(pct(latencies, 99), 1),
                }
            )
            receiver.arrivals.clear()
            receiver.done.clear()
            receiver.expect = paced
            await submit(server, paced, rate=rate)
            await asyncio.wait_for(receiver.done.wait(), 300)
            latencies = [(a - f) * 1000 for a, f in receiver.arrivals.values()]
            results.append(
                {
                    "store": store,
                    "mode": "paced",
                    "tasks": paced,
                    "rate_per_s": rate,
                    "delivery_latency_p50_ms": round(pct(latencies, 50), 1),
                    "delivery_latency_p99_ms": round(pct(latencies, 99), 1),
                }
            )
        finally:
            server.stop()
            listener.close()
            await receiver.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--paced", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--stores", default="sqlite,postgres")
    args = parser.parse_args()
    for store in args.stores.split(","):
        for result in await run(store, args.tasks, args.paced, args.rate):
            print(json.dumps(result), flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    asyncio.run(main())
