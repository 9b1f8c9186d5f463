"""The state machine and every decision, without I/O."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from errands import model
from errands.errors import Conflict, InvalidTransition, LeaseLost
from errands.model import TERMINAL, TRANSITIONS, EventType, Status, TaskError, TaskRecord

NOW = 1_000.0


def record(status: Status = Status.PENDING, **fields: object) -> TaskRecord:
    base = TaskRecord(
        id="t1",
        type="work",
        owner="alice",
        status=status,
        input={"x": 1},
        priority=0,
        max_attempts=3,
        timeout_s=60.0,
        created_at=NOW - 10,
        updated_at=NOW - 10,
        expires_at=NOW + 3600,
        fingerprint="fp",
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def running(**fields: object) -> TaskRecord:
    defaults: dict[str, object] = {
        "attempt": 1,
        "lease_token": "lease-1",
        "lease_expires_at": NOW + 30,
        "deadline_at": NOW + 60,
        "worker_id": "w1",
        "started_at": NOW - 5,
    }
    defaults.update(fields)
    return record(Status.PROCESSING, **defaults)


EXPECTED_MOVES = {
    (Status.PENDING, Status.PROCESSING),
    (Status.PENDING, Status.CANCELLED),
    (Status.PENDING, Status.TIMEOUT),
    (Status.PROCESSING, Status.PROCESSING),
    (Status.PROCESSING, Status.PENDING),
    (Status.PROCESSING, Status.COMPLETED),
    (Status.PROCESSING, Status.FAILED),
    (Status.PROCESSING, Status.TIMEOUT),
    (Status.PROCESSING, Status.CANCELLED),
    (Status.FAILED, Status.PENDING),
    (Status.TIMEOUT, Status.PENDING),
}


@pytest.mark.parametrize(("current", "new"), list(itertools.product(Status, Status)))
def test_transition_table_allows_exactly_the_documented_moves(current: Status, new: Status) -> None:
    assert model.can_move(current, new) == ((current, new) in EXPECTED_MOVES)


def test_terminal_states_are_final_except_for_manual_retry() -> None:
    assert {s for s in Status if s.terminal} == TERMINAL
    assert TRANSITIONS[Status.COMPLETED] == frozenset()
    assert TRANSITIONS[Status.CANCELLED] == frozenset()


def test_start_attempt_takes_a_lease_and_counts_the_attempt() -> None:
    change = model.start_attempt(record(), now=NOW, worker_id="w9", lease_token="tok", lease_s=30)
    new = change.record
    assert change.event is EventType.PROCESSING
    assert (new.status, new.attempt, new.lease_token, new.worker_id) == (Status.PROCESSING, 1, "tok", "w9")
    assert new.lease_expires_at == NOW + 30
    assert new.deadline_at == NOW + 60
    assert new.started_at == NOW


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.PENDING])
def test_only_pending_tasks_start(status: Status) -> None:
    with pytest.raises(InvalidTransition):
        model.start_attempt(record(status), now=NOW, worker_id="w", lease_token="t", lease_s=30)


def test_a_task_in_backoff_does_not_start_early() -> None:
    with pytest.raises(InvalidTransition):
        model.start_attempt(record(run_after=NOW + 5), now=NOW, worker_id="w", lease_token="t", lease_s=30)


def test_progress_never_goes_backwards_and_needs_the_lease() -> None:
    r = running(progress=40)
    change = model.report_progress(r, now=NOW, lease_token="lease-1", progress=10, message="step")
    assert change is not None
    assert (change.record.progress, change.record.message) == (40, "step")
    assert change.event is EventType.PROGRESS
    assert model.report_progress(r, now=NOW, lease_token="lease-1", progress=40, message=None) is None
    with pytest.raises(LeaseLost):
        model.report_progress(r, now=NOW, lease_token="stale", progress=50, message=None)


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.PROCESSING])
def test_a_worker_cannot_write_to_a_task_it_no_longer_runs(status: Status) -> None:
    r = dataclasses.replace(running(), status=status)
    with pytest.raises(LeaseLost):
        model.complete(r, now=NOW, lease_token="lease-1", result=1)
    with pytest.raises(LeaseLost):
        model.fail_attempt(
            r, now=NOW, lease_token="lease-1", error=TaskError("x", "y"), retry=True, retry_delay_s=1
        )
    with pytest.raises(LeaseLost):
        model.report_progress(r, now=NOW, lease_token="lease-1", progress=1, message=None)


def test_complete_with_a_stale_lease_is_refused() -> None:
    with pytest.raises(LeaseLost):
        model.complete(running(), now=NOW, lease_token="lease-0", result={"late": True})


def test_complete_sets_the_result_and_drops_the_lease() -> None:
    change = model.complete(
        running(progress=30), now=NOW, lease_token="lease-1", result={"ok": 1}, message="done"
    )
    new = change.record
    assert change.event is EventType.COMPLETED
    assert (new.status, new.result, new.progress, new.message) == (Status.COMPLETED, {"ok": 1}, 100, "done")
    assert new.finished_at == NOW
    assert new.lease_token is None and new.deadline_at is None


def test_failed_attempt_retries_while_attempts_remain() -> None:
    error = TaskError("internal_error", "boom")
    change = model.fail_attempt(
        running(), now=NOW, lease_token="lease-1", error=error, retry=True, retry_delay_s=8
    )
    new = change.record
    assert change.event is EventType.RETRYING
    assert (new.status, new.error, new.run_after, new.queued_at) == (Status.PENDING, error, NOW + 8, NOW + 8)
    assert new.lease_token is None and new.finished_at is None


def test_last_attempt_ends_in_the_final_status() -> None:
    error = TaskError("timeout", "too slow")
    change = model.fail_attempt(
        running(attempt=3),
        now=NOW,
        lease_token="lease-1",
        error=error,
        retry=True,
        retry_delay_s=8,
        final_status=Status.TIMEOUT,
    )
    assert change.event is EventType.TIMEOUT
    assert (change.record.status, change.record.finished_at) == (Status.TIMEOUT, NOW)


def test_fail_without_retry_ends_at_once() -> None:
    change = model.fail_attempt(
        running(), now=NOW, lease_token="lease-1", error=TaskError("bad", "no"), retry=False, retry_delay_s=0
    )
    assert change.record.status is Status.FAILED
    assert change.event is EventType.FAILED


def test_release_gives_the_attempt_back() -> None:
    change = model.release(running(attempt=2), now=NOW, lease_token="lease-1")
    assert (change.record.status, change.record.attempt, change.record.run_after) == (Status.PENDING, 1, NOW)
    with pytest.raises(LeaseLost):
        model.release(running(), now=NOW, lease_token="other")


@pytest.mark.parametrize("status", [Status.PENDING, Status.PROCESSING])
def test_cancel_unfinished(status: Status) -> None:
    r = running() if status is Status.PROCESSING else record()
    change = model.cancel(r, now=NOW)
    assert change.record.status is Status.CANCELLED
    assert change.record.lease_token is None
    assert change.event is EventType.CANCELLED


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_cancel_of_an_ended_task_conflicts(status: Status) -> None:
    with pytest.raises(InvalidTransition):
        model.cancel(record(status), now=NOW)


@pytest.mark.parametrize("status", [Status.FAILED, Status.TIMEOUT])
def test_manual_retry_grants_one_more_attempt_up_to_the_limit(status: Status) -> None:
    r = record(status, attempt=3, finished_at=NOW - 1)
    first = model.manual_retry(r, now=NOW, max_manual_retries=2).record
    assert (first.status, first.manual_retries, first.max_attempts, first.finished_at) == (
        Status.PENDING,
        1,
        4,
        None,
    )
    exhausted = record(status, manual_retries=2)
    with pytest.raises(Conflict) as refused:
        model.manual_retry(exhausted, now=NOW, max_manual_retries=2)
    assert refused.value.code == "retry_limit"


@pytest.mark.parametrize("status", [Status.PENDING, Status.PROCESSING, Status.COMPLETED, Status.CANCELLED])
def test_manual_retry_only_after_failure(status: Status) -> None:
    with pytest.raises(InvalidTransition):
        model.manual_retry(record(status), now=NOW, max_manual_retries=2)


def test_expire_only_after_expires_at() -> None:
    with pytest.raises(InvalidTransition):
        model.expire(record(), now=NOW)
    change = model.expire(record(expires_at=NOW - 1), now=NOW)
    assert change.record.status is Status.TIMEOUT
    assert change.record.error == TaskError("expired", "The task did not finish before it expired.")
    with pytest.raises(InvalidTransition):
        model.expire(record(Status.COMPLETED, expires_at=NOW - 1), now=NOW)


def test_backoff_grows_exponentially_within_its_jitter_band_and_is_capped() -> None:
    assert model.backoff_s(1, base_s=1, cap_s=300, jitter=0.0) == 0.5
    assert model.backoff_s(1, base_s=1, cap_s=300, jitter=0.999) < 1.0
    assert model.backoff_s(4, base_s=1, cap_s=300, jitter=0.0) == 4.0
    assert model.backoff_s(30, base_s=1, cap_s=300, jitter=0.999) <= 300


def test_public_task_has_the_documented_fields_in_order() -> None:
    fields = list(running().public())
    assert fields == [
        "id", "type", "owner", "status", "input", "result", "error", "progress", "message", "attempt",
        "max_attempts", "priority", "external_id", "webhook_received", "notification_sent", "created_at",
        "updated_at", "started_at", "finished_at", "expires_at", "scheduled_for", "waiting_for", "start_by",
        "key", "debounce_key", "notify_url", "cost", "seq",
    ]  # fmt: skip
    assert "lease_token" not in fields


def test_a_tasks_cost_is_reserved_charged_or_given_back_at_each_end_and_once() -> None:
    from errands.model.credits import Balance, CreditMove, after_move, credit_move

    free = record()
    assert credit_move(None, free) is None and credit_move(free, model.cancel(free, now=NOW).record) is None
    priced = dataclasses.replace(record(), cost=7)
    assert credit_move(None, priced) == CreditMove("reserve", -7, 7)
    running = dataclasses.replace(priced, status=Status.PROCESSING, lease_token="L")
    assert credit_move(priced, running) is None  # a claim keeps the reservation
    done = model.complete(running, now=NOW, lease_token="L", result=1).record
    assert credit_move(running, done) == CreditMove("charge", 0, -7)
    for end in (
        model.cancel(priced, now=NOW).record,
        model.cancel(running, now=NOW).record,
        model.fail_attempt(
            running, now=NOW, lease_token="L", error=TaskError("x", "y"), retry=False, retry_delay_s=0
        ).record,
    ):
        assert credit_move(running if end.attempt else priced, end) == CreditMove("release", 7, -7)
    retry = model.fail_attempt(
        running, now=NOW, lease_token="L", error=TaskError("x", "y"), retry=True, retry_delay_s=1
    ).record
    assert retry.status is Status.PENDING and credit_move(running, retry) is None  # automatic: kept
    failed = dataclasses.replace(done, status=Status.FAILED)
    assert credit_move(
        failed, model.manual_retry(failed, now=NOW, max_manual_retries=2).record
    ) == CreditMove("reserve", -7, 7)
    assert credit_move(done, done) is None  # an ended task's later changes move nothing
    # A balance never goes below zero.
    assert after_move(Balance("o", 5), CreditMove("reserve", -7, 7), now=NOW) is None
    assert after_move(Balance("o", 7), CreditMove("reserve", -7, 7), now=NOW) == Balance("o", 0, 7, NOW)


def test_a_records_fields_are_read_only_to_the_type_checker(tmp_path: Path) -> None:
    """Records are frozen to mypy (strict, in the test command) and mutable at run time, for
    speed (see ``errands.model.task.record_class``): assigning to a field fails the check."""
    from mypy import api

    code = (
        "from errands.model import Event, NewTask, TaskRecord\n"
        "def f(n: NewTask, r: TaskRecord, e: Event) -> None:\n"
        "    n.id = 'x'\n"
        "    r.status = r.status\n"
        "    e.seq = 1\n"
    )
    (tmp_path / "assigns.py").write_text(code)
    out, _, status = api.run(["--no-error-summary", "--cache-dir=/dev/null", str(tmp_path / "assigns.py")])
    assert status == 1, out
    assert [line.split("  ")[-1] for line in out.splitlines()] == ["[misc]"] * 3, out
    assert 'Property "id" defined in "NewTask" is read-only' in out, out


def test_records_hash_by_their_fields_as_frozen_dataclasses_do() -> None:
    event = model.Event(1, EventType.CREATED, 1.0, "t1", "o", "noop", Status.PENDING, b"{}")
    same = model.Event(1, EventType.CREATED, 1.0, "t1", "o", "noop", Status.PENDING, b"{}")
    assert hash(event) == hash(same) and len({event, same}) == 1
    with pytest.raises(TypeError):  # its input is a dict, as ever
        hash(model.NewTask("t1", "noop", "o", {}, 0, 1, 1.0, 1.0, "f"))
