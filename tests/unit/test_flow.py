"""Flow control's rules, without I/O: rates, limits, the claim's choice, ``waiting_for``."""

from __future__ import annotations

import base64
import random
from typing import Any

import pytest

from errands import Errands, Limit, TaskContext
from errands.errors import ConfigError
from errands.model import Bound, Status, TaskRecord, Usage, choose_claims
from errands.model.flow import BadLimit, parse_rate, split_scope, tally, waiting_for

NOW = 1_800_000_000.0


def task(task_id: str, owner: str = "alice", key: str | None = None, **fields: Any) -> TaskRecord:
    values: dict[str, Any] = {
        "id": task_id, "type": "work", "owner": owner, "status": Status.PENDING, "input": {},
        "priority": 0, "max_attempts": 1, "timeout_s": 60.0, "created_at": NOW, "updated_at": NOW,
        "expires_at": NOW + 3600, "fingerprint": "fp", "run_after": NOW, "queued_at": NOW, "key": key,
    }  # fmt: skip
    values.update(fields)
    return TaskRecord(**values)


def bound(limit: Limit) -> Bound:
    return Bound("type:work", ("work",), limit)


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("10/s", 10, 1.0),
        ("600/min", 600, 60.0),
        ("100/hour", 100, 3600.0),
        ("5/10s", 5, 10.0),
        ("1000/day", 1000, 86400.0),
        ("3/minutes", 3, 60.0),
        ("2 / 30 SECONDS", 2, 30.0),
        ("7/hrs", 7, 3600.0),
    ],
)
def test_rates_parse(text: str, count: int, period: float) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.period_s) == (count, period)


@pytest.mark.parametrize(
    "text", ["", "10", "10/", "/s", "0/s", "10/fortnight", "-1/s", "1/0s", "ten/s", "10/ms", "10/mss", "5/ds"]
)
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(BadLimit):
        parse_rate(text)


def test_limits_are_checked_when_declared() -> None:
    with pytest.raises(BadLimit):
        Limit()
    with pytest.raises(BadLimit):
        Limit(concurrency=0)
    with pytest.raises(BadLimit):
        Limit(concurrency=1, per="team")  # type: ignore[arg-type]
    with pytest.raises(BadLimit):
        Limit(concurrency=2, burst=3)  # a burst without a rate
    assert Limit(rate="100/s").allowed_burst == 10  # a tenth of a second's worth
    assert Limit(rate="600/min").allowed_burst == 1
    assert Limit(rate="10/s", burst=4).allowed_burst == 4


def test_a_registry_refuses_two_limits_counting_the_same_tasks() -> None:
    app = Errands()
    with pytest.raises(ConfigError, match="two limits per key"):
        app.task("a", limits=[Limit(concurrency=1, per="key"), Limit(rate="1/s", per="key")])
    with pytest.raises(ConfigError, match="per owner"):
        app.task("b", concurrency_per_owner=2, limits=[Limit(rate="1/s", per="owner")])
    with pytest.raises(ConfigError):
        app.task("c", limits=[{"concurrency": 1}])  # type: ignore[list-item]


def test_provider_limits_pool_every_type_of_the_provider() -> None:
    from errands.providers.standard import StandardProvider

    app = Errands()
    provider = StandardProvider(
        "vendor",
        submit_url="http://127.0.0.1:1/jobs",
        status_url="http://127.0.0.1:1/jobs/{id}",
        secret="whsec_" + base64.b64encode(b"0123456789abcdef0123").decode(),
    )
    app.limit_provider(provider.name, Limit(concurrency=4), Limit(rate="2/s", per="key"))
    app.external("image", provider=provider, limits=[Limit(concurrency=1, per="owner")])
    app.external("video", provider=provider)

    @app.task("local")
    async def local(ctx: TaskContext, input: Any) -> None:
        return None

    bounds = app.bounds()
    assert [(b.pool, b.types, b.limit.per) for b in bounds["image"]] == [
        ("type:image", ("image",), "owner"),
        (f"provider:{provider.name}", ("image", "video"), "all"),
        (f"provider:{provider.name}", ("image", "video"), "key"),
    ]
    assert [b.pool for b in bounds["video"]] == [f"provider:{provider.name}"] * 2
    assert bounds["local"] == ()


def test_a_claim_never_starts_more_than_a_rate_allows_over_any_window() -> None:
    # Random claims at random times: in every stretch of time the starts stay within
    # burst + rate x length, which is what the documentation promises.
    rng = random.Random(7)
    limit = Limit(rate="20/s", burst=3)
    b = bound(limit)
    usage: dict[str, Usage | None] = {}
    now = NOW
    starts: list[float] = []
    for i in range(400):
        now += rng.uniform(0, 0.2)
        pending = [task(f"t{i}-{j}") for j in range(rng.randint(1, 8))]
        choice = choose_claims(pending, bounds={"work": (b,)}, usage=usage, limit=8, now=now)
        usage = choice.usage
        starts += [now] * len(choice.chosen)
        if len(choice.chosen) < len(pending):
            assert choice.retry_at is not None and choice.retry_at > now
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            assert j - i + 1 <= 3 + 20 * (starts[j] - starts[i]) + 1e-6


def test_concurrency_counts_this_claims_own_starts_and_skips_a_busy_scope() -> None:
    b = bound(Limit(concurrency=2, per="key"))
    tasks = [
        task("a1", key="a"),
        task("a2", key="a"),
        task("a3", key="a"),
        task("b1", key="b"),
        task("c1", key="c"),
    ]
    key_a, key_c = b.scope(tasks[0]), b.scope(tasks[4])
    usage = {key_a: Usage(running=1), key_c: None}
    choice = choose_claims(tasks, bounds={"work": (b,)}, usage=usage, limit=10, now=NOW)
    assert [r.id for r in choice.chosen] == ["a1", "b1"]
    assert choice.blocked == {key_a: "concurrency", key_c: "busy"}
    assert choice.retry_at is not None and choice.retry_at > NOW  # the busy scope: look again soon


def test_tally_counts_running_tasks_into_their_scopes() -> None:
    pool = Bound("provider:p", ("image", "video"), Limit(concurrency=5))
    per_key = Bound("provider:p", ("image", "video"), Limit(concurrency=1, per="key"))
    rows = [
        ("image", "alice", None, 2),
        ("video", "alice", "k1", 1),
        ("video", "bob", "k1", 4),  # bob's k1 is not alice's
        ("other", "alice", None, 7),
    ]
    k1 = per_key.scope(task("x", key="k1", type="image"))
    no_key = per_key.scope(task("x", type="image"))
    usage = tally({"provider:p all ": pool, k1: per_key, no_key: per_key}, rows, {})
    assert usage == {
        "provider:p all ": Usage(7),
        k1: Usage(1),
        no_key: Usage(2),  # no key: counted under its owner
    }


def test_keys_count_within_their_owner_and_apart_from_owner_scopes() -> None:
    """A key given by another owner, or holding the separators, never shares a scope; no key
    means the owner (as a key of the owner's own name does); every scope splits back."""
    by_key = bound(Limit(concurrency=1, per="key"))
    by_owner = bound(Limit(concurrency=1, per="owner"))
    records = [
        task("1", owner="alice"),
        task("2", owner="bob", key="alice"),
        task("3", owner="alice", key="alice"),
        task("4", owner="bob", key="k"),
        task("5", owner="alice", key="k"),
        task("6", owner='a "b" c', key="x y\n"),
    ]
    scopes = [b.scope(r) for r in records for b in (by_key, by_owner)]
    assert len(set(scopes)) == (len(records) - 1) + len({r.owner for r in records})  # 1 and 3 share
    assert by_key.scope(records[0]) == by_key.scope(records[2])
    for r in records:
        assert split_scope(by_key.scope(r)) == ("type:work", "key", r.owner, r.key or r.owner)
        assert split_scope(by_owner.scope(r)) == ("type:work", "owner", r.owner, None)


def test_waiting_for_names_the_first_reason() -> None:
    limits = (bound(Limit(concurrency=1)),)
    full = {"type:work all ": Usage(running=1)}

    def why(record: TaskRecord, usage: dict[str, Usage] = full, held_until: float | None = None) -> object:
        return waiting_for(record, bounds=limits, usage=usage, held_until=held_until, now=NOW)

    assert why(task("t", run_after=NOW + 5)) == "schedule"
    # A task its provider gave back waits for the provider's hold: that is the reason it shows.
    assert why(task("t", run_after=NOW + 5), held_until=NOW + 5) == "provider"
    assert why(task("t", run_after=NOW + 3600), held_until=NOW + 5) == "schedule"  # due long after
    assert why(task("t"), held_until=NOW + 5) == "provider"
    assert why(task("t"), held_until=NOW - 1) == "concurrency"  # a hold that passed
    assert why(task("t")) == "concurrency"
    assert why(task("t"), usage={}) is None
    rated = (bound(Limit(rate="1/min")),)
    later = {"type:work all ": Usage(tat=NOW + 30)}
    assert waiting_for(task("t"), bounds=rated, usage=later, held_until=None, now=NOW) == "rate"
    assert why(task("t", status=Status.PROCESSING)) is None
