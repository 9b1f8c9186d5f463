"""In-process fan-out of committed events.

The hub follows the event log in ``seq`` order and hands every event, exactly once and in order,
to the listeners of this process (workers, notifiers) and to its watches (the live streams of
clients). It is the store's one commit subscriber, and fed only by committed events: the store
reports this process's commits right after they commit, and the hub reads the log itself for
everything else (other processes' commits, or anything it missed), so nobody sees a change that
was rolled back or a gap. It also passes on the announcements of work (a commit that made a task
claimable, here or, where the store can tell, elsewhere), which idle workers act on at once.

A hub of a worker process (no watches, a worker its only listener) whose store tells every
remote commit with its hints (PostgreSQL) follows only the tasks its worker runs
(:meth:`Hub.follow_only`): it reads their events when a commit may have stopped one of them, and
passes the other hints on, so a worker process reads almost nothing of the log however many
there are. Deaf (:meth:`Hub.deafen`: its worker in a stream of work), it is told of no commit
and reads its tasks' events every :data:`DEAF_POLL_S` instead.

A watch has a bounded buffer. Offering an event never blocks: a watch whose consumer cannot keep
up overflows and is closed (its client resumes from the log), so one slow client never slows
the hub or the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from errands.errors import TooManyRequests
from errands.model import Event, EventType, Status
from errands.model.streams import StreamChoice
from errands.store.base import EventLog as Log
from errands.store.base import Hint, Lifecycle, TaskLog, Work, claimable, hints
from errands.waits import wait_set

log = logging.getLogger("errands.hub")
#: The hints a hub whose listeners see every event still passes on: work, and a task that waits
#: (an event read from the log does not carry ``waits``).
_SHARED_HINTS = Hint.WORK | Hint.LATER
#: How often a deaf hub (see Hub.deafen) reads the events of the tasks it follows.
DEAF_POLL_S = 0.2

Listener = Callable[[Event], None]


class _HubStore(Log, Lifecycle, Protocol):
    """What the hub needs of a store: its log, and to subscribe to it."""


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which events a watch wants: one task's, or those of an owner's tasks (``None``: everyone's)."""

    task_id: str | None = None
    owner: str | None = None
    type: str | None = None
    status: Status | None = None
    #: Output streams: ``none`` (no ``task.stream`` events), ``include`` (them and every other
    #: event), ``only`` (them, and the event that ends the task).
    streams: StreamChoice = "none"

    def matches(self, event: Event) -> bool:
        if event.type is EventType.STREAM:
            if self.streams == "none":
                return False
        elif self.streams == "only" and not event.status.terminal:
            return False
        if self.task_id is not None and event.task_id != self.task_id:
            return False
        if self.owner is not None and event.owner != self.owner:
            return False
        if self.type is not None and event.task_type != self.type:
            return False
        return self.status is None or event.status is self.status


class WatchClosed(Exception):
    """The watch ended: the hub is stopping, or the consumer fell behind (``overflowed``)."""


class Watch:
    """One live subscription, fed by the hub, drained by one consumer."""

    __slots__ = ("_buffer", "_hub", "_max_buffer", "_waiter", "closed", "filter", "key", "overflowed")

    def __init__(self, hub: Hub, watch_filter: WatchFilter, key: str | None, max_buffer: int) -> None:
        self._hub = hub
        self.filter = watch_filter
        self.key = key
        self._max_buffer = max_buffer
        self._buffer: deque[Event] = deque()
        # A bare future rather than an asyncio.Event and wait_for: this is paid per watcher per
        # event, and wait_for creates a task on every call.
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.overflowed = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def offer(self, event: Event) -> None:
        if self.closed:
            return
        if len(self._buffer) >= self._max_buffer:
            self.overflowed = True
            self.close()
            return
        self._buffer.append(event)
        self._wake()

    async def next(self, timeout_s: float) -> list[Event]:
        """The events offered since the last call; ``[]`` after ``timeout_s`` without any.

        Raises :class:`WatchClosed` once closed and drained (an overflowed watch is not drained:
        its consumer must resume from the log anyway).
        """
        if not self._buffer and not self.closed:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            timer = loop.call_later(timeout_s, self._wake)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self.overflowed or (self.closed and not self._buffer):
            raise WatchClosed()
        events = list(self._buffer)
        self._buffer.clear()
        return events

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub._forget(self)
            self._wake()


class Hub:
    """Follows the log from the seq it starts at; see the module docstring."""

    def __init__(
        self,
        store: _HubStore,
        *,
        poll_s: float,
        max_watches: int = 20_000,
        max_watches_per_owner: int = 100,
        watch_buffer: int = 1000,
        snapshots: bool = True,
        read_gap_s: float = 0.0,
    ) -> None:
        """``snapshots=False``: a hub of a process without watches (a worker), whose listeners
        only route events; it reads the log without the task snapshots. ``read_gap_s``: the
        shortest time between two reads of the log (under load, one read a few milliseconds
        later takes the commits of all of them)."""
        self._store = store
        self._read_gap_s = read_gap_s
        self._snapshots = snapshots
        self._poll_s = poll_s
        self._listeners: list[Listener] = []
        self._work: list[Callable[[Hint, Work], None]] = []
        self._wants = Hint.NONE  # the hints the on_hints callbacks want
        self._deaf = False  # see deafen
        #: follow_only(): the tasks followed (id → the seq after which their events count),
        #: and the last seq read of each.
        self._only: Callable[[], Mapping[str, int]] | None = None
        self._committed: list[Callable[[Sequence[Event]], None]] = []
        self._seen: dict[str, int] = {}
        #: How many commits may have stopped a task so far (see Worker.run, around a claim).
        self.stops = 0
        self._wake = asyncio.Event()
        self._behind = False
        self.last_seq = 0
        self.started = False
        self.max_watches = max_watches
        self.max_watches_per_owner = max_watches_per_owner
        self.watch_buffer = watch_buffer
        self._stopped = False
        self._by_task: dict[str, set[Watch]] = {}
        self._by_owner: dict[str, set[Watch]] = {}
        self._everything: set[Watch] = set()
        self._per_key: dict[str, int] = {}
        self._count = 0

    @property
    def serves_watches(self) -> bool:
        return self._snapshots

    # -- watches ------------------------------------------------------------------------------

    @property
    def watch_count(self) -> int:
        return self._count

    def watch(self, watch_filter: WatchFilter, *, key: str | None) -> Watch:
        """Start a watch; every event delivered from now on that matches is offered to it.

        ``key`` names whom the watch counts against (an owner); ``None`` for admins. Raises
        :class:`TooManyRequests` beyond the per-owner or per-process limit.
        """
        if not self._snapshots:
            raise RuntimeError("this process's hub reads no snapshots: it cannot serve watches")
        if self._count >= self.max_watches:
            raise TooManyRequests("This server has too many open watches.", code="too_many_watches")
        if key is not None and self._per_key.get(key, 0) >= self.max_watches_per_owner:
            raise TooManyRequests(
                f"This owner already has {self.max_watches_per_owner} open watches, the most allowed.",
                code="too_many_watches",
            )
        watch = Watch(self, watch_filter, key, self.watch_buffer)
        if watch_filter.task_id is not None:
            self._by_task.setdefault(watch_filter.task_id, set()).add(watch)
        elif watch_filter.owner is not None:
            self._by_owner.setdefault(watch_filter.owner, set()).add(watch)
        else:
            self._everything.add(watch)
        if key is not None:
            self._per_key[key] = self._per_key.get(key, 0) + 1
        self._count += 1
        return watch

    def _forget(self, watch: Watch) -> None:
        f = watch.filter
        if f.task_id is not None:
            index, name = self._by_task, f.task_id
        elif f.owner is not None:
            index, name = self._by_owner, f.owner
        else:
            self._everything.discard(watch)
            index, name = {}, ""
        watches = index.get(name)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del index[name]
        if watch.key is not None:
            left = self._per_key.get(watch.key, 1) - 1
            if left:
                self._per_key[watch.key] = left
            else:
                self._per_key.pop(watch.key, None)
        self._count -= 1

    def close_watches(self) -> None:
        """End every watch (the process is stopping)."""
        for watch in [*self._everything, *(w for ws in self._by_owner.values() for w in ws)]:
            watch.close()
        for watches in list(self._by_task.values()):
            for watch in list(watches):
                watch.close()

    def add_listener(self, listener: Listener) -> None:
        """``listener(event)`` is called on the event loop for each event; it must not block."""
        self._listeners.append(listener)

    def on_work(self, callback: Callable[[], None], *, ends: bool = False) -> None:
        """``callback()`` runs when a commit may have made a task claimable (a task created or
        sent back to the queue; with ``ends``, also a task ended), here or, where the store can
        tell, in another process: a worker claims at once instead of waiting for the hub's next
        read of the log."""
        wanted = Hint.WORK | Hint.ENDED if ends else Hint.WORK
        self.on_hints(lambda hint, _work: callback() if hint & wanted else None)

    def on_hints(self, callback: Callable[[Hint, Work], None], *, wants: Hint = Hint.ALL) -> None:
        """``callback(hint, work)`` runs with the hints of each commit that may have made work,
        and how many tasks of each type it made claimable: only ``WORK`` and ``LATER`` where the listeners
        see every event, and every hint with :meth:`follow_only` (where they see only their
        tasks' events; but no other process's while deaf, see :meth:`deafen`). ``wants``: the
        hints that matter to it (with :meth:`follow_only`, the store need not tell the others)."""
        self._work.append(callback)
        self._wants |= wants
        if self._only is not None and self.started:
            self._store.subscribe(self)

    @property
    def wanted(self) -> Hint | None:
        """Every commit while the log is followed; with :meth:`follow_only`, those that may
        stop a followed task, and those the hint callbacks want (none while deaf)."""
        if self._only is None:
            return None
        return Hint.NONE if self._deaf else Hint.STOPPED | self._wants

    @property
    def deaf(self) -> bool:
        """Whether the store tells this process of no commit for now (see :meth:`deafen`)."""
        return self._deaf

    def deafen(self, deaf: bool) -> bool:
        """With :meth:`follow_only`, while ``deaf`` the store tells this process of no commit
        at all (every process told of a commit costs PostgreSQL a wake-up of its session, and
        itself one): the hint callbacks hear nothing, and the followed tasks' events are read
        every :data:`DEAF_POLL_S` instead (a stop reaches them that late at most). Returns
        whether it is deaf (never without :meth:`follow_only`: it follows the log)."""
        deaf = deaf and self._only is not None
        if deaf != self._deaf:
            self._deaf = deaf
            self._wake.set()  # (the next read is sooner while deaf; once not, it catches up)
            if self.started:
                self._store.subscribe(self)
        return deaf

    def follow_only(self, tasks: Callable[[], Mapping[str, int]], *, poll_s: float) -> None:
        """Read only the events of ``tasks()`` (id → the seq after which they count), when the
        store's hints say one may have been stopped, and every ``poll_s`` (see the module
        docstring). Only for a hub without watches, on a store that tells remote commits
        (:class:`TaskLog`)."""
        if self._snapshots or not isinstance(self._store, TaskLog):
            raise RuntimeError("only a worker process's hub on a store that tells commits follows tasks")
        self._only = tasks
        self._poll_s = poll_s
        if self.started:
            self._store.subscribe(self)

    def _announce(self, hint: Hint, work: Work) -> None:
        if not hint:
            return
        for callback in self._work:
            try:
                callback(hint, work)
            except Exception:
                log.exception("a work listener failed")

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def start(self) -> None:
        self._store.subscribe(self)
        self.last_seq = await self._store.last_seq()
        self.started = True

    def wake(self) -> None:
        """Read the log now: another process may have committed events."""
        self._wake.set()

    # -- the store's commits (the hub is its one subscriber) ----------------------------------

    def on_committed(self, callback: Callable[[Sequence[Event]], None]) -> None:
        """``callback(events)`` runs with the events of each of this process's own commits,
        right after it (what this process did, whatever its hub follows: its metrics)."""
        self._committed.append(callback)

    def committed(self, events: Sequence[Event], after: int | None) -> None:
        for callback in self._committed:
            try:
                callback(events)
            except Exception:
                log.exception("a commit listener failed")
        hint = hints((e.type, e.waits) for e in events)
        work = claimable((e.type, e.waits, e.task_type) for e in events)
        if self._only is not None:
            self.remote_commit(hint, None, work)  # read like any other commit: only the followed tasks
            return
        # Fast path: our own commit directly follows what was delivered. Otherwise other commits
        # may sit in between, or may still come: reading the log keeps the order.
        if self._follows(events, after):
            self._deliver(events)
        else:
            self._wake.set()
        # Without follow_only, the listeners see every end in the events themselves; not
        # whether a task waits (the log does not say), so LATER is passed on.
        self._announce(hint & _SHARED_HINTS, work)

    def remote_commit(
        self, hint: Hint, seq: int | None, work: Work, events: Sequence[Event] = (), after: int | None = None
    ) -> None:
        if self._only is None:
            if self._follows(events, after):
                self._deliver(events)  # carried by the notification
            elif seq is None or seq > self.last_seq:
                # A commit at or below the last seq delivered was read already (this process's
                # own, announced after its hub read the log): nothing more to read for it.
                self._wake.set()
            self._announce(hint & _SHARED_HINTS, work)
            return
        if hint & Hint.STOPPED:
            self.stops += 1
            self._wake.set()
        self._announce(hint, work)

    def _follows(self, events: Sequence[Event], after: int | None) -> bool:
        """Whether a commit's ``events`` come right after what was delivered: the store says
        that nothing but them can come after ``after`` (see ``CommitSubscriber.committed``),
        which was delivered, and they were not."""
        return self.started and bool(events) and after is not None and after <= self.last_seq < events[0].seq

    def _deliver(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.seq <= self.last_seq:
                continue
            self.last_seq = event.seq
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("an event listener failed")
            for group in (
                self._by_task.get(event.task_id),
                self._by_owner.get(event.owner),
                self._everything,
            ):
                if group:
                    for watch in list(group):
                        if watch.filter.matches(event):
                            watch.offer(event)

    async def catch_up(self) -> int:
        """Deliver every committed event after :attr:`last_seq` (of the followed tasks, with
        :meth:`follow_only`); return how many there were."""
        if self._only is not None:
            return await self._catch_up_tasks(self._only())
        delivered = 0
        while True:
            read = await self._store.read_log(self.last_seq, limit=1000, snapshots=self._snapshots)
            self._behind = read.behind
            self._deliver(read.events)
            delivered += len(read.events)
            if len(read.events) < 1000:
                return delivered

    async def _catch_up_tasks(self, tasks: Mapping[str, int]) -> int:
        assert isinstance(self._store, TaskLog)
        self._seen = after = {t: max(seq, self._seen.get(t, 0)) for t, seq in tasks.items()}
        if not after:
            self._behind = False
            return 0
        read = await self._store.read_tasks_log(after, limit=1000)
        self._behind = read.behind or len(read.events) >= 1000
        for event in read.events:
            if event.seq > self._seen.get(event.task_id, event.seq):
                self._seen[event.task_id] = event.seq
                for listener in list(self._listeners):
                    try:
                        listener(event)
                    except Exception:
                        log.exception("an event listener failed")
        return len(read.events)

    def stop(self) -> None:
        """Stop following the log (before the store closes) and end every watch."""
        self._stopped = True
        self.close_watches()
        self._wake.set()

    async def run(self) -> None:
        """Follow the log until stopped or cancelled; errors are logged and retried."""
        failures = 0
        loop = asyncio.get_running_loop()
        last_read, gap_s = -1e9, 0.0
        while not self._stopped:
            # Events wait above the safe bound for older transactions: come back for them soon.
            wait_s = 0.005 if self._behind else min(self._poll_s, DEAF_POLL_S) if self._deaf else self._poll_s
            await wait_set(self._wake, wait_s)
            pause = last_read + gap_s - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)  # the commits of the next few ms share this read
            # Cleared just before reading: a commit notified during the read wakes us again.
            self._wake.clear()
            if self._stopped:
                return
            last_read = loop.time()
            try:
                # Under load a read finds several events, and the next one waits out the gap;
                # while commits come one at a time, each is read at once.
                gap_s = self._read_gap_s if await self.catch_up() > 1 else 0.0
                failures = 0
            except Exception:
                if self._stopped:
                    return
                failures += 1
                log.exception("reading the event log failed")
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
