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
from datetime import datetime

import orjson

from errands.model import Task
from errands.notify.policy import Route, Sent
from errands.registry import Hook, HookEvent
from errands.store.records import Channel, Message

log = logging.getLogger("errands.hooks")

__all__ = ["Hook", "HookEvent", "hook_event", "hook_route", "run_hook"]


def hook_route(hook: Hook) -> Route:
    """Which events a hook hears: its event types, of its task types."""
    return Route(Channel.HOOK, hook.name, hook.events, hook.types)


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
