"""The app object users decorate: a registry of task types, with the means to run it in-process."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

from errands.auth import SYSTEM
from errands.clock import Clock
from errands.config import Settings, load_settings
from errands.errors import ApiError, Unavailable
from errands.inputs import validate
from errands.model import Task
from errands.model.credits import Balance
from errands.registry import Registry
from errands.runtime import Runtime
from errands.service import SubmitRequest


class Errands(Registry):
    """The task types of an app and who performs them, and the in-process entry point for
    submitting tasks.

    ::

        app = Errands()

        @app.task("photography", timeout_s=600, max_attempts=3)
        async def photography(ctx: TaskContext, input: dict) -> dict:
            await ctx.progress(30, "generating")
            return {"images": [...]}

    Serve it with ``errands serve --app module:app``, or run it inside your own program with
    ``async with app.running(): await app.submit("photography", {...})``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._runtime: Runtime | None = None

    @contextlib.contextmanager
    def serving(self, runtime: Runtime) -> Iterator[Runtime]:
        """``app.submit`` goes to ``runtime`` for the duration of the block (the server and
        :meth:`running` use it; a handler may submit follow-up tasks)."""
        previous, self._runtime = self._runtime, runtime
        try:
            yield runtime
        finally:
            self._runtime = previous

    @contextlib.asynccontextmanager
    async def running(
        self,
        settings: Settings | None = None,
        *,
        workers: bool = True,
        sweeper: bool = True,
        notifier: bool | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> AsyncIterator[Runtime]:
        """Run the store, workers, sweeper and notifier in this process for the duration of the
        block (the notifier runs where the sweeper does unless ``notifier`` says otherwise)."""
        runtime = Runtime(self, settings or load_settings(), clock=clock, rng=rng)
        await runtime.start(workers=workers, sweeper=sweeper, notifier=notifier)
        try:
            with self.serving(runtime):
                yield runtime
        finally:
            await runtime.stop()

    async def submit(
        self,
        type: str,
        input: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        id: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        expires_in_s: float | None = None,
        notify_url: str | None = None,
        run_at: datetime | None = None,
        delay_s: float | None = None,
        start_within_s: float | None = None,
        key: str | None = None,
        debounce_key: str | None = None,
        debounce_s: float | None = None,
        cost: int | None = None,
    ) -> Task:
        """Submit a task from code living next to the service; returns at once with the task.

        Same rules as ``POST /v1/tasks``: an ``id`` makes the call idempotent; a value the API
        would refuse raises the same error (:class:`errands.errors.InvalidRequest`, with the
        same message). ``run_at`` (an aware datetime) or ``delay_s`` delays its first run;
        never started within ``start_within_s`` of then, it ends ``timeout`` (``not_started``).
        ``key`` names whose share of ``per="key"`` limits it uses (default: its owner's).
        ``debounce_key``: this task replaces the owner's pending tasks of the type with the same
        key (they end ``cancelled``, code ``debounced``); ``debounce_s`` delays it that long.
        ``cost``: the credits it reserves of its owner's (default: its type's); one the balance
        cannot cover raises :class:`errands.errors.InsufficientCredits`.
        """
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        request = validate(
            SubmitRequest,
            {
                "type": type,
                "input": {} if input is None else input,
                "owner": owner,
                "id": id,
                "priority": priority,
                "timeout_s": None if timeout_s is None else float(timeout_s),
                "max_attempts": max_attempts,
                "expires_in_s": None if expires_in_s is None else float(expires_in_s),
                "notify_url": notify_url,
                "run_at": run_at,
                "delay_s": None if delay_s is None else float(delay_s),
                "start_within_s": None if start_within_s is None else float(start_within_s),
                "key": key,
                "debounce_key": debounce_key,
                "debounce_s": None if debounce_s is None else float(debounce_s),
                "cost": cost,
            },
        )
        record, _ = await self._runtime.service.submit(request, SYSTEM)
        return record.to_task()

    async def grant(self, owner: str, amount: int, *, note: str | None = None) -> Balance:
        """Add ``amount`` credits to the owner's balance (take them back when negative)."""
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        return await self._runtime.service.accounts.grant(owner, amount, note, SYSTEM)

    async def balance(self, owner: str) -> Balance:
        """The owner's credits: what it may spend, and what its unfinished tasks hold."""
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        return await self._runtime.store.balance(owner)

    async def submit_many(self, tasks: list[dict[str, Any]]) -> list[Task | ApiError]:
        """Up to 1,000 submissions in one transaction, each a dict of ``POST /v1/tasks``'s body
        (``{"type", "input"?, "id"?, "owner"?, …}``): for each, in order, its task or the error
        that refused it (returned, not raised: one refused item refuses only itself)."""
        if self._runtime is None:
            raise Unavailable("The app is not running; use `async with app.running():` or `errands serve`.")
        answers = await self._runtime.service.submit_many(tasks, SYSTEM)
        return [a[0].to_task() if isinstance(a, tuple) else a for a in answers]
