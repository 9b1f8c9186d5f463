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

from errands.auth import READ, Principal
from errands.clock import iso
from errands.errors import BadRequest, Forbidden
from errands.hub import Watch, WatchClosed, WatchFilter
from errands.inputs import BadValue, parse_seq
from errands.model import Event, Status, TaskRecord
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
    runtime: Runtime, watch: Watch, task_id: str, after: int | None
) -> AsyncGenerator[Batch, None]:
    """The items of a watch of one task (see the module docstring), in batches: everything
    ready at once goes out together. Closes ``watch`` at the end."""
    keepalive_s = runtime.settings.watch_keepalive_s
    until = runtime.hub.last_seq
    try:
        found = await runtime.store.get(task_id)
        if not isinstance(found, TaskRecord):
            return
        if after is None:
            yield [_snapshot_item(found)]
            last, done = found.seq, found.status.terminal
        else:
            last, done = after, False
            while True:
                page = await runtime.store.events(task_id, after=last, limit=REPLAY_PAGE)
                page = [e for e in page if e.seq <= until]
                if page:
                    yield [event_item(e) for e in page]
                    last, done = page[-1].seq, page[-1].status.terminal
                if len(page) < REPLAY_PAGE:
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
                batch.append(event_item(event))
                last = event.seq
                if event.status.terminal:
                    done = True
                    break
            if batch:
                yield batch
    finally:
        watch.close()


async def _snapshot(runtime: Runtime, f: WatchFilter, until: int) -> tuple[Item, dict[str, int]]:
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
    data = b'{"seq":%d,"type":"tasks.snapshot","truncated":%s,"tasks":[%s]}' % (
        until,
        b"true" if truncated else b"false",
        b",".join(r.public_json() for r in tasks),
    )
    return Item("tasks.snapshot", until, data), {r.id: r.seq for r in tasks}


async def set_items(runtime: Runtime, watch: Watch, after: int | None) -> AsyncGenerator[Batch, None]:
    """The items of a watch of a set of tasks (see the module docstring). Closes ``watch``."""
    keepalive_s = runtime.settings.watch_keepalive_s
    f = watch.filter
    until = runtime.hub.last_seq
    covered: dict[str, int] = {}
    try:
        reset = None
        if after is not None and after < await runtime.store.horizon():
            reset = Item("reset", None, b'{"type":"reset","reason":"the resume point is older than the log"}')
            after = None
        if after is None:
            item, covered = await _snapshot(runtime, f, until)
            yield [item] if reset is None else [reset, item]
            last = until
        else:
            last = after
            while last < until:
                page = await runtime.store.owner_events(f.owner, after=last, until=until, limit=REPLAY_PAGE)
                matching = [event_item(e) for e in page if f.matches(e)]
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
                batch.append(event_item(event))
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


async def open_task_watch(runtime: Runtime, principal: Principal, task_id: str) -> Watch:
    """Check the caller may watch the task, then register the watch (before reading anything)."""
    await runtime.service.get(task_id, principal)
    return runtime.hub.watch(WatchFilter(task_id=task_id), key=_owner_key(principal))


def open_set_watch(
    runtime: Runtime, principal: Principal, *, type: str | None, status: Status | None, owner: str | None
) -> Watch:
    principal.require(READ)
    if principal.task_id is not None:
        raise Forbidden("A token scoped to one task can only watch that task.")
    if principal.admin:
        watch_owner = owner
    elif owner is not None and owner != principal.owner:
        raise Forbidden("Only an admin may watch another owner's tasks.")
    else:
        watch_owner = principal.owner
    f = WatchFilter(owner=watch_owner, type=type, status=status)
    return runtime.hub.watch(f, key=_owner_key(principal))
