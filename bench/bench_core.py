"""Issue 2 benchmark: enqueue N no-op tasks one call at a time while workers run, on SQLite.

    .venv/bin/python bench/bench_core.py [--n 10000] [--modes python,http,paced]

* ``python``: in-process ``await app.submit("noop", owner=…)`` with workers in the same process.
* ``http``: ``POST /v1/tasks`` one request at a time over one keep-alive connection (a minimal
  ``http.client`` client) to ``errands serve``, whose in-process workers run the tasks.
* ``http2``: the same with ``errands serve --no-workers`` plus one ``errands worker`` process.
* ``sdk``: the same as ``http`` through ``errands.AsyncClient`` (httpx), for comparison.
* ``paced``: ``POST /v1/tasks`` at a fixed 200 requests/s, for submit latency under steady load.

Reports enqueue rate, submit latency p50/p99 and end-to-end tasks/s (first submit to last
``completed``); every change is written to the event log throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ADMIN_KEY, Server, Worker, machine, pct
from errands.client import AsyncClient
from errands.config import Settings
from errands.demo import app
from errands.model import EventType


async def python_mode(n: int, workdir: Path) -> dict[str, Any]:
    settings = Settings(db=f"sqlite:///{workdir / 'python.db'}", admin_key=ADMIN_KEY, log_level="warning")
    done, warm = asyncio.Event(), asyncio.Event()
    completed = 0

    async with app.running(settings) as runtime:

        def on_event(event: Any) -> None:
            nonlocal completed
            if event.type is EventType.COMPLETED:
                completed += 1
                warm.set()
                if completed >= n:
                    done.set()

        runtime.hub.add_listener(on_event)
        await app.submit("noop", owner="warmup")
        await warm.wait()
        completed = 0
        latencies = []
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            await app.submit("noop", owner=f"user{i % 100}")
            latencies.append(time.perf_counter() - t0)
        enqueued = time.perf_counter()
        await done.wait()
        end = time.perf_counter()
        events = await runtime.store.last_seq()
    return {
        "mode": "python",
        "n": n,
        "enqueue_per_s": n / (enqueued - start),
        "submit_p50_ms": pct(latencies, 50) * 1000,
        "submit_p99_ms": pct(latencies, 99) * 1000,
        "end_to_end_per_s": n / (end - start),
        "events_in_log": events,
    }


class RawClient:
    """A minimal HTTP/1.1 keep-alive client (``http.client``): the protocol's cost, not a library's."""

    def __init__(self, server: Server) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", server.port)
        self._headers = {**server.headers, "content-type": "application/json"}

    def submit(self, body: dict[str, Any]) -> int:
        self._conn.request("POST", "/v1/tasks", body=json.dumps(body), headers=self._headers)
        response = self._conn.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        self._conn.close()


def wait_completed(server: Server, n: int) -> None:
    while server.completed() < n:
        time.sleep(0.05)


def http_mode(n: int, workdir: Path, *, server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    server = Server(f"sqlite:///{workdir / 'http.db'}", *server_args)
    workers = []
    if "--no-workers" in server_args:
        workers = [Worker(server)]
    client = RawClient(server)
    try:
        assert client.submit({"type": "noop", "owner": "warmup"}) == 202
        wait_completed(server, 1)
        latencies = []
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            status = client.submit({"type": "noop", "owner": f"user{i % 100}"})
            latencies.append(time.perf_counter() - t0)
            assert status == 202
        enqueued = time.perf_counter()
        wait_completed(server, n + 1)
        end = time.perf_counter()
    finally:
        client.close()
        for worker in workers:
            worker.stop()
        server.stop()
    return {
        "mode": "http" + (" + separate worker process" if workers else ""),
        "n": n,
        "enqueue_per_s": n / (enqueued - start),
        "submit_p50_ms": pct(latencies, 50) * 1000,
        "submit_p99_ms": pct(latencies, 99) * 1000,
        "end_to_end_per_s": n / (end - start),
    }


async def sdk_mode(n: int, workdir: Path) -> dict[str, Any]:
    """The same through the Python SDK (``errands.AsyncClient``, on httpx)."""
    server = Server(f"sqlite:///{workdir / 'sdk.db'}")
    try:
        async with AsyncClient(server.url, ADMIN_KEY) as client:
            await client.submit("noop", owner="warmup")
            wait_completed(server, 1)
            latencies = []
            start = time.perf_counter()
            for i in range(n):
                t0 = time.perf_counter()
                await client.submit("noop", owner=f"user{i % 100}")
                latencies.append(time.perf_counter() - t0)
            enqueued = time.perf_counter()
            wait_completed(server, n + 1)
            end = time.perf_counter()
    finally:
        server.stop()
    return {
        "mode": "http via the Python SDK (httpx)",
        "n": n,
        "enqueue_per_s": n / (enqueued - start),
        "submit_p50_ms": pct(latencies, 50) * 1000,
        "submit_p99_ms": pct(latencies, 99) * 1000,
        "end_to_end_per_s": n / (end - start),
    }


def paced_mode(n: int, workdir: Path, rate: float = 200.0) -> dict[str, Any]:
    server = Server(f"sqlite:///{workdir / 'paced.db'}")
    client = RawClient(server)
    try:
        assert client.submit({"type": "noop"}) == 202
        latencies = []
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            status = client.submit({"type": "noop", "owner": f"user{i % 100}"})
            latencies.append(time.perf_counter() - t0)
            assert status == 202
        elapsed = time.perf_counter() - start
    finally:
        client.close()
        server.stop()
    return {
        "mode": f"http paced at {rate:g}/s",
        "n": n,
        "achieved_per_s": n / elapsed,
        "submit_p50_ms": pct(latencies, 50) * 1000,
        "submit_p99_ms": pct(latencies, 99) * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--paced-n", type=int, default=2_000)
    parser.add_argument("--modes", default="python,http,http2,sdk,paced")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            if mode == "python":
                results.append(await python_mode(args.n, Path(tmp)))
            elif mode == "http":
                results.append(http_mode(args.n, Path(tmp)))
            elif mode == "http2":
                results.append(http_mode(args.n, Path(tmp), server_args=("--no-workers",)))
            elif mode == "sdk":
                results.append(await sdk_mode(args.n, Path(tmp)))
            elif mode == "paced":
                results.append(paced_mode(args.paced_n, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    asyncio.run(main())
