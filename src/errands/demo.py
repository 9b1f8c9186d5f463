"""The built-in demo app, served when ``errands serve`` gets no ``--app``.

Task types:

* ``sleep`` ``{"seconds": 5}`` — runs for a few seconds and reports progress on the way;
* ``echo`` — returns its input;
* ``fail`` ``{"message": "…"}`` — ends ``failed`` with code ``demo_failure``;
* ``flaky`` ``{"failures": 1}`` — raises on its first attempts, then succeeds (shows retries);
* ``noop`` — does nothing (what the benchmarks run);
* ``sync_sleep`` ``{"seconds": 2}`` — a plain function run in a thread;
* ``write`` ``{"words": 60, "every_s": 0.05}`` — streams text word by word on its stream
  ``text``, as a language model writes tokens (watch it, or read ``/v1/tasks/{id}/streams/text``);
* ``fake_ai`` — run by an external provider, ``errands dev-provider``, which reports by signed
  webhook: the whole webhook path, offline. ``errands serve`` starts one in its own process for
  the demo unless ``ERRANDS_DEV_PROVIDER_URL`` points at one.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from errands.app import Errands
from errands.context import Fail, TaskContext
from errands.devprovider import dev_standard_provider

app = Errands()

DEV_PROVIDER_URL = os.environ.get("ERRANDS_DEV_PROVIDER_URL")
dev_provider = dev_standard_provider(DEV_PROVIDER_URL or "http://127.0.0.1:8001")
app.external("fake_ai", provider=dev_provider, timeout_s=300, poll_after_s=5, poll_every_s=2, max_attempts=3)


def use_dev_provider(url: str) -> None:
    """Point ``fake_ai`` at a dev provider running at ``url``."""
    base = url.rstrip("/")
    dev_provider.submit_url = f"{base}/jobs"
    dev_provider.status_url = f"{base}/jobs/{{id}}"
    dev_provider.cancel_url = f"{base}/jobs/{{id}}/cancel"


def _seconds(input: dict[str, Any], default: float) -> float:
    value = input.get("seconds", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        raise Fail("bad_input", "seconds must be a number from 0 to 3600.")
    return float(value)


@app.task("sleep", timeout_s=3700)
async def sleep(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    seconds = _seconds(input, 5)
    steps = max(1, min(20, int(seconds * 4)))
    for step in range(1, steps + 1):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(step * 100 // steps, f"step {step} of {steps}")
    return {"slept_s": seconds}


@app.task("echo")
async def echo(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    return input


@app.task("fail", max_attempts=1)
async def fail(ctx: TaskContext, input: dict[str, Any]) -> None:
    message = input.get("message", "This task always fails.")
    raise Fail("demo_failure", str(message)[:200])


@app.task("flaky", max_attempts=3)
async def flaky(ctx: TaskContext, input: dict[str, Any]) -> dict[str, int]:
    failures = input.get("failures", 1)
    if isinstance(failures, int) and ctx.attempt <= failures:
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@app.task("noop")
async def noop(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


@app.task("sync_sleep", timeout_s=3700)
def sync_sleep(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    seconds = _seconds(input, 2)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ctx.raise_if_cancelled()
        time.sleep(min(0.1, left))
        ctx.progress(100 - int(100 * max(0.0, deadline - time.monotonic()) / max(seconds, 1e-9)))
    return {"slept_s": seconds}


_TEXT = (
    "errands sends what a task makes while it makes it and a reader that loses its connection "
    "comes back to exactly what it missed so the page shows the whole text"
)
_WORDS = _TEXT.split(" ")


@app.task("write", timeout_s=3700)
async def write(ctx: TaskContext, input: dict[str, Any]) -> dict[str, int]:
    words, every_s = input.get("words", 60), input.get("every_s", 0.05)
    if isinstance(words, bool) or not isinstance(words, int) or not 0 <= words <= 100_000:
        raise Fail("bad_input", "words must be an integer from 0 to 100000.")
    if isinstance(every_s, bool) or not isinstance(every_s, int | float) or not 0 <= every_s <= 60:
        raise Fail("bad_input", "every_s must be a number from 0 to 60.")
    for i in range(words):
        await ctx.stream("text", ("" if i == 0 else " ") + _WORDS[i % len(_WORDS)])
        if i % 10 == 9:
            await ctx.progress(100 * (i + 1) // words)
        await asyncio.sleep(every_s)
    return {"words": words}
