"""Credits on both stores: a task's cost is reserved as it is created, charged as it completes,
given back as it ends otherwise, reserved again by a manual retry; each move once, in the
transaction of the change that made it, and the ledger always sums to the balance."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest.mock import ANY

import pytest

from errands import Errands, Fail, TaskContext, model
from errands.clock import ManualClock
from errands.errors import InsufficientCredits, LeaseLost
from errands.model import EventType, Status, TaskError
from errands.store.base import Store
from errands.store.records import ClaimSpec
from tests.integration.conftest import RuntimeFactory, complete_as_seen, http, new_task, wait_task

SPEC = [ClaimSpec("work")]


async def ledger_sums(store: Store, owner: str) -> tuple[int, int]:
    """The sums of the owner's ledger (balance, reserved), read back entry by entry."""
    entries, after = [], 0
    while page := await store.ledger(owner, after=after, limit=100):
        entries.extend(page)
        after = page[-1].id
    return sum(e.amount for e in entries), sum(e.held for e in entries)


async def assert_consistent(store: Store, owner: str, balance: int, reserved: int) -> None:
    got = await store.balance(owner)
    assert (got.balance, got.reserved) == (balance, reserved)
    assert await ledger_sums(store, owner) == (balance, reserved)


async def test_grants_add_and_take_back_but_never_below_zero(store: Store) -> None:
    assert (await store.balance("alice")).balance == 0
    assert (await store.grant("alice", 100, note="welcome")).balance == 100
    assert (await store.grant("alice", -30)).balance == 70
    with pytest.raises(InsufficientCredits):
        await store.grant("alice", -71)
    await assert_consistent(store, "alice", 70, 0)
    [first, second] = await store.ledger("alice", after=0, limit=10)
    assert (first.kind, first.amount, first.balance, first.note) == ("grant", 100, 100, "welcome")
    assert (second.amount, second.balance) == (-30, 70)
    assert [b.owner for b in await store.balances(after="", limit=10)] == ["alice"]


async def test_a_task_reserves_its_cost_and_completing_charges_it(store: Store, clock: ManualClock) -> None:
    await store.grant("alice", 100)
    task, created = await store.create(new_task("t1", cost=30))
    assert created and task.cost == 30
    await assert_consistent(store, "alice", 70, 30)
    again, created_again = await store.create(new_task("t1", cost=30))  # the same request: no new move
    assert not created_again and again == task
    await assert_consistent(store, "alice", 70, 30)
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    token = claimed.lease_token or ""
    await store.apply(
        "t1", lambda r: model.complete(r, now=clock.now(), lease_token=token, result=1), seen=claimed
    )
    await assert_consistent(store, "alice", 70, 0)
    kinds = [(e.kind, e.task_id) for e in await store.ledger("alice", after=0, limit=10)]
    assert kinds == [("grant", None), ("reserve", "t1"), ("charge", "t1")]


async def test_a_task_the_balance_cannot_cover_is_refused_and_leaves_nothing(
    store: Store, clock: ManualClock
) -> None:
    await store.grant("alice", 40)
    with pytest.raises(InsufficientCredits) as refused:
        await store.create(new_task("t1", cost=50))
    assert refused.value.status_code == 402
    assert await store.get("t1") is None and await store.events("t1") == []
    await assert_consistent(store, "alice", 40, 0)
    with pytest.raises(InsufficientCredits):
        await store.create(new_task("t2", owner="nobody", cost=1))  # never granted anything
    # A free task needs no credits at all.
    assert (await store.create(new_task("free", owner="nobody")))[1]


@pytest.mark.parametrize("end", ["failed", "timeout", "cancelled_running", "cancelled_pending", "expired"])
async def test_every_other_end_gives_the_cost_back_once(store: Store, clock: ManualClock, end: str) -> None:
    await store.grant("alice", 100)
    await store.create(new_task("t1", cost=25, max_attempts=1, expires_in_s=50))
    if end not in {"cancelled_pending", "expired"}:
        [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
        token = claimed.lease_token or ""
    decide: Any
    if end in ("failed", "timeout"):
        final = Status.FAILED if end == "failed" else Status.TIMEOUT

        def decide(r: model.TaskRecord) -> Any:
            return model.fail_attempt(
                r, now=clock.now(), lease_token=token, error=TaskError("x", "y"), retry=True,
                retry_delay_s=0, final_status=final,
            )  # fmt: skip
    elif end == "expired":
        clock.advance(60)

        def decide(r: model.TaskRecord) -> Any:
            return model.expire(r, now=clock.now())
    else:

        def decide(r: model.TaskRecord) -> Any:
            return model.cancel(r, now=clock.now())

    ended = await store.apply("t1", decide)
    assert ended.status.terminal and ended.status is not Status.COMPLETED
    await assert_consistent(store, "alice", 100, 0)
    with pytest.raises(Exception):  # noqa: B017 - ended: any second end is refused
        await store.apply("t1", decide)
    await assert_consistent(store, "alice", 100, 0)
    kinds = [e.kind for e in await store.ledger("alice", after=0, limit=10)]
    assert kinds == ["grant", "reserve", "release"]


async def test_an_automatic_retry_keeps_the_reservation_and_a_manual_one_reserves_again(
    store: Store, clock: ManualClock
) -> None:
    await store.grant("alice", 50)
    await store.create(new_task("t1", cost=20, max_attempts=2))
    for _ in range(2):
        [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
        token = claimed.lease_token or ""
        await store.apply(
            "t1",
            lambda r, t=token: model.fail_attempt(
                r, now=clock.now(), lease_token=t, error=TaskError("x", "y"), retry=True, retry_delay_s=0
            ),
        )
        await assert_consistent(store, "alice", 30, 20) if claimed.attempt == 1 else None
    failed = await store.get("t1")
    assert isinstance(failed, model.TaskRecord) and failed.status is Status.FAILED
    await assert_consistent(store, "alice", 50, 0)
    retried = await store.apply("t1", lambda r: model.manual_retry(r, now=clock.now(), max_manual_retries=3))
    assert retried.status is Status.PENDING
    await assert_consistent(store, "alice", 30, 20)
    # With too little left, the retry is refused and the task stays failed.
    await store.create(new_task("t2", cost=20, max_attempts=1))
    [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    while claimed.id != "t2":
        [claimed] = await store.claim(worker_id="w", specs=SPEC, limit=1, lease_s=30)
    token = claimed.lease_token or ""
    await store.apply(
        "t2",
        lambda r: model.fail_attempt(
            r, now=clock.now(), lease_token=token, error=TaskError("x", "y"), retry=False, retry_delay_s=0
        ),
    )
    await store.grant("alice", -30)  # what t2 gave back, and more
    with pytest.raises(InsufficientCredits):
        await store.apply("t2", lambda r: model.manual_retry(r, now=clock.now(), max_manual_retries=3))
    still = await store.get("t2")
    assert isinstance(still, model.TaskRecord) and still.status is Status.FAILED
    await assert_consistent(store, "alice", 0, 20)


async def test_concurrent_submits_never_overdraw_a_balance(store: Store) -> None:
    await store.grant("alice", 100)
    results = await asyncio.gather(
        *(store.create(new_task(f"t{i}", cost=10)) for i in range(30)), return_exceptions=True
    )
    created = [r for r in results if isinstance(r, tuple) and r[1]]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert (len(created), len(refused)) == (10, 20), results
    await assert_consistent(store, "alice", 0, 100)
    events = (await store.read_log(0, limit=1000)).events
    assert sorted(e.task_id for e in events if e.type is EventType.CREATED) == sorted(
        t.id for t, _ in created
    )


async def test_a_batch_reserves_item_by_item(store: Store) -> None:
    await store.grant("alice", 25)
    answers = await store.create_many(
        [
            new_task("a", cost=10),
            new_task("free"),
            new_task("b", cost=10),
            new_task("c", cost=10),
            new_task("d"),
        ]
    )
    assert [type(a).__name__ if not isinstance(a, tuple) else a[1] for a in answers] == [
        True, True, True, "InsufficientCredits", True,
    ]  # fmt: skip
    assert await store.get("c") is None
    await assert_consistent(store, "alice", 5, 20)


async def test_an_outcome_on_a_task_with_a_cost_is_charged_once_whatever_was_seen(
    store: Store, clock: ManualClock
) -> None:
    """A worker's outcome decided on the row as it last wrote it (one statement on PostgreSQL)
    still moves the credits with it, once: a stale row, a lost lease, a repeat."""
    await store.grant("alice", 100)
    for i in range(6):
        await store.create(new_task(f"t{i}", cost=10))
    claimed = await store.claim(worker_id="w", specs=SPEC, limit=6, lease_s=30)
    await store.apply(claimed[0].id, lambda r: model.cancel(r, now=clock.now()))
    outcomes = await complete_as_seen(store, clock, claimed, return_exceptions=True)
    assert isinstance(outcomes[0], LeaseLost) and all(not isinstance(o, Exception) for o in outcomes[1:])
    await assert_consistent(store, "alice", 50, 0)
    kinds = [e.kind for e in await store.ledger("alice", after=0, limit=100)]
    assert kinds.count("charge") == 5 and kinds.count("release") == 1 and kinds.count("reserve") == 6


# -- over HTTP --------------------------------------------------------------------------------

app = Errands()


@app.task("photo", cost=10)
async def photo(ctx: TaskContext, input: dict[str, Any]) -> str:
    if input.get("fail"):
        raise Fail("bad_input", "no")
    return "done"


async def test_credits_over_http(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(app)
    async with http(runtime) as admin:
        r = await admin.post("/v1/credits", json={"owner": "carol", "amount": 25, "note": "trial"})
        assert r.status_code == 200 and r.json()["balance"] == 25, r.text
        ok = await admin.post("/v1/tasks", json={"type": "photo", "id": "p1", "owner": "carol"})
        assert ok.status_code == 202 and ok.json()["cost"] == 10
        bad = await admin.post(
            "/v1/tasks", json={"type": "photo", "id": "p2", "owner": "carol", "input": {"fail": 1}}
        )
        assert bad.status_code == 202
        for task_id in ("p1", "p2"):
            await wait_task(runtime, task_id)
        # One charged, one given back: 15 left, nothing held.
        assert (await admin.get("/v1/credits")).json()["balances"] == [
            {"owner": "carol", "balance": 15, "reserved": 0, "updated_at": ANY}
        ]
        # Two more cost 20: the second is refused, with its reason, and leaves nothing.
        assert (
            await admin.post("/v1/tasks", json={"type": "photo", "id": "p3", "owner": "carol"})
        ).status_code == 202
        refused = await admin.post("/v1/tasks", json={"type": "photo", "id": "p4", "owner": "carol"})
        assert refused.status_code == 402 and refused.json()["error"]["code"] == "insufficient_credits"
        assert (await admin.get("/v1/tasks/p4")).status_code == 404
        # A batch answers item by item; an admin may set a task's own cost.
        batch = await admin.post(
            "/v1/tasks/batch",
            json={
                "tasks": [{"type": "photo", "owner": "carol", "cost": 5}, {"type": "photo", "owner": "carol"}]
            },
        )
        assert [x["status"] for x in batch.json()["results"]] == [202, 402]
        ledger = (await admin.get("/v1/credits/ledger", params={"owner": "carol"})).json()
        assert [e["kind"] for e in ledger["entries"]][:3] == ["grant", "reserve", "reserve"]
        assert sum(e["amount"] for e in ledger["entries"]) == (await runtime.store.balance("carol")).balance
        # Refused requests: an unknown field, a take-back below zero, a fraction, no owner.
        too_dear = await admin.post("/v1/tasks", json={"type": "photo", "owner": "carol", "cost": 10**9 + 1})
        assert too_dear.status_code == 422  # a task costs at most a billion credits
        for body, status in (
            ({"owner": "carol", "amount": 5, "extra": 1}, 422),
            ({"owner": "carol", "amount": -10_000}, 402),
            ({"owner": "carol", "amount": 1.5}, 422),
            ({"owner": "", "amount": 1}, 422),
        ):
            answer = await admin.post("/v1/credits", json=body)
            assert answer.status_code == status, (body, answer.text)
        # Without an owner, an admin reads every owner's ledger.
        everyone = (await admin.get("/v1/credits/ledger")).json()["entries"]
        assert {e["owner"] for e in everyone} == {"carol"} and len(everyone) >= 5
        # An owner token: its own balance and ledger, no grants, no cost of its own choosing.
        token = (await admin.post("/v1/tokens", json={"owner": "carol"})).json()["token"]
    async with http(runtime, token) as carol:
        assert [b["owner"] for b in (await carol.get("/v1/credits")).json()["balances"]] == ["carol"]
        assert (await carol.get("/v1/credits/ledger")).json()["entries"]
        assert (await carol.get("/v1/credits/ledger", params={"owner": "dave"})).status_code == 404
        assert (await carol.post("/v1/credits", json={"owner": "carol", "amount": 100})).status_code == 403
        chosen = await carol.post("/v1/tasks", json={"type": "photo", "cost": 0})
        assert chosen.status_code == 403
