"""Issue 3 benchmark: live watches on one ``errands serve`` process (SQLite).

    .venv/bin/python -m bench.bench_watch [--watchers 1,1000,10000] [--ticks 20]

* latency from commit to watcher (p50/p99) with N concurrent SSE watchers, the server's handler
  reporting progress whose message is its monotonic clock in ns and each watcher subtracting it
  from its own clock on receipt (CLOCK_MONOTONIC is system-wide on Linux), in two shapes:
  ``own`` (each watcher follows its own task; N tasks tick at random phases) and ``broadcast``
  (all N watchers follow one task: every event is fanned out N times at once, the worst case);
* memory per idle watcher (server RSS before and after opening N idle watches);
* time to fan one event out to N watchers of one owner (``/v1/watch?owner=``): from the event's
  report to the last watcher receiving it;
* polling versus watching: requests, bytes and detection delay per task for a client polling
  every 5 s versus one watch, for tasks of 10 to 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Server, machine, open_sse, pct


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Watcher:
    """One SSE connection over a raw asyncio stream (the cheapest client there is)."""

    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.bytes = 0
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self, port: int, path: str) -> None:
        reader, writer = await open_sse(port, path)
        event_name = b""
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.bytes += len(line)
                if line.startswith(b"event: "):
                    event_name = line[7:].strip()
                    continue
                if line.startswith(b"data: ") and event_name != b"task.progress":
                    self.ready.set()  # a snapshot carries an older report's stamp: not a sample
                    continue
                if line.startswith(b"data: "):
                    # Byte search, not a JSON parse: the client shares the machine's two cores
                    # with the server, and must cost as little as possible per message.
                    now = time.perf_counter_ns()
                    start = line.find(b'"message":"')
                    if start > 0:
                        end = line.find(b'"', start + 11)
                        stamp = line[start + 11 : end]
                        if stamp.isdigit():
                            self.latencies_ns.append(now - int(stamp))
                    self.ready.set()
        finally:
            writer.close()


async def open_watchers(n: int, port: int, path: str) -> list[Watcher]:
    watchers = [Watcher() for _ in range(n)]
    for start in range(0, n, 500):
        batch = watchers[start : start + 500]
        for w in batch:
            w.task = asyncio.create_task(w.run(port, path))
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in batch)), 60)
    return watchers


async def close_watchers(watchers: list[Watcher]) -> None:
    for w in watchers:
        assert w.task is not None
        w.task.cancel()
    await asyncio.gather(*(w.task for w in watchers if w.task), return_exceptions=True)


async def latency_run(server: Server, n: int, ticks: int, every_s: float, shape: str) -> dict[str, Any]:
    """Latency with ``n`` watchers: each on its own task (``own``) or all on one (``broadcast``)."""
    connect_s = 3 + n / 400  # time to open every watcher before the first tick
    rng = random.Random(n)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
        ids = []
        for _ in range(1 if shape == "broadcast" else n):
            ticker = {"ticks": ticks, "every_s": every_s, "delay_s": connect_s + rng.uniform(0, every_s)}
            body = {"type": "ticker", "owner": "bench", "input": ticker}
            ids.append((await client.post("/v1/tasks", json=body)).json()["id"])
    paths = [f"/v1/tasks/{ids[i % len(ids)]}/watch" for i in range(n)]
    watchers = [Watcher() for _ in range(n)]
    for start in range(0, n, 500):
        batch = list(range(start, min(n, start + 500)))
        for i in batch:
            watchers[i].task = asyncio.create_task(watchers[i].run(server.port, paths[i]))
        await asyncio.wait_for(asyncio.gather(*(watchers[i].ready.wait() for i in batch)), 60)
    deadline = time.monotonic() + connect_s + 60 + ticks * every_s * 3
    while any(len(w.latencies_ns) < ticks for w in watchers) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    samples = [ns / 1e6 for w in watchers for ns in w.latencies_ns]
    await close_watchers(watchers)
    return {
        "shape": shape,
        "watchers": n,
        "events_per_watcher": ticks,
        "every_s": every_s,
        "samples": len(samples),
        "latency_p50_ms": pct(samples, 50),
        "latency_p99_ms": pct(samples, 99),
        "latency_max_ms": max(samples),
    }


async def memory_and_fanout(server: Server, n: int) -> dict[str, Any]:
    before = rss_mb(server.proc.pid)
    watchers = await open_watchers(n, server.port, "/v1/watch?owner=fanout")
    await asyncio.sleep(2)
    after = rss_mb(server.proc.pid)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        await client.post(
            "/v1/tasks",
            json={"type": "ticker", "owner": "fanout", "input": {"ticks": 3, "every_s": 1.0, "delay_s": 0.2}},
        )
    deadline = time.monotonic() + 60
    while any(len(w.latencies_ns) < 3 for w in watchers) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    # One event reaches every watcher: the slowest receipt is the fan-out time of that event.
    fanouts = [max(w.latencies_ns[i] for w in watchers) / 1e6 for i in range(3)]
    await close_watchers(watchers)
    return {
        "idle_watchers": n,
        "server_rss_before_mb": before,
        "server_rss_after_mb": after,
        "memory_per_idle_watcher_kb": (after - before) * 1024 / n,
        "fanout_to_all_ms": fanouts,
    }


async def polling_versus_watching(server: Server, latency_p50_ms: float) -> dict[str, Any]:
    """Bytes on the wire per poll and per watched task, from a real 10 s demo-like task."""
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        task = (
            await client.post(
                "/v1/tasks", json={"type": "ticker", "owner": "cmp", "input": {"ticks": 20, "every_s": 0.05}}
            )
        ).json()
        watcher = Watcher()
        runner = asyncio.create_task(watcher.run(server.port, f"/v1/tasks/{task['id']}/watch"))
        await asyncio.wait_for(runner, 60)
        poll = await client.get(f"/v1/tasks/{task['id']}")
    poll_bytes = len(poll.content) + sum(len(k) + len(v) + 4 for k, v in poll.headers.items()) + 17
    watch_bytes = watcher.bytes
    interval_s = 5.0
    rows = []
    rng = random.Random(1)
    for duration_s in (10, 30, 60):
        polls = duration_s / interval_s + 1
        # A poller learns of the end at its next poll after it: uniform over the interval.
        delays = [interval_s - rng.uniform(0, interval_s) for _ in range(10_000)]
        rows.append(
            {
                "task_s": duration_s,
                "poll_requests": round(polls, 1),
                "poll_bytes": round(polls * poll_bytes),
                "watch_requests": 1,
                "watch_bytes": watch_bytes,
                "poll_mean_delay_ms": round(statistics.mean(delays) * 1000),
                "watch_delay_ms": round(latency_p50_ms, 2),
                "watch_faster_by": round(statistics.mean(delays) * 1000 / latency_p50_ms),
            }
        )
    return {"poll_response_bytes": poll_bytes, "watch_stream_bytes_20_progress": watch_bytes, "rows": rows}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", default="1,1000,10000")
    parser.add_argument("--broadcast", default="1000")
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--every-s", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=10_000)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    env = {
        "ERRANDS_MAX_WATCHES": "30000",
        "ERRANDS_CONCURRENCY": "10000",
        "ERRANDS_PROGRESS_INTERVAL_S": "0",
        "ERRANDS_LOG_LEVEL": "warning",
    }
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh server for memory: one that already served watchers reuses their freed memory.
        fresh = Server(f"sqlite:///{tmp}/memory.db", "--app", "bench.watch_app:app", env=env)
        try:
            results.append(await memory_and_fanout(fresh, args.idle))
            print(json.dumps(results[-1]), flush=True)
        finally:
            fresh.stop()
        server = Server(f"sqlite:///{tmp}/watch.db", "--app", "bench.watch_app:app", env=env)
        try:
            for n in (int(x) for x in args.watchers.split(",") if x):
                results.append(await latency_run(server, n, args.ticks, args.every_s, "own"))
                print(json.dumps(results[-1]), flush=True)
            for n in (int(x) for x in args.broadcast.split(",") if x):
                results.append(await latency_run(server, n, 10, 0.5, "broadcast"))
                print(json.dumps(results[-1]), flush=True)
            p50 = results[1]["latency_p50_ms"]
            results.append(await polling_versus_watching(server, p50))
            print(json.dumps(results[-1]), flush=True)
        finally:
            server.stop()
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
