"""A worker's view of providers' holds (errands.worker.holds): read from the store when told
to, when a hold it knows of ends, and, asked for a most age (a deaf worker process, which hears
of no hold stored elsewhere), once what it read is that old."""

from __future__ import annotations

from errands.store import Store
from errands.worker.holds import Holds


async def test_holds_are_read_again_once_older_than_asked_and_otherwise_kept(store: Store) -> None:
    holds = Holds(store, {"picture": "painter"})
    now = store.clock.now()
    assert await holds.held_types(now) == set()  # (read: stale at first)
    await store.hold("painter", now + 60)  # as another node would, after the provider's 429
    assert await holds.held_types(now + 0.1) == set()  # nothing said it changed: kept
    assert await holds.held_types(now + 0.1, max_age_s=0.2) == set()  # read 0.1 s ago
    assert await holds.held_types(now + 0.3, max_age_s=0.2) == {"picture"}
    assert await holds.held_types(now + 59) == {"picture"}
    assert await holds.held_types(now + 61) == set()  # it ended: read again, and gone
