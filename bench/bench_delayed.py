"""Issue 15 benchmark: delayed tasks, on the store with the controlled clock.

    .venv/bin/python -m bench.bench_delayed [--stores sqlite,postgres] [--waiting 10000]

Two measurements per store, on a fresh database:

* **claims beside waiting tasks**: 1,000 ready tasks drained by claims of 10, with and without
  ``--waiting`` tasks delayed by a day in the same table (side by side, same run): waiting tasks
  must cost the queue nothing;
* **a crowd due at once**: ``--waiting`` tasks with the same ``run_at``; the clock is moved to
  that second and 4 claimers (claims of 16, as 4 workers of concurrency 16) start them all: how
  long until every one is claimed, against the same number of tasks queued without a delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

from bench.bench_postgres import fresh_database
from bench.common import machine
from errands.clock import ManualClock
from errands.config import Settings
from errands.model import NewTask
from errands.store import open_store
from errands.store.records import ClaimSpec

SPECS = [ClaimSpec("noop")]


def task(i: int, prefix: str, **fields: Any) -> NewTask:
    return NewTask(
        id=f"{prefix}-{i}", type="noop", owner=f"u{i % 100}", input={}, priority=0, max_attempts=1,
        timeout_s=60.0, expires_in_s=86_400.0 * 3, fingerprint=f"{prefix}-{i}", **fields,
    )  # fmt: skip


async def create(store: Any, tasks: list[NewTask]) -> None:
    for first in range(0, len(tasks), 1000):
        await store.create_many(tasks[first : first + 1000])


async def claim_all(store: Any, n: int, claimers: int, limit: int) -> float:
    """Seconds until ``n`` tasks are claimed by ``claimers`` claiming ``limit`` at a time."""
    taken = 0

    async def claimer(k: int) -> None:
        nonlocal taken
        while taken < n:
            got = await store.claim(worker_id=f"w{k}", specs=SPECS, limit=limit, lease_s=600)
            taken += len(got)
            if not got:
                await asyncio.sleep(0)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(claimer(k) for k in range(claimers))), 600)
    return time.perf_counter() - start


async def fresh(store_kind: str, name: str) -> str:
    if store_kind == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix='errands-bench-')}/errands.db"
    return await fresh_database(name)


async def beside_waiting(store_kind: str, waiting: int) -> dict[str, Any]:
    out: dict[str, Any] = {"store": store_kind, "case": "1,000 ready tasks, claims of 10"}
    for label, n_waiting in (("alone", 0), (f"beside {waiting:,} waiting", waiting)):
        clock = ManualClock()
        store = open_store(Settings(db=await fresh(store_kind, "errands_bench_delayed")), clock)
        await store.open()
        try:
            await create(store, [task(i, "wait", delay_s=86_400.0) for i in range(n_waiting)])
            await create(store, [task(i, "ready") for i in range(1000)])
            seconds = await claim_all(store, 1000, 1, 10)
            out[label] = {"claims_per_s": round(100 / seconds), "tasks_per_s": round(1000 / seconds)}
        finally:
            await store.close()
    return out


async def crowd(store_kind: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"store": store_kind, "case": f"{n:,} tasks, 4 claimers of 16"}
    for label, delayed in (("queued", False), ("due at the same second", True)):
        clock = ManualClock()
        store = open_store(Settings(db=await fresh(store_kind, "errands_bench_delayed")), clock)
        await store.open()
        try:
            due = clock.now() + 3600
            await create(store, [task(i, "t", run_at=due if delayed else None) for i in range(n)])
            if delayed:
                clock.advance(3600)
            seconds = await claim_all(store, n, 4, 16)
            out[label] = {"all_claimed_s": round(seconds, 2), "tasks_per_s": round(n / seconds)}
        finally:
            await store.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--waiting", type=int, default=10_000)
    args = parser.parse_args()
    for store_kind in args.stores.split(","):
        print(json.dumps(await beside_waiting(store_kind, args.waiting)), flush=True)
        print(json.dumps(await crowd(store_kind, args.waiting)), flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    asyncio.run(main())
