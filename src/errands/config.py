"""Settings, read from ``ERRANDS_*`` environment variables; the CLI's options override them."""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from errands.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"5s"``, ``"5m"``, ``"2h"``, ``"1d"``."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"'{text}' is not a duration (such as 30s, 5m, 2h).")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_schedule(text: str) -> tuple[float, ...]:
    """The delays before each attempt: ``"0s,5s,5m"`` is three attempts, the first at once."""
    delays = tuple(parse_duration(part) for part in text.split(",") if part.strip())
    if not delays:
        raise ConfigError("A retry schedule needs at least one attempt.")
    return delays


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"127.0.0.0/8, ::1"`` as networks (the value of ``ERRANDS_NOTIFY_ALLOW_NETWORKS``)."""
    networks = []
    for part in text.split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"'{part.strip()}' is not a network (such as 127.0.0.0/8).") from None
    return tuple(networks)


class Settings(BaseSettings):
    """Every knob of a running errands process. See ``docs/configuration.md``."""

    model_config = SettingsConfigDict(env_prefix="ERRANDS_", extra="ignore", frozen=True)

    # where and what
    db: str = "sqlite:///errands.db"
    app: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    public_url: str | None = None
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    #: One line per request (method, path without its query, status, duration) from errands.access.
    access_log: bool = False
    #: ``host:port`` of an endpoint that serves ``/metrics`` to anyone who reaches it (a private
    #: port, in any process: ``serve`` or ``worker``); the API's ``/metrics`` takes the admin key.
    metrics_listen: str | None = Field(None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}$")

    # credentials
    admin_key: SecretStr | None = None
    secret: SecretStr | None = None
    default_owner: str = "default"

    # workers
    concurrency: int = Field(10, ge=1, le=10_000)
    lease_s: float = Field(30.0, gt=0)
    heartbeat_s: float | None = Field(None, gt=0)
    poll_s: float = Field(1.0, gt=0)
    progress_interval_s: float = Field(0.25, ge=0)
    stream_flush_s: float = Field(0.02, ge=0)
    stream_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    shutdown_grace_s: float = Field(25.0, ge=0)
    retry_base_s: float = Field(1.0, ge=0)
    retry_cap_s: float = Field(300.0, ge=0)

    # task defaults and limits
    default_timeout_s: float = Field(600.0, gt=0)
    default_max_attempts: int = Field(3, ge=1)
    default_expires_in_s: float = Field(86_400.0, gt=0)
    max_manual_retries: int = Field(2, ge=0)
    max_pending_per_owner: int | None = Field(None, ge=1)

    # external providers
    provider_timeout_s: float = Field(30.0, gt=0)
    poll_concurrency: int = Field(8, ge=1)

    # sweeper
    sweep_interval_s: float = Field(5.0, gt=0)
    sweep_batch: int = Field(500, ge=1)
    retention_s: float = Field(86_400.0, ge=0)
    tombstone_s: float = Field(7 * 86_400.0, ge=0)
    # schedules: how soon a node sees a schedule another node stored (its own, at once)
    schedule_poll_s: float = Field(10.0, gt=0)

    # watches
    watch_keepalive_s: float = Field(15.0, gt=0)
    watch_buffer: int = Field(1000, ge=1)
    max_watches: int = Field(20_000, ge=1)
    max_watches_per_owner: int = Field(100, ge=1)

    # HTTP
    cors_origins: str = ""
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_json_depth: int = Field(32, ge=2)
    stats_window_s: float = Field(3600.0, gt=0)

    # SQLite
    sqlite_synchronous: str = "NORMAL"

    # notifications
    notify_schedule: str = "0s,5s,5m,30m,2h,5h,10h,10h"
    notify_jitter: float = Field(0.1, ge=0, le=0.5)
    notify_timeout_s: float = Field(15.0, gt=0, le=300)
    notify_disable_after_s: float = Field(5 * 86_400.0, gt=0)
    notify_secret: SecretStr | None = None
    notify_secret_grace_s: float = Field(86_400.0, ge=0)
    notify_allow_networks: str = ""
    notify_https_only: bool = False
    notify_concurrency: int = Field(32, ge=1, le=1000)
    notify_lease_s: float | None = Field(None, gt=0)
    notify_poll_s: float = Field(1.0, gt=0)
    hook_timeout_s: float = Field(60.0, gt=0)
    wechat_appid: str | None = None
    wechat_secret: SecretStr | None = None
    wechat_base_url: str = "https://api.weixin.qq.com"

    # PostgreSQL
    pg_pool_size: int = Field(8, ge=2, le=100)
    pg_write_lanes: int = Field(3, ge=1, le=32)
    pg_stall_timeout_s: float = Field(5.0, ge=0.1, le=3600)

    @field_validator("notify_schedule", "notify_allow_networks")
    @classmethod
    def _parses(cls, value: str, info: ValidationInfo) -> str:
        parse = parse_schedule if info.field_name == "notify_schedule" else parse_networks
        try:
            parse(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value

    @cached_property
    def retry_schedule(self) -> tuple[float, ...]:
        """``notify_schedule``, parsed (once)."""
        return parse_schedule(self.notify_schedule)

    @cached_property
    def allow_networks(self) -> tuple[IPNetwork, ...]:
        """``notify_allow_networks``, parsed (once)."""
        return parse_networks(self.notify_allow_networks)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` as ``(host, port)``."""
        if self.metrics_listen is None:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.lease_s / 3


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the non-``None`` ``overrides`` on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "a setting"
        reason = str(first["msg"]).removeprefix("Value error, ").rstrip(".")
        raise ConfigError(f"The setting {name} (ERRANDS_{name.upper()}) is not valid: {reason}.") from None
