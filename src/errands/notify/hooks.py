"""Lifecycle hooks: app code that runs after a change of a task commits.

::

    @app.on("task.failed", types=["photography"])
    async def refund(event: HookEvent) -> None:
        await credits.refund(event.task.owner, event.task.input["cost"])

A hook runs at least once per event, outside the workers, with retries on the notification
schedule: each call is a message of the outbox, so a crash before the hook was recorded as done
runs it again. Hooks should therefore be idempotent (``event.message_id`` is stable across
retries and makes a good idempotency key).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from errands.model import Task
from errands.notify.policy import Route, Sent
from errands.store.base import Message

log = logging.getLogger("errands.hooks")

HookFunction = Callable[["HookEvent"], Awaitable[Any]] | Callable[["HookEvent"], Any]


@dataclass(frozen=True, slots=True)
class HookEvent:
    """What a hook receives: the event and the task as it was right after the change."""

    type: str
    seq: int
    at: datetime
    task: Task
    message_id: str  # the same on every retry of this call
    attempt: int  # 1 on the first call


@dataclass(frozen=True, slots=True)
class Hook:
    """A registered lifecycle hook."""

    name: str
    events: tuple[str, ...]
    types: tuple[str, ...] | None
    fn: HookFunction
    is_async: bool
    timeout_s: float | None

    def route(self) -> Route:
        return Route("hook", self.name, self.events, self.types)


def hook_event(message: Message) -> HookEvent:
    body = orjson.loads(message.payload)
    return HookEvent(
        type=body["type"],
        seq=message.seq,
        at=datetime.fromisoformat(body["timestamp"]),
        task=Task.model_validate(body["data"]["task"]),
        message_id=message.id,
        attempt=message.attempts,
    )


async def run_hook(hook: Hook, message: Message, *, timeout_s: float) -> Sent:
    """Call the hook once; a raise or a timeout is a failed attempt, retried later."""
    started = time.perf_counter()
    limit = hook.timeout_s or timeout_s
    try:
        event = hook_event(message)
        async with asyncio.timeout(limit):
            if hook.is_async:
                await hook.fn(event)
            else:
                await asyncio.to_thread(hook.fn, event)
    except TimeoutError:
        error = f"the hook did not finish within {limit:g} s"
    except Exception as exc:
        log.warning("lifecycle hook %s failed on %s: %s", hook.name, message.task_id, type(exc).__name__)
        error = f"{type(exc).__name__}: {exc}"
    else:
        return Sent(True, latency_ms=(time.perf_counter() - started) * 1000)
    return Sent(False, latency_ms=(time.perf_counter() - started) * 1000, error=error)
