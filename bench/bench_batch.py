"""Issue 15 benchmark: batch submits (``POST /v1/tasks/batch``) against one submit per call.

    .venv/bin/python -m bench.bench_batch [--stores sqlite,postgres] [--n 20000]

``errands serve --no-workers`` on a fresh database (nothing claims, so only accepting is
measured), one HTTP keep-alive connection from this process: tasks accepted per second with
one call per task, and with batches of 100 and of 1,000 (each a 200 whose every item is a 202),
and the server's CPU time per task (read from Linux's /proc: steadier than the rate on a shared
machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

import httpx
import orjson

from bench.bench_postgres import fresh_database
from bench.common import Server, cpu_s, machine

JSON = {"content-type": "application/json"}


async def accept(server: Server, n: int, batch: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        cpu_before = cpu_s(server.proc.pid)
        start = time.perf_counter()
        if batch == 1:
            for i in range(n):
                r = await client.post("/v1/tasks", json={"type": "noop", "owner": f"u{i % 100}"})
                assert r.status_code == 202, r.text
        else:
            for first in range(0, n, batch):
                items = [
                    {"type": "noop", "owner": f"u{i % 100}"} for i in range(first, min(n, first + batch))
                ]
                # orjson on this side too, as a client sending thousands of tasks would.
                r = await client.post("/v1/tasks/batch", content=orjson.dumps({"tasks": items}), headers=JSON)
                assert r.status_code == 200, r.text
                assert all(x["status"] == 202 for x in orjson.loads(r.content)["results"])
        elapsed = time.perf_counter() - start
        cpu_after = cpu_s(server.proc.pid)
    return {
        "batch": batch,
        "tasks": n,
        "accepted_per_s": round(n / elapsed),
        "server_cpu_us_per_task": round((cpu_after - cpu_before) / n * 1e6, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--n", type=int, default=20_000, help="tasks per batched case")
    parser.add_argument("--single-n", type=int, default=3_000, help="tasks submitted one per call")
    args = parser.parse_args()
    for store in args.stores.split(","):
        if store == "sqlite":
            db = f"sqlite:///{tempfile.mkdtemp(prefix='errands-bench-')}/errands.db"
        else:
            db = await fresh_database("errands_bench")
        server = Server(db, "--no-workers", env={"ERRANDS_MAX_BODY_BYTES": str(4 * 1024 * 1024)})
        try:
            for batch, n in ((1, args.single_n), (100, args.n), (1000, args.n)):
                print(json.dumps({"store": store, **await accept(server, n, batch)}), flush=True)
        finally:
            server.stop()
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    asyncio.run(main())
