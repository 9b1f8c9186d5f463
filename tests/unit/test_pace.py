"""When a worker claims after work is announced (errands.worker.pace): pure, times given."""

from __future__ import annotations

import pytest

from errands.worker.pace import CLAIM_GAP_S, Pace, mine


def step(pace: Pace, at: float, *, during: int = 0) -> float:
    """A task announced at ``at`` wakes the worker, which waits what ``pace`` says, then claims
    it with ``during`` more announced meanwhile (it takes them all and empties the queue);
    returns the wait."""
    pace.heard(1)
    wait = pace.pause(at)
    pace.heard(during)
    announced = pace.claiming(at + wait)
    pace.claimed(announced=announced, claimed=announced, free=20)
    return wait


def test_one_task_at_a_time_is_claimed_at_once_however_fast_the_round_trips() -> None:
    """A caller that waits for each result before it sends the next task: the gap would only be
    added to every round trip (1 ms in-process on SQLite, 3 ms across processes here)."""
    pace = Pace()
    at = 10.0
    for round_trip in [0.003, 0.001, 0.0005] * 20:
        assert step(pace, at) == 0.0
        at += round_trip
    assert not pace.streaming


def test_a_stream_waits_out_the_gap_so_that_one_claim_takes_several_tasks() -> None:
    pace = Pace()
    assert step(pace, 10.0) == 0.0
    # Two tasks came before the worker could claim the first: work arrives faster than claims.
    step(pace, 10.001, during=1)
    assert pace.streaming
    # Every wake-up now waits for the rest of the gap since the last claim began.
    assert step(pace, 10.002, during=3) == pytest.approx(CLAIM_GAP_S - 0.001)
    assert pace.pause(10.001 + CLAIM_GAP_S + CLAIM_GAP_S) == 0.0  # the gap is over: at once


def test_a_stream_ends_after_two_claims_in_a_row_that_gathered_nothing() -> None:
    pace = Pace()
    step(pace, 10.0, during=3)
    assert pace.streaming
    step(pace, 10.01)  # one dry claim: perhaps chance
    assert pace.streaming
    step(pace, 10.02, during=2)  # the stream goes on
    step(pace, 10.03)
    assert pace.streaming
    step(pace, 10.04)
    assert not pace.streaming
    assert step(pace, 10.0405) == 0.0  # the next task comes after its caller's round trip


def test_workers_that_share_the_work_wait_the_gap_even_for_one_task_at_a_time() -> None:
    """Were every worker to claim at once at each task, all but one would find nothing: the one
    that takes the work claims at once, the others wait their gaps."""
    taker, other = Pace(), Pace()
    at = 10.0
    for _ in range(10):
        assert step(taker, at) == 0.0
        other.heard(1)
        wait = other.pause(at)
        other.claimed(announced=other.claiming(at + wait), claimed=0, free=20)  # the taker had it
        at += 0.003
    assert not other.streaming
    assert other.share == 16.0
    other.claiming(at)
    other.heard(1)
    assert other.pause(at + 0.003) == pytest.approx(CLAIM_GAP_S * 16 - 0.003)


def test_a_claim_that_filled_every_slot_shows_a_stream() -> None:
    pace = Pace()
    pace.heard(100)  # one commit of 100 tasks
    pace.claimed(announced=pace.claiming(10.0), claimed=20, free=20)
    assert pace.streaming


def test_announcements_that_arrive_after_the_claim_took_their_tasks_count_for_nothing() -> None:
    """A notification can arrive after its commit is visible: a claim may take a task before
    its announcement does. Counted later, it would look like a task others took (a share above
    one, and the gap for a worker that is alone) or like a stream."""
    pace = Pace()
    pace.heard(1)
    announced = pace.claiming(10.0)
    pace.heard(1)  # arrives while the claim runs; the claim takes three tasks
    pace.claimed(announced=announced, claimed=3, free=20)
    pace.heard(1)  # ...and the third one's announcement comes after it
    for at in (10.003, 10.006, 10.009):
        assert step(pace, at) == 0.0
    assert pace.share == 1.0
    assert not pace.streaming


def test_claims_that_fill_every_slot_do_not_end_a_stream() -> None:
    pace = Pace()
    step(pace, 10.0, during=3)
    assert pace.streaming
    for i in range(5):  # a backlog drained a slot's worth at a time, nothing new announced
        pace.claimed(announced=pace.claiming(10.01 + i * 0.001), claimed=20, free=20)
    assert pace.streaming


def test_work_of_other_types_is_not_counted() -> None:
    pace = Pace()
    step(pace, 10.0)
    pace.heard(mine({"bulk": 100}, {"fast"}))  # another type's commit of 100 tasks
    assert pace.claiming(10.001) == 0
    pace.claimed(announced=0, claimed=0, free=20)
    assert not pace.streaming
    assert pace.share == 1.0


def test_a_claim_is_alone_only_for_one_task_on_its_own_after_the_queue_ran_dry() -> None:
    """What lets a claim skip what keeps claimers apart (the store's claim ``alone``): one task
    announced, to a worker that takes what is announced to it, outside a stream, after a claim
    that left slots free (the queue held nothing more)."""
    pace = Pace()
    assert not pace.alone(0)  # no claim yet: the queue may hold anything
    step(pace, 10.0)
    assert pace.alone(1) and pace.alone(0)
    assert not pace.alone(2)  # more than one announced: not one at a time
    pace.claimed(announced=1, claimed=20, free=20)  # every slot filled: the queue may hold more
    assert not pace.alone(1)
    step(pace, 10.01)
    assert pace.alone(1)
    step(pace, 10.02, during=2)
    assert pace.streaming and not pace.alone(1)


def test_a_worker_that_shares_the_work_never_claims_alone() -> None:
    pace = Pace()
    step(pace, 10.0)
    for i in range(3):  # each task announced, and taken by another worker
        pace.heard(1)
        pace.claimed(announced=pace.claiming(10.01 + i), claimed=0, free=20)
    assert pace.share >= 1.5
    assert not pace.alone(1)


def test_a_worker_in_a_stream_stops_hearing_after_a_few_claims_until_two_find_nothing() -> None:
    """In a stream it claims every gap whatever it hears: after four claims heard (its share is
    known by then) it may do without the announcements. Deaf, only what its claims find tells
    it that the stream lasts: one that finds nothing means others took what came (it waits
    twice as long from then on); two in a row end it, and it hears again."""
    pace = Pace()
    at = 10.0
    for _ in range(4):
        assert not pace.deaf
        step(pace, at, during=2)
        at += CLAIM_GAP_S
    assert pace.streaming and pace.deaf
    share = pace.share
    for found, times in [(3, 1), (0, 2), (1, 2), (0, 4), (5, 4)]:
        pace.claiming(at)
        pace.claimed(announced=0, claimed=found, free=20, heard=False)
        assert pace.deaf and pace.share == min(16, share * times)
        at += CLAIM_GAP_S
    assert pace.pause(at - CLAIM_GAP_S) == pytest.approx(CLAIM_GAP_S * pace.share)  # since the last
    for _ in range(2):
        pace.claiming(at)
        pace.claimed(announced=0, claimed=0, free=20, heard=False)
        at += CLAIM_GAP_S
    assert not pace.streaming and not pace.deaf
    step(pace, at, during=2)  # a new stream: heard again, four claims before it is deaf
    assert pace.streaming and not pace.deaf


def test_one_task_at_a_time_never_makes_a_worker_deaf() -> None:
    pace = Pace()
    for i in range(50):
        step(pace, 10.0 + i * 0.001)
    assert not pace.deaf
