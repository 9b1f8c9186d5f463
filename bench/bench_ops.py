"""Issue 16 benchmark: the console's reads with 100,000 tasks in the store, and what scraping
``/metrics`` every second costs the task throughput.

    .venv/bin/python -m bench.bench_ops [--stores sqlite,postgres] [--tasks 100000] [--n 4000]

**Console.** A fresh database gets ``--tasks`` tasks (10 types, 200 owners, a fifth of them
ended by bulk cancels) through the batch API; then, five times each, the requests the console
makes (concurrently, as the page does) are timed from the first to the last answer: its first
render (``/v1/tasks?limit=50`` and the counts by status), a filtered page (type, owner and a
time range: the list and its counts), a search by id prefix and the charts (hour and day).
With ``--browser``, also the time from opening ``/console`` in headless Chromium to its first
row, signed in.

**Metrics.** One ``errands serve`` with its workers runs ``--n`` no-op tasks submitted from one
keep-alive connection, in rounds that alternate without and with a scraper that reads
``/metrics`` every second; each round's tasks per second, and the ratio of the medians. As the
rounds' spread on a shared machine is wider than the cost sought, the cost is also given
directly: the median time of a scrape while tasks run, which is at most the server's time
spent on it (the share of one core that scraping every second takes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from typing import Any

import httpx

from bench.bench_core import RawClient, wait_completed
from bench.bench_postgres import fresh_database
from bench.common import ADMIN_KEY, Server, machine


async def seed(server: Server, n: int) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300) as client:
        for first in range(0, n, 1000):
            items = [
                {"type": "noop", "owner": f"u{i % 200}", "id": f"t{i:07d}-k{i % 10}"}
                for i in range(first, min(n, first + 1000))
            ]
            r = await client.post("/v1/tasks/batch", json={"tasks": items})
            assert r.status_code == 200, r.text
        cursor: str | None = None
        body: dict[str, Any] = {"action": "cancel", "selection": {"owner": "u7"}, "limit": 500}
        for owner in range(0, 200, 5):  # a fifth of the owners' tasks end cancelled
            body["selection"] = {"owner": f"u{owner}"}
            cursor = None
            while True:
                r = await client.post("/v1/tasks/bulk", json={**body, "cursor": cursor})
                cursor = r.json()["next_cursor"]
                if cursor is None:
                    break


async def timed(client: httpx.AsyncClient, calls: list[tuple[str, dict[str, Any]]]) -> float:
    start = time.perf_counter()
    answers = await asyncio.gather(*(client.get(path, params=params) for path, params in calls))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return (time.perf_counter() - start) * 1000


async def console_reads(server: Server) -> dict[str, Any]:
    now = time.time()
    window = {
        "created_after": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600)),
        "created_before": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 60)),
    }
    narrow = {"type": "noop", "owner": "u3", **window}
    cases = {
        "first_render": [("/v1/tasks", {"limit": 50}), ("/v1/tasks/count", {"by": "status"})],
        "filtered_page": [
            ("/v1/tasks", {**narrow, "limit": 50}),
            ("/v1/tasks/count", {**narrow, "by": "status"}),
        ],
        "id_search": [("/v1/tasks", {"id_prefix": "t00420", "limit": 50})],
        "charts_hour": [("/v1/stats/series", {"window": "hour"})],
        "charts_day": [("/v1/stats/series", {"window": "day"})],
    }
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        for name, calls in cases.items():
            runs = [await timed(client, calls) for _ in range(5)]
            out[f"{name}_ms"] = round(statistics.median(runs), 1)
    return out


def browser_first_row(server: Server) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"], headless=True)
        page = browser.new_page()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            page.goto(f"{server.url}/console")
            page.fill("#token", ADMIN_KEY)
            page.click("#sign-in-form button")
            page.wait_for_selector("#tasks tbody tr", timeout=60_000)
            page.wait_for_selector(".count", timeout=60_000)
            runs.append((time.perf_counter() - start) * 1000)
            page.evaluate("sessionStorage.clear()")
        browser.close()
    return round(statistics.median(runs), 1)


def throughput(server: Server, n: int, scrape: bool) -> float:
    stop = threading.Event()
    scrapes = []

    def scraper() -> None:
        with httpx.Client(base_url=server.url, headers=server.headers) as client:
            while not stop.wait(1.0):
                t0 = time.perf_counter()
                assert client.get("/metrics").status_code == 200
                scrapes.append(time.perf_counter() - t0)

    thread = threading.Thread(target=scraper, daemon=True)
    throughput.scrapes = scrapes  # type: ignore[attr-defined]
    if scrape:
        thread.start()
    client = RawClient(server)
    done_before = server.completed()
    start = time.perf_counter()
    try:
        for i in range(n):
            assert client.submit({"type": "noop", "owner": f"user{i % 100}"}) == 202
        wait_completed(server, done_before + n)
    finally:
        elapsed = time.perf_counter() - start
        stop.set()
        client.close()
        if scrape:
            thread.join()
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--n", type=int, default=4_000, help="tasks per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds without and with scraping, each")
    parser.add_argument("--browser", action="store_true")
    parser.add_argument("--skip", default="", help="console or metrics")
    args = parser.parse_args()
    print(json.dumps(machine()), flush=True)
    for store in args.stores.split(","):

        async def database(name: str, store: str = store) -> str:
            if store == "sqlite":
                return f"sqlite:///{tempfile.mkdtemp(prefix='errands-bench-')}/errands.db"
            return await fresh_database(name)

        if "console" not in args.skip:
            server = Server(await database("errands_bench"), "--no-workers")
            try:
                t0 = time.perf_counter()
                await seed(server, args.tasks)
                result = {"store": store, "tasks": args.tasks, "seed_s": round(time.perf_counter() - t0, 1)}
                result |= await console_reads(server)
                if args.browser:
                    result["browser_first_row_ms"] = await asyncio.to_thread(browser_first_row, server)
                print(json.dumps(result), flush=True)
            finally:
                server.stop()
        if "metrics" not in args.skip:
            server = Server(await database("errands_bench_metrics"))
            try:
                throughput(server, 500, scrape=False)  # warm up
                plain, scraped = [], []
                for _ in range(args.rounds):
                    plain.append(throughput(server, args.n, scrape=False))
                    scraped.append(throughput(server, args.n, scrape=True))
                ratio = statistics.median(scraped) / statistics.median(plain)
                scrape_ms = []
                for _ in range(args.rounds):
                    throughput(server, args.n, scrape=True)
                    scrape_ms += [t * 1000 for t in throughput.scrapes]  # type: ignore[attr-defined]
                print(
                    json.dumps(
                        {
                            "store": store,
                            "n": args.n,
                            "tasks_per_s_without": [round(x) for x in plain],
                            "tasks_per_s_scraped_every_1s": [round(x) for x in scraped],
                            "ratio_of_medians": round(ratio, 3),
                            "scrape_ms_median": round(statistics.median(scrape_ms), 2),
                            "scrape_ms_max": round(max(scrape_ms), 2),
                            "core_share_of_scraping_every_1s": f"{statistics.median(scrape_ms) / 10:.2f} %",
                        }
                    ),
                    flush=True,
                )
            finally:
                server.stop()


if __name__ == "__main__":
    asyncio.run(main())
