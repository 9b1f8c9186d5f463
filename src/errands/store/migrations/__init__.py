"""Versioned schema migrations, one folder per store.

Each folder holds numbered migrations (``0001_initial.sql``, ``0002_watch.sql``…) that bring an
existing database up to date step by step, and ``schema.sql``, the whole current schema, which a
fresh database gets in one go. ``tests/integration/test_migrations.py`` checks that both give the
same schema.
"""

from __future__ import annotations

import re
from importlib import resources

_NUMBERED = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of a store's numbered migrations, in order."""
    folder = resources.files(f"errands.store.migrations.{dialect}")
    found = []
    for entry in folder.iterdir():
        match = _NUMBERED.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def fresh_schema(dialect: str) -> str:
    """The whole current schema of a store, for an empty database."""
    return (
        resources.files(f"errands.store.migrations.{dialect}")
        .joinpath("schema.sql")
        .read_text(encoding="utf-8")
    )
