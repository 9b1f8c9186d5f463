"""Issue 15 benchmark: flow control, on the store, with the real clock.

    .venv/bin/python -m bench.bench_flow [--stores sqlite,postgres] [--backlog 10000] [--seconds 20]

Two measurements per store, each on a fresh database, with 4 claimers (each a store of its
own, as 4 worker processes would be, claiming up to 16 at a time and sleeping until the claim's
``retry_at`` when a limit held tasks back):

* **a rate of 100/s over a backlog**: ``--backlog`` tasks of a type limited to ``rate="100/s"``
  (burst 10), claimed for ``--seconds``: the achieved start rate, the starts in each second
  (lowest and highest), and the most starts in any one-second window (the promise: at most
  100 + 10);
* **what limits cost when they do not bind**: the same backlog claimed and completed (each
  claim's tasks at once, in one transaction) with no limit, with a concurrency limit of the
  whole type, with one per owner (100 owners) and with a rate per key over 100 keys, all too
  high to hold anything back (side by side, same run).
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
from errands.clock import SystemClock
from errands.config import Settings
from errands.model import Bound, Limit, NewTask, complete
from errands.store import open_store
from errands.store.records import ClaimSpec

CLAIMERS = 4
CLAIM = 16


def task(i: int) -> NewTask:
    return NewTask(
        id=f"t-{i}", type="noop", owner=f"u{i % 100}", input={}, priority=0, max_attempts=1,
        timeout_s=60.0, expires_in_s=86_400.0, fingerprint=f"t-{i}",
    )  # fmt: skip


def spec(*limits: Limit) -> list[ClaimSpec]:
    return [ClaimSpec("noop", bounds=tuple(Bound("type:noop", ("noop",), limit) for limit in limits))]


async def fresh(store_kind: str) -> str:
    if store_kind == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix='errands-bench-')}/errands.db"
    return await fresh_database("errands_bench_flow")


async def run(
    store_kind: str, n: int, specs: list[ClaimSpec], seconds: float | None, *, finish: bool = False
) -> list[float]:
    """The start times of the tasks ``CLAIMERS`` claimers started, until all ``n`` were (or
    ``seconds`` passed); with ``finish``, each claimer completes what it claimed at once, as a
    worker would (so that the running tasks stay as few as the claimers' slots)."""
    url = await fresh(store_kind)
    stores = [open_store(Settings(db=url), SystemClock()) for _ in range(CLAIMERS)]
    for store in stores:
        await store.open()
    try:
        for first in range(0, n, 1000):
            await stores[0].create_many([task(i) for i in range(first, min(n, first + 1000))])
        starts: list[float] = []
        end = time.time() + seconds if seconds is not None else None

        async def claimer(store: Any, k: int) -> None:
            while len(starts) < n and (end is None or time.time() < end):
                got = await store.claim(worker_id=f"w{k}", specs=specs, limit=CLAIM, lease_s=600)
                starts.extend(r.started_at for r in got)
                if finish and got:
                    await store.apply_many([(r.id, done(r)) for r in got])
                if len(got) < CLAIM:
                    wait = (got.retry_at - time.time()) if got.retry_at is not None else 0.0
                    await asyncio.sleep(max(0.0, wait))

        await asyncio.wait_for(asyncio.gather(*(claimer(s, k) for k, s in enumerate(stores))), 900)
        return sorted(starts)
    finally:
        for store in stores:
            await store.close()


def done(record: Any) -> Any:
    token = record.lease_token
    return lambda r: complete(r, now=time.time(), lease_token=token, result=None)


def most_in_window(starts: list[float], width: float) -> int:
    most, first = 0, 0
    for last, at in enumerate(starts):
        while at - starts[first] >= width:
            first += 1
        most = max(most, last - first + 1)
    return most


async def rate_case(store_kind: str, backlog: int, seconds: float) -> dict[str, Any]:
    starts = await run(store_kind, backlog, spec(Limit(rate="100/s")), seconds)
    begin = starts[0]
    per_second = [0] * int(seconds)
    for at in starts:
        if int(at - begin) < len(per_second):
            per_second[int(at - begin)] += 1
    steady = per_second[1:-1]  # the first second holds the burst, the last may be cut short
    return {
        "store": store_kind,
        "case": f"rate 100/s (burst 10), backlog {backlog:,}, {CLAIMERS} claimers, {seconds:g} s",
        "started": len(starts),
        "achieved_per_s": round((len(starts) - 10) / (starts[-1] - begin), 1),
        "per_second_min_max": [min(steady), max(steady)],
        "most_in_any_1s_window": most_in_window(starts, 1.0),
        "most_in_any_100ms_window": most_in_window(starts, 0.1),
    }


async def cost_case(store_kind: str, backlog: int) -> dict[str, Any]:
    out: dict[str, Any] = {"store": store_kind, "case": f"drain {backlog:,}, limits that do not bind"}
    for label, specs in (
        ("no limit", spec()),
        ("concurrency 1,000,000 of the type", spec(Limit(concurrency=1_000_000))),
        ("concurrency 1,000 per owner (100 owners)", spec(Limit(concurrency=1000, per="owner"))),
        ("rate 1,000,000/s per key (100 keys)", spec(Limit(rate="1000000/s", per="key"))),
    ):
        start = time.perf_counter()
        starts = await run(store_kind, backlog, specs, None, finish=True)
        out[label] = round(len(starts) / (time.perf_counter() - start))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    for store_kind in args.stores.split(","):
        print(json.dumps(await rate_case(store_kind, args.backlog, args.seconds)), flush=True)
        print(json.dumps(await cost_case(store_kind, args.backlog)), flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    asyncio.run(main())
