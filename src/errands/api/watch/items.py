"""What a watch sends, for both transports (SSE and WebSocket), with gap-free resume.

Both transports stream the same items, built here:

* a watch of one task starts with ``task.snapshot`` (or, when resuming after ``seq``, with every
  later event of the task from the log), then every event as it commits, and ends after a
  terminal one;
* a watch of a set of tasks starts with ``tasks.snapshot`` (the matching unfinished tasks), or
  resumes from the log, or sends ``reset`` and a fresh snapshot when the resume point is older
  than what the log still holds.

Ordering without gaps or duplicates: the watch is registered with the hub *before* anything is
read, and ``until`` is the hub's delivered position at that moment. Everything up to ``until``
is committed and is read from the log; everything after it arrives through the watch. Items
already covered (by the snapshot or the replay) are skipped by ``seq``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from errands.auth import READ, Principal
from errands.clock import iso
from errands.errors import BadRequest, Forbidden
from errands.hub import Watch, WatchClosed, WatchFilter
from errands.inputs import BadValue, parse_seq
from errands.model import Event, EventType, Status, TaskRecord
from errands.model.streams import StreamChoice
from errands.model.task import event_json
from errands.store.records import TaskQuery

if TYPE_CHECKING:
    from errands.runtime import Runtime

SNAPSHOT_LIMIT = 1000
REPLAY_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Item:
    """One thing a watch sends: an event, a snapshot, a reset, an overflow notice or a keep-alive."""

    name: str  # the SSE event name; "" for a keep-alive
    seq: int | None  # the SSE id (resume point); None when the item moves no position
    data: bytes = b""
    event: Event | None = None


KEEPALIVE = Item("", None)


def event_item(event: Event) -> Item:
    return Item(event.type.value, event.seq, event.to_json(), event)


_ALWAYS = ("id", "status", "seq")


class Render:
    """How one watch renders events: as written (the bytes every watcher shares), or compact:
    after a task's first event (or snapshot) on this watch, only the fields that changed, with
    ``id``, ``status`` and ``seq`` (a progress event is then a few dozen bytes, not the task)."""

    def __init__(self, compact: bool) -> None:
        self.compact = compact
        self._known: dict[str, dict[str, object]] = {}

    def remember(self, task: dict[str, object]) -> None:
        if self.compact:
            self._known[str(task["id"])] = task

    def event(self, event: Event) -> Item:
        if not self.compact or event.type is EventType.STREAM:
            return event_item(event)
        task = orjson.loads(event.task_json)
        before = self._known.get(event.task_id)
        if event.status.terminal:
            self._known.pop(event.task_id, None)
        else:
            self._known[event.task_id] = task
        if before is not None:
            task = {k: v for k, v in task.items() if k in _ALWAYS or before.get(k) != v}
        return Item(
            event.type.value, event.seq, event_json(event.seq, event.type, event.at, orjson.dumps(task))
        )


def _snapshot_item(record: TaskRecord) -> Item:
    data = b'{"seq":%d,"type":"task.snapshot","at":"%s","task":%s}' % (
        record.seq,
        (iso(record.updated_at) or "").encode(),
        record.public_json(),
    )
    return Item("task.snapshot", record.seq, data)


def _overflow_item(last: int) -> Item:
    return Item("overflow", last, b'{"type":"overflow","last_id":%d}' % last)


def _owner_key(principal: Principal) -> str | None:
    return None if principal.admin else principal.owner


Batch = list[Item]


async def task_items(
    runtime: Runtime, watch: Watch, task_id: str, after: int | None, *, compact: bool = False
) -> AsyncGenerator[Batch, None]:
    """The items of a watch of one task (see the module docstring), in batches: everything
    ready at once goes out together. Closes ``watch`` at the end."""
    keepalive_s = runtime.settings.watch_keepalive_s
    until = runtime.hub.last_seq
    render = Render(compact)
    try:
        found = await runtime.store.get(task_id)
        if not isinstance(found, TaskRecord):
            return
        if after is None:
            render.remember(found.public())
            yield [_snapshot_item(found)]
            last, done = found.seq, found.status.terminal
        else:
            last, done = after, False
            while True:
                read = await runtime.store.events(
                    task_id, after=last, limit=REPLAY_PAGE, streams=watch.filter.streams
                )
                page = [e for e in read if e.seq <= until]
                if page:
                    wanted = [render.event(e) for e in page if watch.filter.matches(e)]
                    if wanted:
                        yield wanted
                    last, done = page[-1].seq, page[-1].status.terminal
                if len(read) < REPLAY_PAGE:
                    break
            # Nothing newer than the resume point and the task has ended: the stream is complete.
            done = done or (found.status.terminal and found.seq <= last)
        while not done:
            try:
                events = await watch.next(keepalive_s)
            except WatchClosed:
                if watch.overflowed:
                    yield [_overflow_item(last)]
                return
            if not events:
                yield [KEEPALIVE]
                continue
            batch = []
            for event in events:
                if event.seq <= last:
                    continue
                batch.append(render.event(event))
                last = event.seq
                if event.status.terminal:
                    done = True
                    break
            if batch:
                yield batch
    finally:
        watch.close()


async def _snapshot(
    runtime: Runtime, f: WatchFilter, until: int, render: Render
) -> tuple[Item, dict[str, int]]:
    statuses = [f.status] if f.status is not None else [Status.PENDING, Status.PROCESSING]
    tasks: list[TaskRecord] = []
    for status in statuses:
        if status.terminal:
            continue
        query = TaskQuery(owner=f.owner, status=status, type=f.type, limit=SNAPSHOT_LIMIT)
        tasks.extend(await runtime.store.list_tasks(query))
    tasks.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    truncated = len(tasks) > SNAPSHOT_LIMIT
    tasks = tasks[:SNAPSHOT_LIMIT]
    for record in tasks:
        render.remember(record.public())
    data = b'{"seq":%d,"type":"tasks.snapshot","truncated":%s,"tasks":[%s]}' % (
        until,
        b"true" if truncated else b"false",
        b",".join(r.public_json() for r in tasks),
    )
    return Item("tasks.snapshot", until, data), {r.id: r.seq for r in tasks}


async def set_items(
    runtime: Runtime, watch: Watch, after: int | None, *, compact: bool = False
) -> AsyncGenerator[Batch, None]:
    """The items of a watch of a set of tasks (see the module docstring). Closes ``watch``."""
    keepalive_s = runtime.settings.watch_keepalive_s
    render = Render(compact)
    f = watch.filter
    until = runtime.hub.last_seq
    covered: dict[str, int] = {}
    try:
        reset = None
        if after is not None and after < await runtime.store.horizon():
            reset = Item("reset", None, b'{"type":"reset","reason":"the resume point is older than the log"}')
            after = None
        if after is None:
            item, covered = await _snapshot(runtime, f, until, render)
            yield [item] if reset is None else [reset, item]
            last = until
        else:
            last = after
            while last < until:
                page = await runtime.store.owner_events(f.owner, after=last, until=until, limit=REPLAY_PAGE)
                matching = [render.event(e) for e in page if f.matches(e)]
                if matching:
                    yield matching
                if page:
                    last = page[-1].seq
                if len(page) < REPLAY_PAGE:
                    break
            last = max(last, until)
        while True:
            try:
                events = await watch.next(keepalive_s)
            except WatchClosed:
                if watch.overflowed:
                    yield [_overflow_item(last)]
                return
            if not events:
                yield [KEEPALIVE]
                continue
            batch = []
            for event in events:
                if event.seq <= last or event.seq <= covered.get(event.task_id, 0):
                    continue
                batch.append(render.event(event))
                last = event.seq
            if batch:
                yield batch
    finally:
        watch.close()


def resume_point(last_event_id: str | None, after: int | None) -> int | None:
    if last_event_id is not None and last_event_id.strip():
        try:
            return parse_seq(last_event_id, "Last-Event-ID")
        except BadValue as exc:
            raise BadRequest(f"{exc}.") from None
    return after


async def open_task_watch(
    runtime: Runtime, principal: Principal, task_id: str, *, streams: StreamChoice = "none"
) -> Watch:
    """Check the caller may watch the task, then register the watch (before reading anything)."""
    await runtime.service.get(task_id, principal)
    return runtime.hub.watch(WatchFilter(task_id=task_id, streams=streams), key=_owner_key(principal))


def open_set_watch(
    runtime: Runtime,
    principal: Principal,
    *,
    type: str | None,
    status: Status | None,
    owner: str | None,
    streams: StreamChoice = "none",
) -> Watch:
    principal.require(READ)
    principal.require_owner_wide("A token scoped to one task can only watch that task.")
    if principal.admin:
        watch_owner = owner
    elif owner is not None and owner != principal.owner:
        raise Forbidden("Only an admin may watch another owner's tasks.")
    else:
        watch_owner = principal.owner
    f = WatchFilter(owner=watch_owner, type=type, status=status, streams=streams)
    return runtime.hub.watch(f, key=_owner_key(principal))
