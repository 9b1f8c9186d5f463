"""An app for acceptance tests, loaded by the real CLI with ``--app sample_app:app``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from errands import Errands, TaskContext

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
