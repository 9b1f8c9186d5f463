"""Waiting with a time limit never loses a cancellation (asyncio.wait_for on Python 3.11 does,
when the cancel comes as what it waits for completes: a stop() then waited forever for a loop
that went on, as a PostgreSQL store's listener once did in CI)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from errands.waits import wait_set, within

SRC = Path(__file__).resolve().parents[2] / "src" / "errands"


async def test_a_cancel_that_comes_as_the_event_is_set_stops_the_loop() -> None:
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await wait_set(event, 5)
            rounds += 1
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop waits
    event.set()
    task.cancel()  # in the same turn: the event and the cancel arrive together
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(30):  # a loop that lost the cancel would still run: TimeoutError
            await task
    assert rounds == 0


async def test_the_helpers_answer_whether_the_wait_ended() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.001) is False
    event.set()
    assert await wait_set(event, 0) is True  # set already: no wait at all
    assert await within(asyncio.sleep(0), 30) is True
    assert await within(asyncio.Event().wait(), 0.001) is False


def test_no_module_waits_with_asyncio_wait_for_in_a_loop() -> None:
    """The class, not the example: every wait of errands' loops goes through errands.waits."""
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"wait_for\([^)]*\.wait\(\)", line) or re.search(r"wait_for\(_either", line)
    ]
    assert offenders == []
