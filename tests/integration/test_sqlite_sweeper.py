"""One sweeper per SQLite file: the processes sharing a file take turns through a file lock that
the system releases when its holder ends, however it ends."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest

from errands.clock import ManualClock
from errands.store.sqlite import SqliteStore

HOLD_AND_WAIT = """
import sys
from errands.store.sqlite.lock import FileLock
print("held" if FileLock(sys.argv[1]).take() else "refused", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The test's folder by its real path, as the store names its lock file."""
    return tmp_path.resolve()


async def opened(path: Path) -> SqliteStore:
    store = SqliteStore(str(path), ManualClock())
    await store.open()
    return store


async def test_one_store_of_a_file_sweeps_and_another_takes_over_when_it_closes(folder: Path) -> None:
    first, second = await opened(folder / "e.db"), await opened(folder / "e.db")
    try:
        assert await first.hold_sweeper_lock()
        assert await first.hold_sweeper_lock()  # it keeps it
        assert not await second.hold_sweeper_lock()
        other_file = await opened(folder / "other.db")
        try:
            assert await other_file.hold_sweeper_lock()  # a lock per file
        finally:
            await other_file.close()
        await first.close()
        assert await second.hold_sweeper_lock()
    finally:
        await second.close()


async def test_a_killed_sweeper_process_leaves_the_lock_to_the_others(folder: Path) -> None:
    store = await opened(folder / "e.db")
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_AND_WAIT, f"{folder / 'e.db'}-sweeper",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        try:
            assert holder.stdout is not None
            assert (await asyncio.wait_for(holder.stdout.readline(), 60)).strip() == b"held"
            assert not await store.hold_sweeper_lock()
        finally:
            holder.kill()  # SIGKILL: no clean-up of its own
            await asyncio.wait_for(holder.wait(), 60)
        assert await store.hold_sweeper_lock()
    finally:
        await store.close()


async def test_a_process_forked_by_the_sweeper_does_not_hold_its_lock(folder: Path) -> None:
    """A handler's own subprocesses (multiprocessing forks) outlive nothing of the lock: once
    the sweeper's store closes, another takes over while the child still runs."""
    first, second = await opened(folder / "e.db"), await opened(folder / "e.db")
    assert await first.hold_sweeper_lock()
    ready_r, ready_w = os.pipe()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say it runs, wait for the parent's word, leave without clean-up
        os.close(write_end)
        os.write(ready_w, b"x")
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"  # the child runs (its fork hooks have run)
        await first.close()
        assert await second.hold_sweeper_lock()  # while the child forked with the lock still runs
    finally:
        os.close(ready_r)
        os.close(write_end)  # the child reads the end of the pipe and leaves
        await asyncio.to_thread(os.waitpid, pid, 0)
        await second.close()


async def test_without_a_lock_file_every_process_sweeps_as_before(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await opened(folder / "e.db")
    try:
        (folder / "e.db-sweeper").symlink_to(folder / "missing" / "lock")  # cannot be made
        with caplog.at_level(logging.WARNING, logger="errands.store"):
            assert await store.hold_sweeper_lock()
            assert await store.hold_sweeper_lock()
        warned = [r.message for r in caplog.records if "cannot be used" in r.message]
        assert len(warned) == 1 and f"{folder / 'e.db'}-sweeper" in warned[0], warned  # once
    finally:
        await store.close()
