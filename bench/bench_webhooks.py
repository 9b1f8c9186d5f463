"""Issue 5 benchmark: signed webhooks accepted and applied per second, and webhook-to-watcher latency.

    .venv/bin/python -m bench.bench_webhooks [--tasks 5000] [--connections 16] [--stores sqlite,postgres]

N external tasks are handed off (their job ids known), then each gets two signed webhooks (a
progress report and its end), sent over ``--connections`` keep-alive connections: every webhook is
verified (Standard Webhooks), de-duplicated, applied and logged. Webhook-to-watcher latency is
measured separately at a steady 200 webhooks/s, from sending a webhook to an SSE watcher of the
owner's tasks receiving its event (one process, one clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

import asyncpg
import httpx
import orjson

from bench.common import ADMIN_KEY, Server, machine, pct
from errands import signing
from errands.devprovider import DEV_SECRET

KEY = signing.secret_key(DEV_SECRET)


def webhook(port: int, job: str, report: dict[str, Any], message_id: str) -> bytes:
    body = orjson.dumps({"id": job, **report})
    headers = signing.sign([KEY], message_id, int(time.time()), body)
    lines = ["POST /v1/hooks/bench HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send_all(port: int, requests: list[bytes], connections: int) -> list[int]:
    """Send requests over keep-alive connections, one at a time on each; return the statuses."""
    statuses: list[int] = []
    queue = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in queue:
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                statuses.append(int(status_line.split()[1]))
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


async def handed_off(server: Server, n: int) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
        ids = [(await client.post("/v1/tasks", json={"type": "generate", "owner": "bench"})).json()["id"]
               for _ in range(n)]  # fmt: skip
        while True:
            stats = (await client.get("/v1/stats")).json()["by_status"]
            if stats["processing"] >= n:
                return ids
            await asyncio.sleep(0.2)


async def watcher_latency(server: Server, ids: list[str], rate: float) -> dict[str, Any]:
    """Send one end webhook per task at ``rate``/s; time each until the watcher sees it."""
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, limit=1 << 26
    )  # the snapshot is one line
    writer.write(
        f"GET /v1/watch?owner=bench HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n".encode()
    )

    async def watch() -> None:
        while len(seen) < len(ids):
            line = await reader.readline()
            if line.startswith(b"data: ") and b'"task.completed"' in line[:80]:
                seen[orjson.loads(line[6:])["task"]["id"]] = time.perf_counter()

    watching = asyncio.create_task(watch())
    await asyncio.sleep(0.5)
    sender_reader, sender_writer = await asyncio.open_connection("127.0.0.1", server.port)
    start = time.perf_counter()
    for i, task_id in enumerate(ids):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        request = webhook(
            server.port, f"job-{task_id}", {"status": "succeeded", "output": {"i": i}}, f"lat-{task_id}"
        )
        sent[task_id] = time.perf_counter()
        sender_writer.write(request)
        await sender_reader.readline()
        length = 0
        while (line := await sender_reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await sender_reader.readexactly(length)
    await asyncio.wait_for(watching, 60)
    writer.close()
    sender_writer.close()
    samples = [(seen[t] - sent[t]) * 1000 for t in ids]
    return {
        "rate_per_s": rate,
        "n": len(ids),
        "latency_p50_ms": pct(samples, 50),
        "latency_p99_ms": pct(samples, 99),
    }


async def run(store: str, db: str, tasks: int, connections: int) -> list[dict[str, Any]]:
    env = {"ERRANDS_LOG_LEVEL": "warning", "ERRANDS_CONCURRENCY": "200", "ERRANDS_MAX_PENDING_PER_OWNER": ""}
    env.pop("ERRANDS_MAX_PENDING_PER_OWNER")
    server = Server(db, "--app", "bench.webhook_app:app", env=env)
    try:
        ids = await handed_off(server, tasks + 1000)
        load, latency_ids = ids[:tasks], ids[tasks:]
        requests = []
        for task_id in load:
            job = f"job-{task_id}"
            requests.append(webhook(server.port, job, {"status": "running", "progress": 50}, f"p-{task_id}"))
        for task_id in load:
            job = f"job-{task_id}"
            requests.append(
                webhook(server.port, job, {"status": "succeeded", "output": "done"}, f"e-{task_id}")
            )
        start = time.perf_counter()
        statuses = await send_all(server.port, requests, connections)
        elapsed = time.perf_counter() - start
        assert all(s == 200 for s in statuses), sorted(set(statuses))
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
            completed = (await client.get("/v1/stats")).json()["by_status"]["completed"]
        assert completed == tasks, completed
        throughput = {
            "store": store,
            "webhooks": len(requests),
            "connections": connections,
            "accepted_and_applied_per_s": len(requests) / elapsed,
        }
        latency = {"store": store, **await watcher_latency(server, latency_ids, 200)}
        return [throughput, latency]
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--stores", default="sqlite,postgres")
    args = parser.parse_args()
    for store in args.stores.split(","):
        if store == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                results = await run(store, f"sqlite:///{tmp}/hooks.db", args.tasks, args.connections)
        else:
            conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
            await conn.execute('DROP DATABASE IF EXISTS "errands_bench" WITH (FORCE)')
            await conn.execute('CREATE DATABASE "errands_bench"')
            await conn.close()
            results = await run(
                store, "postgresql://postgres@127.0.0.1:5432/errands_bench", args.tasks, args.connections
            )
        for result in results:
            print(json.dumps(result), flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
