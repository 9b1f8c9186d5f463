"""The store contract: every store implementation must pass these, on a real database."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import orjson
import pytest

from errands import model
from errands.clock import ManualClock
from errands.errors import IdConflict, InvalidTransition, LeaseLost, NotFound, TooManyRequests
from errands.hub import Hub
from errands.model import Bound, Event, EventType, Limit, Status, TaskError
from errands.store.base import Hint, Store
from errands.store.records import ClaimSpec, TaskQuery, Tombstone
from tests.integration.conftest import complete_as_seen, new_task

SPEC = [ClaimSpec("work")]


async def event_count(store: Store) -> int:
    return len((await store.read_log(0, limit=100_000)).events)


async def test_create_is_idempotent_per_request(store: Store) -> None:
    task, created = await store.create(new_task("t1"))
    assert created and task.status is Status.PENDING and task.seq > 0
    [event] = await store.events("t1")
    assert event.seq == task.seq
    again, created_again = await store.create(new_task("t1"))
    assert not created_again and again == task
    with pytest.raises(IdConflict):
        await store.create(new_task("t1", fingerprint="another request"))
    assert await event_count(store) == 1


async def test_concurrent_duplicate_creates_make_one_task(store: Store) -> None:
    results = await asyncio.gather(*(store.create(new_task("dup")) for _ in range(25)))
    assert sum(created for _, created in results) == 1
    assert len({t.id for t, _ in results}) == 1
    assert await event_count(store) == 1


async def test_a_burst_of_creates_answers_each_as_if_it_were_alone(store: Store, clock: ManualClock) -> None:
    """Creates that arrive together are written together (one statement on PostgreSQL): each
    still gets its own answer, whether its id is new, repeated, in conflict or purged."""
    await store.create(new_task("purged"))
    await store.apply("purged", lambda r: model.cancel(r, now=clock.now()))
    clock.advance(100)
    assert await store.purge(finished_before=clock.now(), tombstones_before=0, limit=10) == 1
    await store.create(new_task("there"))
    news = [new_task(f"n{i}") for i in range(40)]
    burst = [
        *news,
        new_task("n3"),  # the same request twice in the burst
        new_task("n5", fingerprint="another request"),  # the same id, another request
        new_task("there"),  # created before, the same request
        new_task("there", fingerprint="another request"),
        new_task("purged"),
    ]
    results = await asyncio.gather(*(store.create(t) for t in burst), return_exceptions=True)
    by_id: dict[str, list[object]] = {}
    for task, result in zip(burst, results, strict=True):
        by_id.setdefault(task.id, []).append(result)
    for i in range(40):
        outcomes = by_id[f"n{i}"]
        created = [r for r in outcomes if isinstance(r, tuple) and r[1]]
        assert len(created) == 1, (i, outcomes)
    assert [r[1] for r in by_id["n3"] if isinstance(r, tuple)].count(False) == 1
    assert sum(isinstance(r, IdConflict) for r in by_id["n5"]) == 1
    assert [type(r) for r in by_id["there"]].count(tuple) == 1
    assert isinstance(by_id["there"][0], tuple) and by_id["there"][0][1] is False
    assert isinstance(by_id["there"][1], IdConflict)
    assert isinstance(by_id["purged"][0], IdConflict)
    # One created event per task, each with the seq of the task's row.
    log = (await store.read_log(0, limit=10_000)).events
    created_events = [e for e in log if e.type is EventType.CREATED]
    assert sorted(e.task_id for e in created_events) == sorted(["there", *(t.id for t in news)])
    assert len({e.seq for e in log}) == len(log)
    for task in news:
        record = await store.get(task.id)
        assert isinstance(record, model.TaskRecord)
        [event] = await store.events(task.id)
        assert event.seq == record.seq and event.type is EventType.CREATED


async def test_a_batch_of_creates_stores_every_field_of_each(store: Store, clock: ManualClock) -> None:
    """A batch's rows name only the columns some of its tasks set (SQLite): each task reads back
    as created, whether it set a rare field or left it empty, and so do later batches."""
    for rare in ("key", "notify_url", "start_within_s", None):
        extra: dict[str, object] = {
            "key": {"key": "k1"},
            "notify_url": {"notify_url": "https://example.com/hook"},
            "start_within_s": {"start_within_s": 30.0},
            None: {},
        }[rare]
        batch = [new_task(f"{rare}-{i}", **(extra if i == 3 else {})) for i in range(12)]
        answers = await store.create_many(batch)
        for answer in answers:
            assert isinstance(answer, tuple) and answer[1], answer
            assert await store.get(answer[0].id) == answer[0]
        got = await store.get(f"{rare}-3")
        assert isinstance(got, model.TaskRecord)
        assert (got.key, got.notify_url, got.start_by is not None) == (
            "k1" if rare == "key" else None,
            "https://example.com/hook" if rare == "notify_url" else None,
            rare == "start_within_s",
        )


async def test_create_many_answers_each_create_in_one_transaction(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("purged"))
    await store.apply("purged", lambda r: model.cancel(r, now=clock.now()))
    clock.advance(100)
    assert await store.purge(finished_before=clock.now(), tombstones_before=0, limit=10) == 1
    await store.create(new_task("there"))
    before = await event_count(store)
    news = [new_task(f"m{i}") for i in range(20)]
    batch = [
        *news,
        new_task("m3"),
        new_task("m4", fingerprint="other"),
        new_task("there"),
        new_task("purged"),
    ]
    answers = await store.create_many(batch)
    assert [a[1] if isinstance(a, tuple) else type(a).__name__ for a in answers] == [True] * 20 + [
        False, "IdConflict", False, "IdConflict",
    ]  # fmt: skip
    assert await event_count(store) == before + 20
    for task, answer in zip(news, answers, strict=False):
        assert isinstance(answer, tuple)
        [event] = await store.events(task.id)
        assert event.seq == answer[0].seq and event.type is EventType.CREATED
    limited = await store.create_many(
        [new_task(f"l{i}", owner="bob") for i in range(10)], max_pending_per_owner=4
    )
    assert [isinstance(a, tuple) for a in limited] == [True] * 4 + [False] * 6
    assert all(isinstance(a, TooManyRequests) for a in limited[4:])


async def test_every_change_appends_exactly_one_event_in_order(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("t1"))
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=5, lease_s=30)
    token = claimed.lease_token
    assert token
    clock.advance(1)
    await store.apply(
        "t1",
        lambda r: model.report_progress(r, now=clock.now(), lease_token=token, progress=50, message="half"),
    )
    done = await store.apply(
        "t1", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=[1])
    )
    events = await store.events("t1")
    assert [e.type for e in events] == [
        EventType.CREATED,
        EventType.PROCESSING,
        EventType.PROGRESS,
        EventType.COMPLETED,
    ]
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))  # unique and increasing
    assert done.seq == seqs[-1]
    for event in events:
        snapshot = orjson.loads(event.task_json)
        assert snapshot["seq"] == event.seq
        assert snapshot["status"] == event.status.value
    assert orjson.loads(events[-1].task_json)["result"] == [1]
    assert await store.last_seq() >= seqs[-1]


async def test_a_refused_decision_writes_nothing(store: Store) -> None:
    await store.create(new_task("t1"))
    with pytest.raises(InvalidTransition):
        await store.apply("t1", lambda r: model.manual_retry(r, now=0, max_manual_retries=2))
    with pytest.raises(NotFound):
        await store.apply("missing", lambda r: model.cancel(r, now=0))
    assert await event_count(store) == 1
    got = await store.get("t1")
    assert got is not None and not isinstance(got, Tombstone) and got.status is Status.PENDING


async def test_a_stale_lease_cannot_write(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("t1"))
    [first] = await store.claim(worker_id="w1", specs=SPEC, limit=1, lease_s=30)
    clock.advance(60)
    requeue = model.fail_attempt
    await store.apply(
        "t1",
        lambda r: requeue(
            r, now=clock.now(), lease_token=r.lease_token, error=TaskError("worker_lost", "x"),
            retry=True, retry_delay_s=0,
        ),
    )  # fmt: skip
    [second] = await store.claim(worker_id="w2", specs=SPEC, limit=1, lease_s=30)
    assert second.attempt == 2 and second.lease_token != first.lease_token
    before = await event_count(store)
    stale = first.lease_token or ""
    with pytest.raises(LeaseLost):
        await store.apply(
            "t1", lambda r: model.complete(r, now=clock.now(), lease_token=stale, result="late")
        )
    assert await event_count(store) == before
    assert await store.renew({"t1": stale}, 30) == {"t1"}
    assert await store.renew({"t1": second.lease_token or ""}, 30) == set()


async def test_claim_by_priority_then_age(store: Store, clock: ManualClock) -> None:
    for i, priority in enumerate([0, 5, 0, 5]):
        await store.create(new_task(f"t{i}", priority=priority))
        clock.advance(1)
    claimed = await store.claim(worker_id="w", specs=SPEC, limit=3, lease_s=30)
    assert [t.id for t in claimed] == ["t1", "t3", "t0"]
    assert all(t.status is Status.PROCESSING and t.lease_token for t in claimed)
    assert len({t.lease_token for t in claimed}) == 3
    rest = await store.claim(worker_id="w", specs=SPEC, limit=3, lease_s=30)
    assert [t.id for t in rest] == ["t2"]
    assert await store.claim(worker_id="w", specs=SPEC, limit=3, lease_s=30) == []


async def test_claim_only_handled_types_and_ready_tasks(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("other", type="other"))
    await store.create(new_task("t1"))
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    await store.apply(
        "t1",
        lambda r: model.fail_attempt(
            r, now=clock.now(), lease_token=claimed.lease_token, error=TaskError("x", "y"),
            retry=True, retry_delay_s=10,
        ),
    )  # fmt: skip
    assert await store.claim(worker_id="w", specs=SPEC, limit=5, lease_s=30) == []
    assert await store.next_ready_at(["work"], after=clock.now()) == clock.now() + 10
    assert await store.next_ready_at(["other"], after=clock.now()) is None
    clock.advance(10)
    # Due now: a claim takes it (or, held back by concurrency_per_owner, a finish wakes the
    # worker), so it is no reason to wake up again.
    assert await store.next_ready_at(["work"], after=clock.now()) is None
    assert [t.id for t in await store.claim(worker_id="w", specs=SPEC, limit=5, lease_s=30)] == ["t1"]


async def test_claim_respects_concurrency_per_owner(store: Store, clock: ManualClock) -> None:
    for i in range(4):
        await store.create(new_task(f"a{i}", owner="alice"))
        clock.advance(1)
    await store.create(new_task("b0", owner="bob"))
    spec = [ClaimSpec("work", bounds=(Bound("type:work", ("work",), Limit(concurrency=2, per="owner")),))]
    first = await store.claim(worker_id="w", specs=spec, limit=10, lease_s=30)
    assert sorted(t.id for t in first) == ["a0", "a1", "b0"]
    assert await store.claim(worker_id="w", specs=spec, limit=10, lease_s=30) == []
    token = first[0].lease_token
    await store.apply("a0", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=None))
    assert [t.id for t in await store.claim(worker_id="w", specs=spec, limit=10, lease_s=30)] == ["a2"]


async def test_a_change_decided_on_the_row_as_seen_is_written_once(store: Store, clock: ManualClock) -> None:
    """``apply(..., seen=row)``, the row as the caller last wrote it (a worker's outcome): the
    same task and events as without it."""
    await store.create(new_task("t1"))
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    token = claimed.lease_token or ""
    done = await store.apply(
        "t1", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=7), seen=claimed
    )
    assert done.status is Status.COMPLETED and done.result == 7 and done.seq > claimed.seq
    assert [e.type for e in await store.events("t1")] == [
        EventType.CREATED,
        EventType.PROCESSING,
        EventType.COMPLETED,
    ]
    assert await store.get("t1") == done


async def test_a_change_decided_on_an_older_row_is_decided_again_on_the_row_as_it_is(
    store: Store, clock: ManualClock
) -> None:
    """A row that changed since it was seen, even in a column written without a new event (a
    renewed lease), is read again and the change decided on it: a write decided on an older
    read never undoes a later one, and a refused one stays refused."""
    await store.create(new_task("t1"))
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    token = claimed.lease_token or ""
    clock.advance(20)
    assert await store.renew({"t1": token}, 30) == set()  # same seq, a later expiry
    progress = await store.apply(
        "t1",
        lambda r: model.report_progress(r, now=clock.now(), lease_token=token, progress=40, message="half"),
        seen=claimed,
    )
    assert progress.progress == 40 and progress.lease_expires_at == clock.now() + 30
    got = await store.get("t1")
    assert isinstance(got, model.TaskRecord) and got.lease_expires_at == clock.now() + 30
    # Seen before the progress: decided again on the row with it.
    done = await store.apply(
        "t1", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=None), seen=claimed
    )
    assert done.status is Status.COMPLETED and done.progress == 100 and done.message == "half"
    # Cancelled meanwhile (the worker had not heard yet): its outcome is refused as it would be.
    await store.create(new_task("t2"))
    [second] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    await store.apply("t2", lambda r: model.cancel(r, now=clock.now()))
    before = await event_count(store)
    stale = second.lease_token or ""
    with pytest.raises(LeaseLost):
        await store.apply(
            "t2", lambda r: model.complete(r, now=clock.now(), lease_token=stale, result=1), seen=second
        )
    assert await event_count(store) == before
    got = await store.get("t2")
    assert isinstance(got, model.TaskRecord) and got.status is Status.CANCELLED


@pytest.mark.parametrize("tasks", [1, 6])
async def test_a_row_changed_only_in_its_seq_since_seen_is_decided_again(
    store: Store, clock: ManualClock, tasks: int
) -> None:
    """A change that left the lease and the next poll as they were (a progress report within
    the same instant) still makes the row seen an older one: the outcome is decided on the row
    as it is, alone or beside others (PostgreSQL writes one change of one row by a statement of
    its own)."""
    ids = [f"t{i}" for i in range(tasks)]
    for task_id in ids:
        await store.create(new_task(task_id))
    claimed = await store.claim(worker_id="w", specs=SPEC, limit=tasks, lease_s=30)
    assert len(claimed) == tasks
    for r in claimed:
        token = r.lease_token or ""
        reported = await store.apply(
            r.id,
            lambda row, t=token: model.report_progress(
                row, now=clock.now(), lease_token=t, progress=40, message="half"
            ),
        )
        assert reported.lease_expires_at == r.lease_expires_at and reported.seq != r.seq
    done = await complete_as_seen(store, clock, claimed)
    for record in done:
        assert record.status is Status.COMPLETED and record.message == "half"
        assert await store.get(record.id) == record


async def test_outcomes_decided_on_rows_as_seen_land_together_or_each_as_it_must(
    store: Store, clock: ManualClock
) -> None:
    """Many outcomes at once, some on rows that changed since: each task ends as decided on
    its row as it is, with one event each."""
    for i in range(30):
        await store.create(new_task(f"t{i}"))
    claimed = await store.claim(worker_id="w", specs=SPEC, limit=30, lease_s=30)
    assert len(claimed) == 30
    for record in claimed[::3]:
        await store.apply(record.id, lambda r: model.cancel(r, now=clock.now()))
    outcomes = await complete_as_seen(store, clock, claimed, return_exceptions=True)
    lost = {r.id for r, o in zip(claimed, outcomes, strict=True) if isinstance(o, LeaseLost)}
    assert lost == {r.id for r in claimed[::3]}
    for record in claimed:
        got = await store.get(record.id)
        assert isinstance(got, model.TaskRecord)
        assert got.status is (Status.CANCELLED if record.id in lost else Status.COMPLETED)
        kinds = [e.type for e in await store.events(record.id)]
        assert kinds.count(EventType.COMPLETED) == (0 if record.id in lost else 1), kinds


async def test_renew_extends_the_lease(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("t1"))
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    clock.advance(20)
    assert await store.renew({"t1": claimed.lease_token or ""}, 30) == set()
    got = await store.get("t1")
    assert got is not None and not isinstance(got, Tombstone)
    assert got.lease_expires_at == clock.now() + 30
    due = await store.due(now=clock.now() + 29, limit=10)
    assert not due.lease_expired and not due.past_deadline and not due.expired


async def test_due_finds_expired_leases_deadlines_and_expiry(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("lease", timeout_s=1000))
    await store.create(new_task("deadline", timeout_s=5))
    await store.create(new_task("expiring", type="other", expires_in_s=50))
    await store.claim(worker_id="w", specs=SPEC, limit=2, lease_s=30)
    due = await store.due(now=clock.now() + 10, limit=10)
    assert (list(due.lease_expired), list(due.past_deadline), list(due.expired)) == ([], ["deadline"], [])
    due = await store.due(now=clock.now() + 60, limit=10)
    assert sorted(due.lease_expired) == ["deadline", "lease"]
    assert list(due.expired) == ["expiring"]


async def test_list_newest_first_with_cursor_and_filters(store: Store, clock: ManualClock) -> None:
    for i in range(5):
        await store.create(new_task(f"a{i}", owner="alice", type="work" if i % 2 else "other"))
        await store.create(new_task(f"b{i}", owner="bob"))
        clock.advance(1)
    page = await store.list_tasks(TaskQuery(owner="alice", limit=2))
    assert [t.id for t in page] == ["a4", "a3"]
    last = page[-1]
    page2 = await store.list_tasks(TaskQuery(owner="alice", limit=10, before=(last.created_at, last.id)))
    assert [t.id for t in page2] == ["a2", "a1", "a0"]
    typed = await store.list_tasks(TaskQuery(owner="alice", type="work", limit=10))
    assert [t.id for t in typed] == ["a3", "a1"]
    everyone = await store.list_tasks(TaskQuery(owner=None, limit=100))
    assert len(everyone) == 10
    scoped = await store.list_tasks(TaskQuery(owner="alice", task_id="a2", limit=10))
    assert [t.id for t in scoped] == ["a2"]
    pending = await store.list_tasks(TaskQuery(owner="bob", status=Status.PROCESSING, limit=10))
    assert pending == []


async def test_purge_leaves_a_tombstone_and_drops_events(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("old"))
    await store.create(new_task("young"))
    await store.apply("old", lambda r: model.cancel(r, now=clock.now()))
    clock.advance(100)
    await store.apply("young", lambda r: model.cancel(r, now=clock.now()))
    purged = await store.purge(finished_before=clock.now() - 50, tombstones_before=0, limit=100)
    assert purged == 1
    assert isinstance(await store.get("old"), Tombstone)
    assert await store.events("old") == []
    assert len(await store.events("young")) == 2
    with pytest.raises(IdConflict):
        await store.create(new_task("old"))
    clock.advance(10)
    await store.purge(finished_before=0, tombstones_before=clock.now(), limit=100)
    assert await store.get("old") is None


async def test_max_pending_per_owner(store: Store) -> None:
    await store.create(new_task("a1"), max_pending_per_owner=2)
    await store.create(new_task("a2"), max_pending_per_owner=2)
    with pytest.raises(TooManyRequests):
        await store.create(new_task("a3"), max_pending_per_owner=2)
    await store.create(new_task("b1", owner="bob"), max_pending_per_owner=2)
    assert await event_count(store) == 3


async def test_apply_many_applies_each_decision_on_its_own(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("t1"))
    await store.create(new_task("t2"))
    await store.apply("t2", lambda r: model.cancel(r, now=clock.now()))
    outcomes = await store.apply_many(
        [
            ("t1", lambda r: model.cancel(r, now=clock.now())),
            ("t2", lambda r: model.cancel(r, now=clock.now())),
            ("nope", lambda r: model.cancel(r, now=clock.now())),
        ]
    )
    assert outcomes[0].record is not None and outcomes[0].record.status is Status.CANCELLED
    assert isinstance(outcomes[1].error, InvalidTransition)
    assert isinstance(outcomes[2].error, NotFound)
    assert await event_count(store) == 4


class Recorder:
    """A commit subscriber that remembers what it was told."""

    def __init__(self) -> None:
        self.commits: list[list[int]] = []
        self.afters: list[int | None] = []
        self.remote: list[Hint] = []
        self.wanted: Hint | None = None

    def committed(self, events: Sequence[Event], after: int | None) -> None:
        self.commits.append([e.seq for e in events])
        self.afters.append(after)

    def remote_commit(
        self,
        hint: Hint,
        seq: int | None,
        work: Mapping[str, int],
        events: Sequence[Event] = (),
        after: int | None = None,
    ) -> None:
        self.remote.append(hint)


async def test_the_subscriber_sees_each_commit_in_seq_order(store: Store) -> None:
    recorder = Recorder()
    store.subscribe(recorder)
    await asyncio.gather(*(store.create(new_task(f"t{i}")) for i in range(30)))
    seen = [seq for commit in recorder.commits for seq in commit]
    assert len(seen) == 30 and seen == sorted(set(seen))


async def test_a_commit_says_what_precedes_it_when_nothing_else_can(store: Store, clock: ManualClock) -> None:
    """One commit after another, alone: each says the last seq before it is the one before's
    last (a hub that has read up to there may take it at once). PostgreSQL says so only when no
    older transaction runs anywhere on the server, which another database's may: at least once."""
    recorder = Recorder()
    store.subscribe(recorder)
    for i in range(200):
        task, _ = await store.create(new_task(f"t{i}"))
        if i % 2:  # a change of a row, as well as a create
            await store.apply(task.id, lambda r: model.cancel(r, now=clock.now()))
        if sum(a is not None for a in recorder.afters[1:]) >= 10:
            break
    pairs = zip(recorder.commits[:-1], recorder.afters[1:], strict=True)
    told = [(before[-1], after) for before, after in pairs if after is not None]
    assert len(told) >= 10
    assert all(after == last for last, after in told)
    if store.dialect == "sqlite":
        assert None not in recorder.afters


async def _hub(store: Store) -> Hub:
    hub = Hub(store, poll_s=store.log_poll_s)
    await hub.start()
    return hub


async def test_commits_that_make_a_task_claimable_announce_work(store: Store, clock: ManualClock) -> None:
    """A create or a retry wakes the hub's work listeners."""
    hub = await _hub(store)
    heard = asyncio.Event()
    hub.on_work(heard.set)
    await store.create(new_task("t1"))
    await asyncio.wait_for(heard.wait(), 10)
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    heard.clear()
    await store.apply(
        "t1",
        lambda r: model.fail_attempt(
            r, now=clock.now(), lease_token=claimed.lease_token, error=TaskError("x", "y"),
            retry=True, retry_delay_s=0,
        ),
    )  # fmt: skip
    await asyncio.wait_for(heard.wait(), 10)


async def test_claims_and_progress_announce_no_work(store: Store, clock: ManualClock) -> None:
    if store.dialect != "sqlite":
        pytest.skip("PostgreSQL listeners also hear the store's own notifications, at any time; "
                    "test_postgres.py shows which commits are flagged as work, across nodes")  # fmt: skip
    await store.create(new_task("t1"))
    hub = await _hub(store)
    heard: list[int] = []
    hub.on_work(lambda: heard.append(1))
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    token = claimed.lease_token
    await store.apply(
        "t1", lambda r: model.report_progress(r, now=clock.now(), lease_token=token, progress=5, message=None)
    )
    await store.apply("t1", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=1))
    assert heard == []


async def test_meta_setdefault_keeps_the_first_value(store: Store) -> None:
    assert await store.meta_setdefault("k", "one") == "one"
    assert await store.meta_setdefault("k", "two") == "one"


async def test_admin_keys(store: Store) -> None:
    assert await store.admin_key_hashes() == set()
    await store.add_admin_key("h1")
    await store.add_admin_key("h1")
    assert await store.admin_key_hashes() == {"h1"}


async def test_stats_rows(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("t1"))
    await store.create(new_task("t2", type="other"))
    clock.advance(2)
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    clock.advance(3)
    token = claimed.lease_token
    await store.apply("t1", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=None))
    rows = await store.stats(since=0, sample=100)
    assert sorted(rows.counts) == [("completed", "work", 1), ("pending", "other", 1)]
    assert list(rows.waits_s) == [2.0]
    assert list(rows.runs_s) == [3.0]


async def test_migrations_are_idempotent(store: Store) -> None:
    assert await store.migrate() == []


async def test_reopening_keeps_every_task_and_event(store: Store, clock: ManualClock) -> None:
    await store.create(new_task("t1"))
    await store.apply("t1", lambda r: model.cancel(r, now=clock.now()))
    await store.close()
    await store.open()
    got = await store.get("t1")
    assert got is not None and not isinstance(got, Tombstone) and got.status is Status.CANCELLED
    assert [e.type for e in await store.events("t1")] == [EventType.CREATED, EventType.CANCELLED]
    created, _ = await store.create(new_task("t2"))
    assert created.seq > max(e.seq for e in await store.events("t1"))


async def test_reading_the_log_pages_through_it(store: Store) -> None:
    for i in range(7):
        await store.create(new_task(f"t{i}"))
    first = (await store.read_log(0, limit=3)).events
    rest = (await store.read_log(first[-1].seq, limit=100)).events
    seqs = [e.seq for e in first + rest]
    assert len(seqs) == 7 and seqs == sorted(set(seqs))


@pytest.mark.parametrize("step", [1e-7, 0.1 + 0.2, 1 / 3, 12345.000001, 3.5e-12])
async def test_every_written_value_reads_back_exactly(store: Store, clock: ManualClock, step: float) -> None:
    """What a write stores is what a read finds, to the last bit of a float and every character
    of a text, through each way a change is written (a claim, an outcome decided on the row as
    seen, a change decided on the row as it is)."""
    clock.advance(step)
    await store.create(new_task("t1", timeout_s=1 / 7))
    [claimed] = await store.claim(worker_id='w"\\é😀', specs=SPEC, limit=1, lease_s=30 + step)
    clock.advance(step)
    token = claimed.lease_token or ""
    note = 'a "quoted" \\ text\n\twith é, 汉字 and 😀'
    progressed = await store.apply(
        "t1", lambda r: model.report_progress(r, now=clock.now(), lease_token=token, progress=7, message=note)
    )
    running = await store.get("t1")
    assert running == progressed
    assert (running.message, running.worker_id, running.lease_expires_at) == (
        note,
        'w"\\é😀',
        claimed.started_at + 30 + step,  # type: ignore[operator]
    )
    clock.advance(step)
    done = await store.apply(
        "t1",
        lambda r: model.complete(r, now=clock.now(), lease_token=token, result={"x": 1 / 3, "s": note}),
        seen=progressed,
    )
    assert done is not None
    found = await store.get("t1")
    assert found == done
    assert (found.started_at, found.finished_at, found.timeout_s) == (claimed.started_at, clock.now(), 1 / 7)
    assert found.result == {"x": 1 / 3, "s": note}
