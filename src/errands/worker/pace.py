"""When a worker claims: at once, or after a short gap that lets one claim take what came
meanwhile.

A worker claims when work is announced to it (see :mod:`errands.worker.loop`). While work comes
as a stream, each announcement would make each worker claim, mostly for one task or none; so
after a claim that emptied the queue a worker waits out a short gap before the next, as many
times longer as it shares the stream with other workers (:func:`claim_share`).

Work comes as a stream once a claim finds more than one task announced since the last claim
began: tasks arrive faster than the worker claims them one by one. It stops being one when two
claims in a row (that did not fill every free slot) find no more than one: the gap gathered
nothing. A caller that sends one task at a time, each after the last one's result (a chain of
steps, a user waiting for each answer), never makes a stream however fast its round trips are,
and a worker that takes what is announced to it alone claims its tasks at once: the gap would
only be added to every round trip. Workers that share the work always wait: were each to claim
at once at every task, most of their claims would find nothing, and the CPU they took would slow
the callers until nothing came as a stream.

In a stream a worker claims every gap whatever it hears, so after a few claims it may stop
hearing (:attr:`Pace.deaf`): being told of every commit costs each process, and PostgreSQL one
wake-up of that process's session per commit, however many processes there are. Its claims then
tell it whether the stream lasts; once two in a row find nothing, it listens again.

Pure: the times are passed in (monotonic seconds; not an event loop's, which may count whole
milliseconds).
"""

from __future__ import annotations

import math
from collections.abc import Container

from errands.store.base import Work

#: The shortest time between a claim that emptied the queue and the next one, while work comes
#: as a stream, for a worker that takes what is announced; one that shares it with others waits
#: as many times longer (see claim_share), up to _MAX_SHARE times.
CLAIM_GAP_S = 0.004
_MAX_SHARE = 16.0
#: A worker with a share below this takes about all that is announced to it: it is alone.
_ALONE = 1.5
#: How many claims in a row that gathered nothing end a stream (one could be chance).
_DRY_CLAIMS = 2
#: How many claims of a stream it hears before it may do without the announcements (see
#: Pace.deaf): by then its share has moved most of the way to what it sees.
_HEARD_CLAIMS = 4


def mine(work: Work, types: Container[str]) -> int:
    """Of the tasks a commit made claimable, how many a worker of ``types`` could take (those of
    types not told, any): a worker of a quiet type does not count a busy type's stream as work
    others took from it."""
    return sum(n for name, n in work.items() if not name or name in types)


def claim_share(share: float, *, announced: int, claimed: int, free: int) -> float:
    """About how many workers share the work announced to this one, from its last claim: it
    took ``claimed`` of the ``announced`` tasks made claimable since the claim before (with
    ``free`` slots to fill). Each claim moves the estimate halfway to what it saw, between 1
    and :data:`_MAX_SHARE`; a claim that found nothing of what was announced saw twice as many
    sharers as thought; a claim that filled every slot says nothing of the others.

    A worker waits ``share`` times the claim gap between claims: N workers under a steady
    stream of work each claim every N gaps, so that together they claim as often, and in
    batches as large, as one would; alone, or when the stream stops, it claims at once again."""
    if claimed >= free:
        return share
    seen = announced / claimed if claimed else 2 * share if announced else 0.0
    return min(_MAX_SHARE, max(1.0, (share + seen) / 2))


class Pace:
    """One worker's announcements and claims, and the wait they call for before the next claim."""

    def __init__(self) -> None:
        self.share = 1.0  # about how many workers share the work announced (see claim_share)
        self.streaming = False  # whether work comes as a stream (see the module docstring)
        self._announced = 0  # tasks announced since the last claim began
        self._last_claim = -math.inf
        self._dry = 0  # claims in a row, in a stream, that found no more than one task announced
        self._owed = 0  # tasks the last claim took before their announcements arrived
        self._emptied = False  # whether the last claim left slots free (it found the queue empty)
        self._heard = 0  # claims of this stream made while hearing the announcements

    def heard(self, tasks: int) -> None:
        """``tasks`` that this worker could take were announced."""
        late = min(tasks, self._owed)  # announcements of tasks the last claim took already
        self._owed -= late
        self._announced += tasks - late

    def claiming(self, at: float) -> int:
        """A claim begins at ``at``: how many tasks were announced since the last one began."""
        self._last_claim = at
        announced, self._announced, self._owed = self._announced, 0, 0
        return announced

    def claimed(self, *, announced: int, claimed: int, free: int, heard: bool = True) -> None:
        """The claim took ``claimed`` of ``announced`` (see :meth:`claiming`), with ``free`` slots.
        Tasks it took beyond those announced were announced late (a notification can arrive
        after the commit is visible): their announcements, when they come, count for nothing,
        or they would look like work that others took. ``heard=False``: the announcements did
        not reach it (see :attr:`deaf`); the stream lasts while its claims find tasks."""
        self._emptied = claimed < free
        if not heard:
            # What it claimed is all it knows. A claim that found nothing says others took what
            # came: it claims too often for its share. Two in a row end the stream (or others
            # take it all: listening again, it learns its share anew).
            self._announced = self._owed = 0
            self._dry = 0 if claimed else self._dry + 1
            if not claimed:
                self.share = min(_MAX_SHARE, 2 * self.share)
            self.streaming = self._dry < _DRY_CLAIMS
            self._heard = self._heard if self.streaming else 0
            return
        late = max(0, claimed - announced)
        during = min(self._announced, late)  # those that arrived while it claimed
        self._announced -= during
        self._owed = late - during  # those still to come
        self.share = claim_share(self.share, announced=announced, claimed=claimed, free=free)
        if announced > 1:
            self.streaming, self._dry = True, 0
        elif self.streaming and claimed < free:  # a claim that filled every slot gathered plenty
            self._dry += 1
            self.streaming = self._dry < _DRY_CLAIMS
        self._heard = self._heard + 1 if self.streaming else 0

    @property
    def deaf(self) -> bool:
        """Whether it may do without the announcements of work for now: in a stream, it claims
        every gap (times its share) anyway, and what a claim finds tells it whether the stream
        lasts. Every process that hears every create pays for it, mostly in the kernel and in
        PostgreSQL; it hears them again once the stream ends."""
        return self.streaming and self._heard >= _HEARD_CLAIMS

    @property
    def _on_its_own(self) -> bool:
        """Whether this worker takes what is announced to it, and work comes one task at a time."""
        return self.share < _ALONE and not self.streaming

    def alone(self, announced: int) -> bool:
        """Whether a claim of ``announced`` tasks (see :meth:`claiming`) is one task for a worker
        on its own, the queue empty before it (the last claim left slots free): such a claim
        may skip what keeps claimers apart (see ``Store.claim``)."""
        return announced <= 1 and self._emptied and self._on_its_own

    def pause(self, at: float) -> float:
        """How long to wait at ``at``, after a claim that emptied the queue and a wake-up since,
        before claiming again: the rest of the gap, unless alone and not in a stream."""
        if self._on_its_own:
            return 0.0
        return max(0.0, self._last_claim + CLAIM_GAP_S * self.share - at)
