"""One sweeper per SQLite file: the processes sharing a file take turns through a file lock that
the system releases when its holder ends, however it ends."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from errands.clock import ManualClock
from errands.store.sqlite import SqliteStore

HOLD_AND_WAIT = """
import sys
from errands.store.sqlite import take_file_lock
fd = take_file_lock(sys.argv[1])
print("held" if fd is not None else "refused", flush=True)
sys.stdin.read()
"""


async def opened(path: Path) -> SqliteStore:
    store = SqliteStore(str(path), ManualClock())
    await store.open()
    return store


async def test_one_store_of_a_file_sweeps_and_another_takes_over_when_it_closes(tmp_path: Path) -> None:
    first, second = await opened(tmp_path / "e.db"), await opened(tmp_path / "e.db")
    try:
        assert await first.hold_sweeper_lock()
        assert await first.hold_sweeper_lock()  # it keeps it
        assert not await second.hold_sweeper_lock()
        other_file = await opened(tmp_path / "other.db")
        try:
            assert await other_file.hold_sweeper_lock()  # a lock per file
        finally:
            await other_file.close()
        await first.close()
        assert await second.hold_sweeper_lock()
    finally:
        await second.close()


async def test_a_killed_sweeper_process_leaves_the_lock_to_the_others(tmp_path: Path) -> None:
    store = await opened(tmp_path / "e.db")
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_AND_WAIT, f"{tmp_path / 'e.db'}-sweeper",
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


async def test_without_a_lock_file_every_process_sweeps_as_before(tmp_path: Path) -> None:
    store = await opened(tmp_path / "e.db")
    try:
        (tmp_path / "e.db-sweeper").mkdir()  # a lock file cannot be opened there
        assert await store.hold_sweeper_lock()
    finally:
        await store.close()
