"""Tasks: create, read, change, claim and lease; and the sweeper's queries."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from errands.errors import ErrandsError, IdConflict, InsufficientCredits, InvalidTransition, TooManyRequests
from errands.model import (
    Bound,
    Change,
    NewTask,
    Status,
    TaskRecord,
    Usage,
    choose_claims,
    claim_window,
    create,
    debounce,
    start_attempt,
)
from errands.model.credits import credit_move
from errands.model.flow import exclusions, tally
from errands.model.usage import rollup
from errands.store.base import Decision
from errands.store.columns import to_record
from errands.store.records import (
    Claimed,
    ClaimSpec,
    DueTasks,
    Outcome,
    SeriesRows,
    StatsRows,
    TaskQuery,
    Tombstone,
)
from errands.store.shared import Dialect, Tx, as_errands_error
from errands.store.statements import Statements

#: How many times one claim reads the queue: again past the scopes that held the last look's
#: tasks back, so that one busy key cannot keep a claim from the tasks of the others.
_LOOKS = 8


def start_claimed(record: TaskRecord, *, now: float, worker_id: str, lease_s: float) -> Change:
    """A claimed task's new attempt, with its lease and callback nonce."""
    return start_attempt(
        record,
        now=now,
        worker_id=worker_id,
        lease_token=lease_token(),
        lease_s=lease_s,
        callback_nonce=secrets.token_urlsafe(12),
    )


def lease_token() -> str:
    return secrets.token_hex(12)


async def read_usage(
    fetch: Callable[..., Awaitable[list[Any]]],
    sql: Statements,
    scopes: Mapping[str, Bound],
    own: Sequence[tuple[str, str, str | None, int]] = (),
) -> dict[str, Usage]:
    """The scopes' usage as the database holds it (plus ``own`` starts not written yet)."""
    types = sorted({t for b in scopes.values() if b.limit.concurrency is not None for t in b.types})
    rated = [scope for scope, b in scopes.items() if b.limit.parsed_rate is not None]
    rows = await fetch(sql.flow_usage, types, rated)
    running = [(r[0], r[1], r[2], int(r[3])) for r in rows if r[4] is None]
    tats = {r[4]: float(r[5]) for r in rows if r[4] is not None}
    return tally(scopes, [*running, *own], tats)


async def _create_costed(tx: Tx, record: TaskRecord) -> bool:
    """Insert a task with a cost and reserve it, or raise :class:`InsufficientCredits` having
    written nothing; ``False`` (nothing written) when its id is taken. Whether the credits
    cover it is settled first, the owner's balance held for the rest of the transaction, so the
    reservation after the insert cannot fail: a refused task leaves no row to undo."""
    if await tx.load(record.id) is not None:
        return False  # answered as a repeat (or a conflict), with no credits moved
    move = credit_move(None, record)
    assert move is not None  # a cost
    await tx.cover_credits(record.owner, move)
    if not await tx.insert(record):
        return False
    await tx.move_credits(record.owner, move, now=record.created_at, task_id=record.id)
    return True


class TaskOps(Dialect):
    async def create(
        self, new: NewTask, *, max_pending_per_owner: int | None = None
    ) -> tuple[TaskRecord, bool]:
        record = create(new, now=self.clock.now())

        def same_request(existing: TaskRecord) -> tuple[TaskRecord, bool]:
            if existing.fingerprint != new.fingerprint:
                raise IdConflict()
            return existing, False

        async def op(tx: Tx) -> tuple[TaskRecord, bool]:
            if max_pending_per_owner is not None:
                # A repeated request is answered before the limit is checked: it adds nothing.
                existing = await tx.load(new.id)
                if existing is not None:
                    return same_request(existing)
                row = await tx.fetchrow(self.sql.count_pending, new.owner, max_pending_per_owner)
                pending = row[0] if row is not None else 0
                if pending >= max_pending_per_owner:
                    raise TooManyRequests(
                        f"The owner already has {pending} pending tasks, the most allowed.",
                        code="too_many_pending",
                        retry_after_s=5,
                    )
            if record.cost > 0:
                created = await _create_costed(tx, record)
            else:
                created = await tx.insert(record)
            if created:
                if record.debounce_key is not None:
                    await self._debounce(tx, [record])
                return record, True
            existing = await tx.load(new.id)
            if existing is None:
                raise IdConflict("This id belonged to a task that has been purged.")
            return same_request(existing)

        # Alone, the insert is one atomic statement (row, event, notification) where the dialect
        # can make it one: then the count for max_pending_per_owner is a soft limit. A task with a
        # cost reserves it in the same transaction, so never alone.
        if record.debounce_key is not None or record.cost > 0:
            return await self._write(op)  # the replaced tasks' changes, or the credits, go with it
        return await self._write(op, mode="alone", creates=record if max_pending_per_owner is None else None)

    async def create_many(
        self, news: Sequence[NewTask], *, max_pending_per_owner: int | None = None
    ) -> list[tuple[TaskRecord, bool] | ErrandsError]:
        now = self.clock.now()
        records = [create(new, now=now) for new in news]

        async def op(tx: Tx) -> list[tuple[TaskRecord, bool] | ErrandsError]:
            out: list[tuple[TaskRecord, bool] | ErrandsError | None] = [None] * len(news)
            tried = list(range(len(news)))
            if max_pending_per_owner is not None:
                # Room per owner: what the limit leaves, given out in order (a repeat of an
                # accepted request takes none, and is answered below like any other).
                room: dict[str, int] = {}
                for owner in dict.fromkeys(n.owner for n in news):
                    row = await tx.fetchrow(self.sql.count_pending, owner, max_pending_per_owner)
                    room[owner] = max_pending_per_owner - (row[0] if row is not None else 0)
                tried = []
                for i, new in enumerate(news):
                    if room[new.owner] > 0:
                        room[new.owner] -= 1
                        tried.append(i)
            held_back = set(range(len(news))) - set(tried)
            costed = [i for i in tried if records[i].cost > 0]  # one at a time, each with its credits
            tried = [i for i in tried if records[i].cost <= 0]
            inserted = await tx.insert_many([records[i] for i in tried])
            for i, ok in zip(tried, inserted, strict=True):
                if ok:
                    out[i] = (records[i], True)
            for i in costed:
                mark = await tx.mark()
                try:
                    if await _create_costed(tx, records[i]):
                        out[i] = (records[i], True)
                except InsufficientCredits as exc:
                    await tx.reset(mark)
                    out[i] = exc
                else:
                    await tx.release(mark)
            await tx.lock(news[i].id for i in range(len(news)) if out[i] is None)  # one statement
            for i, new in enumerate(news):
                if out[i] is not None:
                    continue
                existing = await tx.load(new.id)
                if existing is None:
                    out[i] = (
                        TooManyRequests(
                            "The owner already has the most pending tasks allowed.",
                            code="too_many_pending",
                            retry_after_s=5,
                        )
                        if i in held_back
                        else IdConflict("This id belonged to a task that has been purged.")
                    )
                elif existing.fingerprint != new.fingerprint:
                    out[i] = IdConflict()
                else:
                    out[i] = (existing, False)
            created = [a[0] for a in out if isinstance(a, tuple) and a[1]]
            if any(r.debounce_key is not None for r in created):
                replaced = await self._debounce(tx, created)
                out = [
                    (replaced[a[0].id], True) if isinstance(a, tuple) and a[0].id in replaced else a
                    for a in out
                ]
            return [r for r in out if r is not None]

        return await self._write(op)

    async def _debounce(self, tx: Tx, created: Sequence[TaskRecord]) -> dict[str, TaskRecord]:
        """Each key's newest task in ``created`` replaces the key's other pending tasks (same
        owner and type), earlier ones of ``created`` included; the replaced tasks, by id."""
        newest = {(r.owner, r.type, r.debounce_key): r for r in created if r.debounce_key is not None}
        # Two transactions creating tasks of one key must see each other's (READ COMMITTED: the
        # later one reads after the first committed), or both would survive.
        await tx.lock_keys(["\n".join(("debounce", *k)) for k in newest])
        replaced: dict[str, TaskRecord] = {}
        for (owner, task_type, key), record in newest.items():

            def replace(older: TaskRecord, by: str = record.id, at: float = record.created_at) -> Change:
                return debounce(older, now=at, by=by)

            for (task_id,) in await tx.fetch(self.sql.debounced, owner, task_type, key, [record.id]):
                mark = await tx.mark()
                try:
                    replaced[task_id] = await tx.apply(task_id, replace)
                except InvalidTransition:
                    await tx.reset(mark)  # it started meanwhile: it runs on
                else:
                    await tx.release(mark)
        return replaced

    async def get(self, task_id: str) -> TaskRecord | Tombstone | None:
        rows = await self._fetch(self.sql.select_task, task_id)
        if rows:
            return to_record(rows[0])
        rows = await self._fetch(self.sql.select_tombstone, task_id)
        return Tombstone(*rows[0]) if rows else None

    def _query_where(self, query: TaskQuery) -> tuple[str, list[Any]]:
        def given(value: Any) -> tuple[Any, ...] | None:
            return None if value is None else (value,)

        prefix = query.id_prefix
        return self._where(
            [
                ("owner = {}", given(query.owner)),
                ("id = {}", given(query.task_id)),
                ("status = {}", given(None if query.status is None else query.status.value)),
                ("type = {}", given(query.type)),
                # Ids are letters, digits, '_' and '-', all below '~' byte for byte.
                (self.sql.id_prefix, None if prefix is None else (prefix, prefix + "~")),
                ("created_at >= {}", given(query.created_after)),
                ("created_at < {}", given(query.created_before)),
                ("(created_at, id) < ({}, {})", query.before),
            ]
        )

    async def list_tasks(self, query: TaskQuery) -> list[TaskRecord]:
        where, args = self._query_where(query)
        sql = self.sql.list_tasks.format(where=where, limit=self.sql.param(len(args) + 1))
        return [to_record(r) for r in await self._fetch(sql, *args, query.limit)]

    async def count_tasks(self, query: TaskQuery) -> int:
        where, args = self._query_where(query)
        rows = await self._fetch_heavy(self.sql.count_tasks.format(where=where), *args)
        return int(rows[0][0]) if rows else 0

    async def count_by_status(self, query: TaskQuery) -> dict[Status, int]:
        where, args = self._query_where(query)
        rows = await self._fetch_heavy(self.sql.count_by_status.format(where=where), *args)
        return {Status(r[0]): int(r[1]) for r in rows}

    async def series(self, *, since: float, step_s: float, sample: int) -> SeriesRows:
        created = await self._fetch_heavy(self.sql.series_created, since, step_s)
        finished = await self._fetch_heavy(self.sql.series_finished, since, step_s)
        waits = await self._fetch_heavy(self.sql.type_waits, since, sample)
        runs = await self._fetch_heavy(self.sql.type_runs, since, sample)
        return SeriesRows(
            created=[(int(r[0]), int(r[1])) for r in created],
            finished=[(int(r[0]), r[1], int(r[2])) for r in finished],
            waits=[(r[0], max(0.0, r[1])) for r in waits],
            runs=[(r[0], max(0.0, r[1])) for r in runs],
        )

    async def apply(self, task_id: str, decide: Decision, *, seen: TaskRecord | None = None) -> TaskRecord:
        async def op(tx: Tx) -> TaskRecord:
            return await tx.apply(task_id, decide)

        return await self._write(
            op, task_id=task_id, seen=seen if seen is not None and seen.id == task_id else None
        )

    async def apply_many(self, decisions: Sequence[tuple[str, Decision]]) -> list[Outcome]:
        async def op(tx: Tx) -> list[Outcome]:
            await tx.lock(task_id for task_id, _ in decisions)
            outcomes = []
            for task_id, decide in decisions:
                mark = await tx.mark()
                try:
                    record = await tx.apply(task_id, decide)
                except Exception as exc:
                    if not tx.recoverable(exc):
                        raise
                    await tx.reset(mark)
                    outcomes.append(Outcome(None, as_errands_error(exc)))
                else:
                    await tx.release(mark)
                    outcomes.append(Outcome(record, None))
            return outcomes

        return await self._write(op)

    async def claim(
        self, *, worker_id: str, specs: Sequence[ClaimSpec], limit: int, lease_s: float, alone: bool = False
    ) -> Claimed:
        del alone  # one transaction, whoever claims (see the PostgreSQL store's claim)
        if limit <= 0 or not specs:
            return Claimed()
        bounds = {s.type: s.bounds for s in specs}
        types = list(bounds)
        # A limit per owner or key may skip tasks at the head of the queue (a whole pool's
        # skips all of them or none): read more than it takes.
        window = claim_window(limit, limited=any(b.limit.per != "all" for bs in bounds.values() for b in bs))

        async def op(tx: Tx) -> Claimed:
            now = self.clock.now()
            claimed = Claimed()
            scopes: dict[str, Bound] = {}  # every scope the looks met
            usage: dict[str, Usage | None] = {}
            before: dict[str, float | None] = {}  # the rate states as read
            held: set[str] = set()  # scopes that held tasks back: the next look skips them
            for look in range(_LOOKS):
                if look == 0:
                    rows = await tx.fetch(self.sql.claim, types, now, window)
                else:
                    skip = exclusions(held, scopes)
                    rows = await tx.fetch(self.sql.claim_except, types, now, window, *skip)
                candidates = [to_record(r) for r in rows]
                met = {b.scope(r): b for r in candidates for b in bounds[r.type]}
                new = {scope: b for scope, b in met.items() if scope not in scopes}
                if new:
                    scopes.update(new)
                    read = await self._usage(tx, new)
                    usage.update(read)
                    before.update({scope: u.tat for scope, u in read.items() if u is not None})
                choice = choose_claims(
                    candidates, bounds=bounds, usage=usage, limit=limit - len(claimed), now=now
                )
                usage = choice.usage
                if choice.retry_at is not None:
                    claimed.retry_at = min(claimed.retry_at or choice.retry_at, choice.retry_at)
                tx.started(choice.chosen)
                claimed.extend(
                    tx.write(start_claimed(record, now=now, worker_id=worker_id, lease_s=lease_s), record)
                    for record in choice.chosen
                )
                fresh = set(choice.blocked) - held
                if len(claimed) >= limit or len(rows) < window or not fresh:
                    break  # full, or all was read, or nothing new held the look back
                held |= fresh
            moved = {
                scope: use.tat
                for scope, use in usage.items()
                if use is not None and use.tat is not None and use.tat != before.get(scope)
            }
            if moved:
                await tx.execute(self.sql.set_flow_rates, list(moved), list(moved.values()))
            return claimed

        # First in its transaction (PostgreSQL: it takes the transaction's id as it locks the
        # rows it claims, so every task it sees was last written by an older transaction).
        return await self._write(op, mode="first")

    async def _usage(self, tx: Tx, scopes: Mapping[str, Bound]) -> dict[str, Usage | None]:
        """The scopes' usage, for those this claim could take (the others: ``None``)."""
        locked = await tx.lock_scopes(sorted(scopes))
        usage: dict[str, Usage | None] = dict.fromkeys(set(scopes) - locked)
        mine = {scope: b for scope, b in scopes.items() if scope in locked}
        if mine:
            usage.update(await read_usage(tx.fetch, self.sql, mine, tx.own_starts()))
        return usage

    async def flow_usage(self, scopes: Mapping[str, Bound]) -> dict[str, Usage]:
        return await read_usage(self._fetch, self.sql, scopes)

    async def renew(self, leases: Mapping[str, str], lease_s: float) -> set[str]:
        if not leases:
            return set()
        until = self.clock.now() + lease_s

        async def op(tx: Tx) -> set[str]:
            kept = await tx.fetch(self.sql.renew, until, list(leases), list(leases.values()))
            return set(leases) - {r[0] for r in kept}

        return await self._write(op, mode="alone")

    async def next_ready_at(self, types: Sequence[str], *, after: float) -> float | None:
        if not types:
            return None
        value: float | None = await self._first(self.sql.next_ready, list(types), after)
        return value

    async def set_poll_at(self, task_id: str, when: float) -> None:
        async def op(tx: Tx) -> None:
            await tx.execute(self.sql.set_poll_at, when, task_id)

        await self._write(op, mode="alone")

    # -- the sweeper's ------------------------------------------------------------------------

    async def due(self, *, now: float, limit: int) -> DueTasks:
        def ids(rows: list[Any]) -> list[str]:
            return [r[0] for r in rows]

        return DueTasks(
            lease_expired=ids(await self._fetch(self.sql.due_leases, now, limit)),
            past_deadline=ids(await self._fetch(self.sql.due_deadlines, now, limit)),
            expired=ids(await self._fetch(self.sql.due_expiry, now, limit)),
            not_started=ids(await self._fetch(self.sql.due_starts, now, limit)),
        )

    async def due_polls(self, *, now: float, limit: int) -> list[str]:
        return [r[0] for r in await self._fetch(self.sql.due_polls, now, limit)]

    async def next_poll_at(self) -> float | None:
        rows = await self._fetch(self.sql.next_poll)
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def purge(self, *, finished_before: float, tombstones_before: float, limit: int) -> int:
        now = self.clock.now()

        async def op(tx: Tx) -> int:
            gone = await tx.fetch(self.sql.purge_tasks, finished_before, limit)
            if gone:
                ids = [r[0] for r in gone]
                seqs = [r[0] for r in await tx.fetch(self.sql.purge_events, ids)]
                if seqs:
                    # The horizon first: a reader that finds no event below it knows why.
                    await tx.execute(self.sql.raise_horizon, max(seqs))
                await tx.execute(self.sql.add_tombstones, ids, [r[1] for r in gone], now)
                # What they came to stays counted (errands.model.usage), in this transaction.
                await tx.executemany(self.sql.add_usage, rollup((r[1], r[2], r[3], r[4], r[5]) for r in gone))
            await tx.execute(self.sql.purge_tombstones, tombstones_before)
            for statement in self.sql.purge_old:  # receipts, finished messages, the delivery log
                await tx.execute(statement, finished_before)
            return len(gone)

        return await self._write(op)

    async def pending_counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._fetch_heavy(self.sql.pending_by_type)}

    async def stats(self, *, since: float, sample: int) -> StatsRows:
        counts = await self._fetch_heavy(self.sql.stats_counts)
        waits = await self._fetch_heavy(self.sql.stats_waits, since, sample)
        runs = await self._fetch_heavy(self.sql.stats_runs, since, sample)
        return StatsRows(
            counts=[(r[0], r[1], int(r[2])) for r in counts],
            waits_s=[max(0.0, r[0]) for r in waits],
            runs_s=[max(0.0, r[0]) for r in runs],
        )
