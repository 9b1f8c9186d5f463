"""What a PostgreSQL commit tells the other processes, and who listens to what: every commit on
the channel a hub that follows the log listens to; commits with work, stops (and ends) also on
the channels a worker process listens to, with how many tasks they made claimable; a process
never hears its own commits (its hub learns of them right after them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from errands import Errands, TaskContext, model
from errands.auth import SYSTEM
from errands.clock import ManualClock
from errands.config import Settings
from errands.model import Event
from errands.service import SubmitRequest
from errands.store import open_store
from errands.store.base import Hint
from errands.store.postgres import PostgresStore
from errands.store.postgres.notices import CHANNEL, channels, listened
from errands.store.records import ClaimSpec
from tests.integration.conftest import RuntimeFactory, new_task, wait_task

pytestmark = pytest.mark.postgres

app = Errands()


@app.task("plain")
async def plain(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


@app.task("turns", concurrency_per_owner=1)
async def turns(ctx: TaskContext, input: dict[str, Any]) -> None:
    return None


@pytest.fixture
def store_kind() -> str:
    return "postgres"


class Heard:
    """A commit subscriber that remembers the notifications it was told of."""

    def __init__(self, wanted: Hint | None = None) -> None:
        self.wanted = wanted
        self.remote: list[tuple[Hint, int | None, int]] = []  # work: how many of any type
        self.changed = asyncio.Event()
        self.types: list[dict[str, int]] = []

    def committed(self, events: Sequence[Event], after: int | None) -> None:
        pass

    def remote_commit(
        self,
        hint: Hint,
        seq: int | None,
        work: Mapping[str, int],
        events: Sequence[Event] = (),
        after: int | None = None,
    ) -> None:
        self.remote.append((hint, seq, sum(work.values())))
        self.types.append(dict(work))
        self.changed.set()

    async def next(self) -> tuple[Hint, int | None, int]:
        """The next notification after the reconnect's catch-up (``seq`` None)."""
        while True:
            while not self.remote:
                self.changed.clear()
                await asyncio.wait_for(self.changed.wait(), 10)
            notice = self.remote.pop(0)
            if notice[1] is not None:
                return notice


@pytest.fixture
async def nodes(database_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    clock = ManualClock()
    stores = [open_store(Settings(db=database_url), clock) for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        a, b = stores
        assert isinstance(a, PostgresStore) and isinstance(b, PostgresStore)
        yield a, b
    finally:
        for store in stores:
            await store.close()


async def _listening(*stores: PostgresStore) -> None:
    for store in stores:
        await asyncio.wait_for(store.listening.wait(), 10)


def test_a_commit_notifies_the_channels_of_its_hints() -> None:
    assert channels(Hint.NONE) == [CHANNEL]  # a claim: only hubs that follow the log care
    assert channels(Hint.WORK) == [CHANNEL, "errands_hints"]
    assert channels(Hint.ENDED) == [CHANNEL, "errands_ended"]
    assert channels(Hint.ENDED | Hint.STOPPED) == [CHANNEL, "errands_hints", "errands_ended"]
    assert listened(None) == [CHANNEL]
    assert listened(Hint.WORK | Hint.LATER | Hint.STOPPED) == ["errands_hints"]
    assert listened(Hint.ALL) == ["errands_hints", "errands_ended"]


async def test_the_commits_of_another_process_arrive_with_their_work_and_ones_own_never(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    heard_a, heard_b = Heard(), Heard()
    a.subscribe(heard_a)
    b.subscribe(heard_b)
    await _listening(a, b)
    await a.create_many([new_task(f"a{i}") for i in range(5)])
    await a.create(new_task("later", run_at=a.clock.now() + 3600))
    await b.create(new_task("b1"))
    hint, _, work = await heard_b.next()
    assert (hint, work) == (Hint.WORK, 5)
    hint, _, work = await heard_b.next()
    assert (hint, work) == (Hint.LATER, 0)
    hint, _, work = await heard_a.next()
    assert (hint, work) == (Hint.WORK, 1)
    # Notifications arrive in commit order, b's after a's: had a heard its own two, they would
    # have come first.
    assert not heard_a.remote and not heard_b.remote


async def test_a_worker_process_hears_work_and_stops_not_every_claim_and_end(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    node, worker = nodes
    heard = Heard(wanted=Hint.WORK | Hint.LATER | Hint.STOPPED)
    worker.subscribe(heard)
    await _listening(node, worker)
    await node.create(new_task("t1"))
    assert (await heard.next())[0] is Hint.WORK
    [claimed] = await node.claim(worker_id="w", specs=[ClaimSpec("work")], limit=1, lease_s=30)
    token = claimed.lease_token or ""
    await node.apply("t1", lambda r: model.complete(r, now=node.clock.now(), lease_token=token, result=None))
    await node.create(new_task("t2"))
    await node.create(new_task("t3"))
    await node.apply("t3", lambda r: model.cancel(r, now=node.clock.now()))
    # In commit order: the claim's and the end's notifications would have come before these.
    assert [(await heard.next())[0] for _ in range(3)] == [Hint.WORK, Hint.WORK, Hint.ENDED | Hint.STOPPED]
    assert not heard.remote


async def test_a_worker_process_asks_for_ends_only_where_a_limit_counts_them(
    runtime_factory: RuntimeFactory,
) -> None:
    limited = await runtime_factory(app, serves_watches=False)  # "turns" runs one per owner
    assert limited.hub.wanted == Hint.WORK | Hint.LATER | Hint.STOPPED | Hint.ENDED
    unlimited = Errands()
    unlimited.task("plain")(plain)
    other = await runtime_factory(unlimited, serves_watches=False)
    assert other.hub.wanted == Hint.WORK | Hint.LATER | Hint.STOPPED
    serve = await runtime_factory(app, workers=False)
    assert serve.hub.wanted is None  # every commit: it follows the log
    await serve.service.submit(SubmitRequest(type="plain", id="p1"), SYSTEM)
    assert (await wait_task(serve, "p1")).status.value == "completed"


async def test_a_worker_process_does_not_claim_for_work_of_types_it_does_not_run(
    runtime_factory: RuntimeFactory,
) -> None:
    """Each create of another type is announced to it (the same channel), and ignored: only the
    task of its own type, announced after them, makes it claim."""
    own = Errands()  # (no limits: an end elsewhere does not make it claim either)
    own.task("plain")(plain)
    worker = await runtime_factory(own, serves_watches=False, poll_s=3600)
    assert worker.worker is not None
    claims = 0
    claim = worker.worker.store.claim

    async def counted(**kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return await claim(**kwargs)

    worker.worker.store.claim = counted  # type: ignore[method-assign]
    other = Errands()
    other.task("elsewhere")(plain)
    node = await runtime_factory(other, workers=False)
    await asyncio.wait_for(worker.store.listening.wait(), 10)  # type: ignore[attr-defined]
    await node.store.create(new_task("warm", type="plain"))
    assert (await wait_task(node, "warm")).status.value == "completed"
    before = claims  # (the claims at its start and of "warm"; it is idle now)
    for i in range(20):
        await node.service.submit(SubmitRequest(type="elsewhere", id=f"e{i}"), SYSTEM)
    await node.store.create(new_task("mine", type="plain"))
    assert (await wait_task(node, "mine")).status.value == "completed"
    # Notifications arrive in commit order: by its claim, the worker had heard all twenty.
    assert claims - before == 1
