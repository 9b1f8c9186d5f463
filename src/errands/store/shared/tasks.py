"""Tasks: create, read, change, claim and lease; and the sweeper's queries."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from errands.errors import ErrandsError, IdConflict, TooManyRequests
from errands.model import NewTask, TaskRecord, choose_claims, claim_window, create, start_attempt
from errands.store.base import Decision
from errands.store.columns import to_record
from errands.store.records import ClaimSpec, DueTasks, Outcome, StatsRows, TaskQuery, Tombstone
from errands.store.shared import Dialect, Tx, as_errands_error


def lease_token() -> str:
    return secrets.token_hex(12)


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
            if await tx.insert(record):
                return record, True
            existing = await tx.load(new.id)
            if existing is None:
                raise IdConflict("This id belonged to a task that has been purged.")
            return same_request(existing)

        # Alone, the insert is one atomic statement (row, event, notification) where the dialect
        # can make it one: then the count for max_pending_per_owner is a soft limit.
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
            inserted = await tx.insert_many([records[i] for i in tried])
            held_back = set(range(len(news))) - set(tried)
            for i, ok in zip(tried, inserted, strict=True):
                if ok:
                    out[i] = (records[i], True)
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
            return [r for r in out if r is not None]

        return await self._write(op)

    async def get(self, task_id: str) -> TaskRecord | Tombstone | None:
        rows = await self._fetch(self.sql.select_task, task_id)
        if rows:
            return to_record(rows[0])
        rows = await self._fetch(self.sql.select_tombstone, task_id)
        return Tombstone(*rows[0]) if rows else None

    async def list_tasks(self, query: TaskQuery) -> list[TaskRecord]:
        def given(value: Any) -> tuple[Any, ...] | None:
            return None if value is None else (value,)

        where, args = self._where(
            [
                ("owner = {}", given(query.owner)),
                ("id = {}", given(query.task_id)),
                ("status = {}", given(None if query.status is None else query.status.value)),
                ("type = {}", given(query.type)),
                ("(created_at, id) < ({}, {})", query.before),
            ]
        )
        sql = self.sql.list_tasks.format(where=where, limit=self.sql.param(len(args) + 1))
        return [to_record(r) for r in await self._fetch(sql, *args, query.limit)]

    async def apply(self, task_id: str, decide: Decision) -> TaskRecord:
        async def op(tx: Tx) -> TaskRecord:
            return await tx.apply(task_id, decide)

        return await self._write(op, task_id=task_id)

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
        self, *, worker_id: str, specs: Sequence[ClaimSpec], limit: int, lease_s: float
    ) -> list[TaskRecord]:
        if limit <= 0 or not specs:
            return []
        caps = {s.type: s.concurrency_per_owner for s in specs}
        window = claim_window(limit, fair_share=any(cap is not None for cap in caps.values()))

        async def op(tx: Tx) -> list[TaskRecord]:
            now = self.clock.now()
            candidates = [to_record(r) for r in await tx.fetch(self.sql.claim, list(caps), now, window)]
            keys = {(r.type, r.owner) for r in candidates if caps.get(r.type) is not None}
            running = await tx.running(keys) if keys else {}
            chosen = choose_claims(candidates, caps=caps, running=running, limit=limit, now=now)
            tx.started(chosen)
            return [
                tx.write(
                    start_attempt(
                        record,
                        now=now,
                        worker_id=worker_id,
                        lease_token=lease_token(),
                        lease_s=lease_s,
                        callback_nonce=secrets.token_urlsafe(12),
                    ),
                    record,
                )
                for record in chosen
            ]

        # First in its transaction (PostgreSQL: it takes the transaction's id as it locks the
        # rows it claims, so every task it sees was last written by an older transaction).
        return await self._write(op, mode="first")

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
            to_poll=ids(await self._fetch(self.sql.due_polls, now, limit)),
        )

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
            await tx.execute(self.sql.purge_tombstones, tombstones_before)
            for statement in self.sql.purge_old:  # receipts, finished messages, the delivery log
                await tx.execute(statement, finished_before)
            return len(gone)

        return await self._write(op)

    async def stats(self, *, since: float, sample: int) -> StatsRows:
        counts = await self._fetch_heavy(self.sql.stats_counts)
        waits = await self._fetch_heavy(self.sql.stats_waits, since, sample)
        runs = await self._fetch_heavy(self.sql.stats_runs, since, sample)
        return StatsRows(
            counts=[(r[0], r[1], int(r[2])) for r in counts],
            waits_s=[max(0.0, r[0]) for r in waits],
            runs_s=[max(0.0, r[0]) for r in runs],
        )
