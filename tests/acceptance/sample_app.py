"""An app for acceptance tests, loaded by the real CLI with ``--app sample_app:app``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from errands import Errands, HookEvent, Limit, TaskContext

app = Errands()


@app.task("hold", max_attempts=3, timeout_s=120)
async def hold(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    """The first attempt waits until the gate file exists; later attempts finish at once."""
    if ctx.attempt == 1:
        await ctx.progress(10, f"held by {os.getpid()}")
        gate = Path(input["gate"])
        # A file is the one signal the test can send to a process it may have SIGSTOPped.
        while not gate.exists():  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@app.task("quick")
async def quick(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    return {"pid": os.getpid()}


@app.task("priced", cost=3, max_attempts=2)
async def priced(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    """Costs 3 credits; fails (every attempt) when asked to, after a short while either way."""
    await asyncio.sleep(input.get("seconds", 0.05))
    if input.get("fail"):
        raise RuntimeError("asked to fail")
    return {"pid": os.getpid()}


@app.task("steps", timeout_s=300)
async def steps(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    """Four steps, each once the test has made its file in input["dir"]: progress that moves."""
    folder = Path(input["dir"])
    for i in range(1, 5):
        while not (folder / f"step-{i}").exists():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await ctx.progress(i * 25, f"step {i} of 4")
        await ctx.stream("log", f"step {i} done\n")
    return {"steps": 4}


@app.task("flaky", max_attempts=1)
async def flaky(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    """Fails until input["ok_file"] exists."""
    if not Path(input["ok_file"]).exists():  # noqa: ASYNC240
        raise RuntimeError("not yet")
    return {"ok": True}


@app.task("chatty")
async def chatty(ctx: TaskContext, input: dict[str, Any]) -> None:
    """Logs a line, as app code does, and has a sync helper log one from its thread."""
    logging.getLogger("sample").info("working on %s", input.get("what"))
    await asyncio.to_thread(logging.getLogger("sample").warning, "a thread says hello")


@app.task("chatty_sync")
def chatty_sync(ctx: TaskContext, input: dict[str, Any]) -> None:
    """A sync handler (run in a thread of its own) that logs."""
    logging.getLogger("sample").info("sync work on %s", input.get("what"))


@app.on("task.completed", types=["quick"])
def remember(event: HookEvent) -> None:
    """Writes each call to $SAMPLE_HOOK_LOG; with $SAMPLE_HOOK_CRASH the first call kills the
    process before the hook could be recorded as done."""
    log = os.environ.get("SAMPLE_HOOK_LOG")
    if not log:
        return
    with Path(log).open("a") as out:
        out.write(f"{event.message_id} {event.attempt} {event.task.id}\n")
    if event.attempt == 1 and os.environ.get("SAMPLE_HOOK_CRASH"):
        os.kill(os.getpid(), signal.SIGKILL)


@app.task("metered", limits=[Limit(concurrency=3), Limit(rate="10/s", per="key")])
def metered(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    """Flow control across processes: at most 3 at once in all, 10 started a second per key.
    Each run appends its start and end (CLOCK_MONOTONIC, one clock for every process of the
    machine) to $SAMPLE_FLOW_LOG. A sync handler: it runs in a thread of its own."""
    log = Path(os.environ["SAMPLE_FLOW_LOG"])
    with log.open("a") as out:
        out.write(f"enter {time.monotonic()} {ctx.task_id}\n")
    time.sleep(float(input.get("work_s", 0.02)))
    with log.open("a") as out:
        out.write(f"exit {time.monotonic()} {ctx.task_id}\n")
    return {"pid": os.getpid()}
