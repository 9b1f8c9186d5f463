"""Persistence: pick a store from a database URL."""

from __future__ import annotations

from errands.clock import Clock
from errands.config import Settings
from errands.errors import ConfigError
from errands.store.base import Store

__all__ = ["Store", "open_store", "sqlite_path"]


def sqlite_path(url: str) -> str | None:
    """The file path of a ``sqlite:///path`` URL (``sqlite:////abs/path`` for absolute paths)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:" or path.startswith("file::memory"):
        raise ConfigError("errands needs a SQLite file; give a path, as in sqlite:///errands.db.")
    return path


def open_store(settings: Settings, clock: Clock) -> Store:
    """A store for ``settings.db`` (not yet opened)."""
    url = settings.db
    path = sqlite_path(url)
    if path is not None:
        from errands.store.sqlite import SqliteStore

        return SqliteStore(path, clock, synchronous=settings.sqlite_synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from errands.store.postgres import PostgresStore
        except ImportError:
            raise ConfigError(
                "PostgreSQL support needs the asyncpg driver: pip install 'errands[postgres]'."
            ) from None
        return PostgresStore(
            url,
            clock,
            pool_size=settings.pg_pool_size,
            write_lanes=settings.pg_write_lanes,
            stall_s=settings.pg_stall_timeout_s,
            sweep_every_s=settings.sweep_interval_s,
        )
    raise ConfigError("The database URL must start with sqlite:/// or postgresql://.")
