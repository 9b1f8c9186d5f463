"""The app object: which task types exist and who performs them."""

from __future__ import annotations

import contextlib
import inspect
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from errands.auth import SYSTEM
from errands.clock import Clock
from errands.config import Settings, load_settings
from errands.errors import ConfigError, Unavailable
from errands.inputs import TYPE_PATTERN, validate
from errands.model import Task
from errands.service import SubmitRequest

if TYPE_CHECKING:
    from errands.context import TaskContext
    from errands.notify.hooks import Hook
    from errands.notify.wechat import WeChat, WeChatTemplate
    from errands.providers import Provider
    from errands.runtime import Runtime

Handler = Callable[["TaskContext", Any], Awaitable[Any]] | Callable[["TaskContext", Any], Any]
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class TaskType:
    """A registered task type and the limits that apply to its tasks.

    A local type has a ``handler``; an external type has a ``provider`` instead, and the
    polling schedule used when its webhooks do not come.
    """

    name: str
    handler: Handler | None
    is_async: bool
    timeout_s: float | None = None
    max_attempts: int | None = None
    concurrency_per_owner: int | None = None
    provider: Provider | None = None
    poll_after_s: float = 60.0
    poll_every_s: float = 10.0


class Errands:
    """The registry of task types, and the in-process entry point for submitting tasks.

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
        self.task_types: dict[str, TaskType] = {}
        self.providers: dict[str, Provider] = {}
        self.hooks: dict[str, Hook] = {}
        self.wechat_channel: WeChat | None = None
        self._runtime: Runtime | None = None

    def _check(
        self, name: str, timeout_s: float | None, max_attempts: int | None, concurrency_per_owner: int | None
    ) -> None:
        if not re.fullmatch(TYPE_PATTERN, name):
            raise ConfigError(f"'{name}' is not a valid task type name (letters, digits, _ . : -).")
        if name in self.task_types:
            raise ConfigError(f"Task type '{name}' is registered twice.")
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigError("timeout_s must be positive.")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1.")
        if concurrency_per_owner is not None and concurrency_per_owner < 1:
            raise ConfigError("concurrency_per_owner must be at least 1.")

    def external(
        self,
        name: str,
        *,
        provider: Provider,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        poll_after_s: float = 60.0,
        poll_every_s: float = 10.0,
        concurrency_per_owner: int | None = None,
    ) -> None:
        """Register a task type that ``provider`` performs (see :mod:`errands.providers`).

        A worker submits each task to the provider (retrying with backoff if it cannot); the
        provider's webhooks complete it; without a final webhook ``poll_after_s`` after
        submission, the sweeper polls every ``poll_every_s`` until the task ends or times out.
        """
        self._check(name, timeout_s, max_attempts, concurrency_per_owner)
        if poll_after_s < 0 or poll_every_s <= 0:
            raise ConfigError("poll_after_s must not be negative and poll_every_s must be positive.")
        known = self.providers.get(provider.name)
        if known is not None and known is not provider:
            raise ConfigError(f"Two different providers are named '{provider.name}'.")
        self.providers[provider.name] = provider
        self.task_types[name] = TaskType(
            name=name,
            handler=None,
            is_async=True,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            concurrency_per_owner=concurrency_per_owner,
            provider=provider,
            poll_after_s=poll_after_s,
            poll_every_s=poll_every_s,
        )

    def task(
        self,
        name: str,
        *,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        concurrency_per_owner: int | None = None,
    ) -> Callable[[H], H]:
        """Register a handler for ``name``; sync handlers run in a thread pool."""
        self._check(name, timeout_s, max_attempts, concurrency_per_owner)

        def register(handler: H) -> H:
            self.task_types[name] = TaskType(
                name=name,
                handler=handler,
                is_async=inspect.iscoroutinefunction(handler),
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                concurrency_per_owner=concurrency_per_owner,
            )
            return handler

        return register

    # -- notifications ------------------------------------------------------------------------

    def on(
        self, *events: str, types: list[str] | None = None, timeout_s: float | None = None
    ) -> Callable[[H], H]:
        """Register a lifecycle hook: ``fn(event: HookEvent)`` runs after each committed event
        of these types (``task.failed``, ``task.*``…), at least once, with retries, outside the
        workers. ``types`` limits it to tasks of those types. See :mod:`errands.notify.hooks`."""
        from errands.notify.hooks import Hook
        from errands.notify.policy import valid_pattern

        if not events:
            raise ConfigError("app.on() needs at least one event type, such as 'task.failed'.")
        unknown = [e for e in events if not valid_pattern(e)]
        if unknown:
            raise ConfigError(f"Unknown event type {unknown[0]!r}.")
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigError("timeout_s must be positive.")

        def register(fn: H) -> H:
            name = f"{fn.__module__}:{fn.__qualname__}"
            if name in self.hooks:
                raise ConfigError(f"The hook {name} is registered twice.")
            self.hooks[name] = Hook(
                name=name,
                events=tuple(events),
                types=None if types is None else tuple(types),
                fn=fn,
                is_async=inspect.iscoroutinefunction(fn),
                timeout_s=timeout_s,
            )
            return fn

        return register

    def wechat(
        self,
        templates: list[WeChatTemplate],
        *,
        appid: str | None = None,
        secret: str | None = None,
        base_url: str | None = None,
        miniprogram_state: str = "formal",
        timezone: str = "Asia/Shanghai",
        outcomes: dict[str, str] | None = None,
    ) -> WeChat:
        """Send WeChat subscribe messages to task owners (openids) when their tasks end.

        ``appid``, ``secret`` and ``base_url`` default to ``ERRANDS_WECHAT_APPID``,
        ``ERRANDS_WECHAT_SECRET`` and ``ERRANDS_WECHAT_BASE_URL``. See :mod:`errands.notify.wechat`.
        """
        from errands.notify.wechat import DEFAULT_OUTCOMES, WeChat

        if self.wechat_channel is not None:
            raise ConfigError("The WeChat channel is configured twice.")
        self.wechat_channel = WeChat(
            templates=templates,
            appid=appid,
            secret=secret,
            base_url=base_url,
            miniprogram_state=miniprogram_state,
            timezone=timezone,
            outcomes={**DEFAULT_OUTCOMES, **(outcomes or {})},
        )
        return self.wechat_channel

    # -- running in-process -------------------------------------------------------------------

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
        from errands.runtime import Runtime

        runtime = Runtime(self, settings or load_settings(), clock=clock, rng=rng)
        await runtime.start(workers=workers, sweeper=sweeper, notifier=notifier)
        try:
            yield runtime
        finally:
            await runtime.stop()

    def _bind(self, runtime: Runtime | None) -> None:
        self._runtime = runtime

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
    ) -> Task:
        """Submit a task from code living next to the service; returns at once with the task.

        Same rules as ``POST /v1/tasks``: an ``id`` makes the call idempotent; a value the API
        would refuse raises the same error (:class:`errands.errors.InvalidRequest`, with the
        same message).
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
            },
        )
        record, _ = await self._runtime.service.submit(request, SYSTEM)
        return record.to_task()
