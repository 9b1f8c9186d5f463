"""The app ``bench_watch.py`` serves: a task that reports timestamped progress on request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from errands import Errands, TaskContext

app = Errands()


@app.task("ticker", timeout_s=3600)
async def ticker(ctx: TaskContext, input: dict[str, Any]) -> None:
    """Report ``ticks`` progress events ``every_s`` apart; each message is the report's
    CLOCK_MONOTONIC time in ns (system-wide, so a watcher in another process can subtract it)."""
    await asyncio.sleep(float(input.get("delay_s", 0)))
    ticks = int(input["ticks"])
    for i in range(ticks):
        await ctx.progress(min(99, i), str(time.perf_counter_ns()))
        await asyncio.sleep(float(input["every_s"]))


@app.task("streamer", timeout_s=3600)
async def streamer(ctx: TaskContext, input: dict[str, Any]) -> None:
    """Stream ``chunks`` chunks ``every_s`` apart on ``text``; each chunk is its CLOCK_MONOTONIC
    time in ns and a comma, so a watcher in another process can subtract it."""
    await asyncio.sleep(float(input.get("delay_s", 0)))
    every_s = float(input["every_s"])
    start = time.monotonic()
    for i in range(int(input["chunks"])):
        # Paced against the start, not chunk to chunk: the rate holds even when a sleep overruns.
        await asyncio.sleep(max(0.0, start + i * every_s - time.monotonic()))
        await ctx.stream("text", f"{time.perf_counter_ns()},")
