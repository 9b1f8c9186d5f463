"""What an app declares: its task types (who performs them, their limits), hooks, WeChat templates.

Every loop of a running process reads it (workers, the sweeper, the notifier, the service); none
changes it. :class:`errands.Errands` is a registry with the means to run it in-process on top.
Declarations are checked here, when they are made, so a mistake stops the app at import time.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from errands.errors import ConfigError
from errands.inputs import TYPE_PATTERN
from errands.model import Bound, Limit, Task, valid_pattern
from errands.model.credits import MAX_COST
from errands.model.schedules import BadSchedule, Missed, ScheduleSpec
from errands.model.schedules import check as check_schedule

if TYPE_CHECKING:
    from errands.context import TaskContext
    from errands.providers import Provider

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
    #: Flow control of the type (:mod:`errands.model.flow`), ``concurrency_per_owner`` included.
    limits: tuple[Limit, ...] = ()
    #: Credits a task of the type reserves of its owner's (:mod:`errands.model.credits`).
    cost: int = 0


@dataclass(frozen=True, slots=True)
class HookEvent:
    """What a lifecycle hook receives: the event and the task as it was right after the change."""

    type: str
    seq: int
    at: datetime
    task: Task
    message_id: str  # the same on every retry of this call
    attempt: int  # 1 on the first call


HookFunction = Callable[[HookEvent], Awaitable[Any]] | Callable[[HookEvent], Any]


@dataclass(frozen=True, slots=True)
class Hook:
    """A registered lifecycle hook (see :mod:`errands.notify.lifecycle`)."""

    name: str
    events: tuple[str, ...]
    types: tuple[str, ...] | None
    fn: HookFunction
    is_async: bool
    timeout_s: float | None


@dataclass(frozen=True, slots=True)
class WeChatTemplate:
    """A subscribe message template and what to fill it with (see :mod:`errands.notify.wechat`)."""

    template_id: str
    data: Mapping[str, str]
    events: Sequence[str] = ("task.completed", "task.failed", "task.timeout")
    types: Sequence[str] | None = None
    page: str | None = "pages/index/index?taskId={id}"
    name: str = ""  # how messages name it (default: the template id)

    @property
    def key(self) -> str:
        return self.name or self.template_id


DEFAULT_OUTCOMES = {"completed": "已完成", "failed": "失败", "timeout": "超时", "cancelled": "已取消"}


@dataclass(frozen=True, slots=True)
class WeChatConfig:
    """The WeChat channel as the app declares it: templates and how to fill them. Credentials
    left out here come from the settings (``ERRANDS_WECHAT_*``) when the notifier starts."""

    templates: tuple[WeChatTemplate, ...]
    appid: str | None = None
    secret: str | None = None
    base_url: str | None = None
    miniprogram_state: str = "formal"
    lang: str = "zh_CN"
    timezone: str = "Asia/Shanghai"
    outcomes: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_OUTCOMES))
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.templates:
            raise ConfigError("A WeChat channel needs at least one template.")
        keys = [t.key for t in self.templates]
        if len(set(keys)) != len(keys):
            raise ConfigError("Two WeChat templates have the same name.")
        for template in self.templates:
            bad = [e for e in template.events if not valid_pattern(e) or e == "task.stream"]
            if bad:
                raise ConfigError(f"Unknown event type {bad[0]!r} in a WeChat template.")
        if self.miniprogram_state not in ("formal", "trial", "developer"):
            raise ConfigError("miniprogram_state must be formal, trial or developer.")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"Unknown time zone {self.timezone!r}.") from None


class Registry:
    """The declarations of an app (see the module docstring)."""

    def __init__(self) -> None:
        self.task_types: dict[str, TaskType] = {}
        self.providers: dict[str, Provider] = {}
        self.hooks: dict[str, Hook] = {}
        self.wechat_config: WeChatConfig | None = None
        self.schedules: dict[str, ScheduleSpec] = {}
        self.provider_limits: dict[str, tuple[Limit, ...]] = {}

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

    @staticmethod
    def _cost(cost: int) -> int:
        if isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= MAX_COST:
            raise ConfigError(f"cost must be a whole number of credits from 0 to {MAX_COST}.")
        return cost

    @staticmethod
    def _limits(
        what: str, limits: Sequence[Limit], concurrency_per_owner: int | None = None
    ) -> tuple[Limit, ...]:
        found = list(limits)
        if any(not isinstance(limit, Limit) for limit in found):
            raise ConfigError(f"{what}: limits must be errands.Limit(...) values.")
        if concurrency_per_owner is not None:
            found.append(Limit(concurrency=concurrency_per_owner, per="owner"))
        pers = [limit.per for limit in found]
        for per in set(pers):
            if pers.count(per) > 1:
                raise ConfigError(
                    f"{what}: two limits per {per}; give their concurrency and rate in one Limit "
                    "(or use concurrency_per_owner or a per='owner' limit, not both)."
                )
        return tuple(found)

    def limit_provider(self, name: str, *limits: Limit) -> None:
        """Limits shared by every task type ``name`` performs (a quota of the provider's, or of
        each customer's key with ``per="key"``), on top of each type's own."""
        if not re.fullmatch(TYPE_PATTERN, name):
            raise ConfigError(f"'{name}' is not a provider's name.")
        if name in self.provider_limits:
            raise ConfigError(f"The limits of provider '{name}' are declared twice.")
        if not limits:
            raise ConfigError(f"Provider '{name}': give at least one limit.")
        self.provider_limits[name] = self._limits(f"Provider '{name}'", limits)

    def bounds(self) -> dict[str, tuple[Bound, ...]]:
        """Each task type's limits as they apply (see :mod:`errands.model.flow`)."""
        by_provider: dict[str, list[str]] = {}
        for t in self.task_types.values():
            if t.provider is not None:
                by_provider.setdefault(t.provider.name, []).append(t.name)
        found = {}
        for t in self.task_types.values():
            own = [Bound(f"type:{t.name}", (t.name,), limit) for limit in t.limits]
            if t.provider is not None:
                pool = tuple(by_provider[t.provider.name])
                own += [
                    Bound(f"provider:{t.provider.name}", pool, limit)
                    for limit in self.provider_limits.get(t.provider.name, ())
                ]
            found[t.name] = tuple(own)
        return found

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
        limits: Sequence[Limit] = (),
        cost: int = 0,
    ) -> None:
        """Register a task type that ``provider`` performs (see :mod:`errands.providers`).

        A worker submits each task to the provider (retrying with backoff if it cannot); the
        provider's webhooks complete it; without a final webhook ``poll_after_s`` after
        submission, the sweeper polls every ``poll_every_s`` until the task ends or times out.
        The sweeper polls on a timer of its own (``poll_every_s`` holds down to one second); it
        looks for tasks newly handed over every 5 s at least.
        """
        self._check(name, timeout_s, max_attempts, concurrency_per_owner)
        own = self._limits(f"Task type '{name}'", limits, concurrency_per_owner)
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
            limits=own,
            cost=self._cost(cost),
        )

    def task(
        self,
        name: str,
        *,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        concurrency_per_owner: int | None = None,
        limits: Sequence[Limit] = (),
        cost: int = 0,
    ) -> Callable[[H], H]:
        """Register a handler for ``name``; sync handlers run in a thread of their own.
        ``limits`` caps how many run at once and start per period (:class:`errands.Limit`);
        ``cost``, the credits each task reserves of its owner's balance (charged when it
        completes, given back when it ends otherwise; see docs/api.md, "Credits")."""
        self._check(name, timeout_s, max_attempts, concurrency_per_owner)
        own = self._limits(f"Task type '{name}'", limits, concurrency_per_owner)
        price = self._cost(cost)

        def register(handler: H) -> H:
            self.task_types[name] = TaskType(
                name=name,
                handler=handler,
                is_async=inspect.iscoroutinefunction(handler),
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                concurrency_per_owner=concurrency_per_owner,
                limits=own,
                cost=price,
            )
            return handler

        return register

    def schedule(
        self,
        name: str,
        *,
        cron: str,
        type: str | None = None,
        tz: str = "UTC",
        input: dict[str, Any] | None = None,
        owner: str | None = None,
        priority: int = 0,
        missed: Missed = "last",
        grace_s: float = 60.0,
    ) -> Callable[[H], H]:
        """Submit a task of ``type`` at each slot of ``cron`` (five fields, or six with seconds
        first) in time zone ``tz``, once per slot across every node (see
        :mod:`errands.model.schedules`). Used as a decorator on a handler (``@app.schedule(...)``
        above ``@app.task(...)``), ``type`` defaults to that handler's task type; called with
        ``type``, it declares the schedule alone. Slots missed while errands did not run:
        ``missed="last"`` runs the latest of them, ``"skip"`` only one at most ``grace_s`` late."""
        if name in self.schedules:
            raise ConfigError(f"Schedule '{name}' is declared twice.")

        def declare(task_type: str) -> None:
            spec = ScheduleSpec(name, task_type, cron, tz, input or {}, owner, priority, missed, grace_s)
            try:
                check_schedule(spec, now=time.time())
            except BadSchedule as exc:
                raise ConfigError(f"Schedule '{name}': {exc}") from None
            self.schedules[name] = spec

        if type is not None:
            declare(type)

        def register(handler: H) -> H:
            if type is None:
                names = [t.name for t in self.task_types.values() if t.handler is handler]
                if len(names) != 1:
                    raise ConfigError(f"Schedule '{name}': put it above @app.task, or give type=.")
                declare(names[0])
            return handler

        return register

    def on(
        self, *events: str, types: list[str] | None = None, timeout_s: float | None = None
    ) -> Callable[[H], H]:
        """Register a lifecycle hook: ``fn(event: HookEvent)`` runs after each committed event
        of these types (``task.failed``, ``task.*``…), at least once, with retries, outside the
        workers. ``types`` limits it to tasks of those types. See :mod:`errands.notify.lifecycle`."""
        if not events:
            raise ConfigError("app.on() needs at least one event type, such as 'task.failed'.")
        unknown = [e for e in events if not valid_pattern(e)]
        if unknown:
            raise ConfigError(f"Unknown event type {unknown[0]!r}.")
        if "task.stream" in events:
            raise ConfigError(
                "Hooks hear a task's events, not its output: task.stream is for watches and endpoints."
            )
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
    ) -> WeChatConfig:
        """Send WeChat subscribe messages to task owners (openids) when their tasks end.

        ``appid``, ``secret`` and ``base_url`` default to ``ERRANDS_WECHAT_APPID``,
        ``ERRANDS_WECHAT_SECRET`` and ``ERRANDS_WECHAT_BASE_URL``. See :mod:`errands.notify.wechat`.
        """
        if self.wechat_config is not None:
            raise ConfigError("The WeChat channel is configured twice.")
        self.wechat_config = WeChatConfig(
            templates=tuple(templates),
            appid=appid,
            secret=secret,
            base_url=base_url,
            miniprogram_state=miniprogram_state,
            timezone=timezone,
            outcomes={**DEFAULT_OUTCOMES, **(outcomes or {})},
        )
        return self.wechat_config
