"""Notifications: endpoints, messages (the outbox) and the delivery log."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Callable, Sequence

from errands.errors import NotFound
from errands.model import mark_notified
from errands.store.columns import (
    MESSAGES,
    attempt_values,
    endpoint_values,
    message_values,
    to_attempt,
    to_endpoint,
    to_message,
)
from errands.store.records import (
    Attempt,
    AttemptResult,
    Channel,
    Endpoint,
    Message,
    MessageQuery,
    MessageState,
)
from errands.store.shared import Dialect, Tx

_M = len(MESSAGES.columns)


class OutboxOps(Dialect):
    # -- endpoints ----------------------------------------------------------------------------

    async def create_endpoint(self, endpoint: Endpoint) -> None:
        async def op(tx: Tx) -> None:
            await tx.execute(self.sql.insert_endpoint, *endpoint_values(endpoint))

        await self._write(op, mode="own")

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        rows = await self._fetch(self.sql.select_endpoint, endpoint_id)
        return to_endpoint(rows[0]) if rows else None

    async def list_endpoints(self) -> list[Endpoint]:
        return [to_endpoint(r) for r in await self._fetch(self.sql.list_endpoints)]

    async def update_endpoint(self, endpoint_id: str, change: Callable[[Endpoint], Endpoint]) -> Endpoint:
        async def op(tx: Tx) -> Endpoint:
            row = await tx.fetchrow(self.sql.lock_endpoint, endpoint_id)
            if row is None:
                raise NotFound("No such endpoint.")
            old = to_endpoint(row)
            new = change(old)
            await tx.execute(self.sql.update_endpoint, *endpoint_values(new))
            if old.enabled and not new.enabled:
                await tx.execute(
                    self.sql.fail_pending, "the endpoint was disabled", new.updated_at, endpoint_id
                )
            return new

        return await self._write(op, mode="own")

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        now = self.clock.now()

        async def op(tx: Tx) -> bool:
            if not await tx.execute(self.sql.delete_endpoint, endpoint_id):
                return False
            await tx.execute(self.sql.fail_pending, "the endpoint was deleted", now, endpoint_id)
            return True

        return await self._write(op, mode="own")

    # -- from events to messages --------------------------------------------------------------

    async def notify_cursor(self) -> int:
        return int(await self._first(self.sql.notify_cursor) or 0)

    async def notify_urls_after(self, seq: int) -> bool:
        return bool(await self._fetch(self.sql.notify_urls_after, seq))

    async def add_messages(self, after: int, upto: int, messages: Sequence[Message]) -> bool:
        async def op(tx: Tx) -> bool:
            await tx.execute(self.sql.init_notify_cursor)
            if not await tx.execute(self.sql.move_notify_cursor, str(upto), str(after)):
                return False  # another process moved it first: it stored these messages
            if messages:
                await tx.executemany(self.sql.insert_message, [message_values(m) for m in messages])
            return True

        return await self._write(op, mode="own")

    # -- delivery -----------------------------------------------------------------------------

    async def claim_messages(
        self,
        *,
        now: float,
        limit: int,
        lease_s: float,
        channels: Sequence[str],
        hooks: Sequence[str],
    ) -> list[tuple[Message, Endpoint | None]]:
        if limit <= 0 or not (channels or hooks):
            return []

        async def op(tx: Tx) -> list[tuple[Message, Endpoint | None]]:
            rows = await tx.fetch(self.sql.due_messages, now, list(channels), list(hooks), limit)
            claimed: list[tuple[Message, Endpoint | None]] = []
            updates = []
            for row in rows:
                message = to_message(row[:_M])
                token = secrets.token_hex(12)
                message = dataclasses.replace(
                    message,
                    attempts=message.attempts + 1,
                    next_at=now + lease_s,
                    lease_token=token,
                    updated_at=now,
                )
                updates.append((message.attempts, message.next_at, token, now, message.id))
                claimed.append((message, to_endpoint(row[_M:]) if row[_M] is not None else None))
            if updates:
                await tx.executemany(self.sql.claim_message, updates)
            return claimed

        return await self._write(op, mode="own")

    async def finish_message(self, result: AttemptResult) -> None:
        attempt = result.attempt
        now = attempt.attempted_at

        async def op(tx: Tx) -> None:
            found = await tx.fetchrow(self.sql.message_ref, attempt.message_id)
            if found is None:
                return
            task_id, seq, final = found[0], found[1], bool(found[2])
            ends = result.state == MessageState.DELIVERED and final
            if ends:
                # Lock the task first: two last messages finishing at once must not both see the
                # other still pending.
                await tx.load(task_id)
            await tx.execute(self.sql.insert_attempt, *attempt_values(attempt))
            moved = await tx.execute(
                self.sql.finish_message, str(result.state), result.next_at, attempt.status_code, attempt.error,
                now, attempt.message_id, result.lease_token,
            )  # fmt: skip
            if not moved:
                return  # the lease ran out and another sender took over: only the log keeps this
            if result.health is not None and attempt.channel == Channel.ENDPOINT:
                await self._health(tx, attempt, result, now)
            if ends and not await tx.fetch(self.sql.final_left, task_id, seq):
                with contextlib.suppress(NotFound):  # purged meanwhile
                    await tx.apply(task_id, lambda r: mark_notified(r, now=now, seq=seq))

        await self._write(op)

    async def _health(self, tx: Tx, attempt: Attempt, result: AttemptResult, now: float) -> None:
        """The endpoint's health after the attempt, decided on its row as locked here."""
        row = await tx.fetchrow(self.sql.lock_endpoint, attempt.target)
        if row is None or result.health is None:
            return
        before = to_endpoint(row)
        health = result.health(before)
        disabling = before.enabled and health.disabled_reason is not None
        await tx.execute(
            self.sql.set_health,
            health.failing_since,
            health.throttled_until,
            before.enabled and not disabling,
            health.disabled_reason if disabling else before.disabled_reason,
            now if disabling else before.updated_at,
            attempt.target,
        )
        if disabling:
            await tx.execute(self.sql.fail_pending, "the endpoint was disabled", now, attempt.target)

    async def next_message_at(self, *, channels: Sequence[str], hooks: Sequence[str]) -> float | None:
        if not (channels or hooks):
            return None
        value: float | None = await self._first(self.sql.next_message_at, list(channels), list(hooks))
        return value

    # -- the delivery log and admin -----------------------------------------------------------

    async def get_message(self, message_id: str) -> Message | None:
        rows = await self._fetch(self.sql.select_message, message_id)
        return to_message(rows[0]) if rows else None

    async def list_messages(self, query: MessageQuery) -> list[Message]:
        where, args = self._where(
            [
                ("task_id = {}", None if query.task_id is None else (query.task_id,)),
                ("target = {}", None if query.endpoint_id is None else (query.endpoint_id,)),
                ("state = {}", None if query.state is None else (query.state,)),
            ]
        )
        sql = self.sql.list_messages.format(where=where, limit=self.sql.param(len(args) + 1))
        return [to_message(r) for r in await self._fetch(sql, *args, query.limit)]

    async def attempts(
        self,
        *,
        target: str | None = None,
        message_id: str | None = None,
        succeeded: bool | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Attempt]:
        where, args = self._where(
            [
                ("target = {}", None if target is None else (target,)),
                ("message_id = {}", None if message_id is None else (message_id,)),
                ("succeeded = {}", None if succeeded is None else (succeeded,)),
                ("id < {}", None if before is None else (before,)),
            ]
        )
        sql = self.sql.list_attempts.format(where=where, limit=self.sql.param(len(args) + 1))
        return [to_attempt(r) for r in await self._fetch(sql, *args, limit)]

    async def resend_message(self, message_id: str, *, now: float) -> Message:
        async def op(tx: Tx) -> Message:
            row = await tx.fetchrow(self.sql.resend_message, now, message_id)
            if row is None:
                raise NotFound("No such message.")
            return to_message(row)

        return await self._write(op, mode="own")

    async def recover_endpoint(self, endpoint_id: str, *, since: float, now: float) -> int:
        async def op(tx: Tx) -> int:
            return await tx.execute(self.sql.recover_endpoint, now, endpoint_id, since)

        return await self._write(op, mode="own")
