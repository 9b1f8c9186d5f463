"""Migrations: an old database upgraded step by step has exactly the schema of a fresh install."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from errands.clock import SystemClock
from errands.config import Settings
from errands.store import open_store
from errands.store.migrations import fresh_schema, migrations
from errands.store.sqlite import statements_of as _statements
from tests.conftest import create_database, drop_database, pg_url, require_postgres


def test_every_store_has_the_same_migration_versions() -> None:
    assert [v for v, _, _ in migrations("sqlite")] == [v for v, _, _ in migrations("postgres")]
    assert [v for v, _, _ in migrations("sqlite")] == list(range(1, len(migrations("sqlite")) + 1))


def _sqlite_schema(path: Path) -> list[tuple[str, ...]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
            "AND name != 'schema_migrations' ORDER BY type, name"
        ).fetchall()
        data = conn.execute(
            "SELECT key, value FROM meta WHERE key IN ('seq', 'horizon') ORDER BY key"
        ).fetchall()
    finally:
        conn.close()
    return [(t, n, tb, re.sub(r"\s+", " ", sql or "")) for t, n, tb, sql in rows] + [tuple(r) for r in data]


def _apply_sqlite(path: Path, scripts: list[str]) -> None:
    conn = sqlite3.connect(path)
    try:
        for script in scripts:
            for statement in _statements(script):
                conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


async def test_sqlite_upgrade_path_matches_a_fresh_install(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.db"
    await open_store(Settings(db=f"sqlite:///{fresh}"), SystemClock()).migrate()
    stepwise = tmp_path / "stepwise.db"
    _apply_sqlite(stepwise, [sql for _, _, sql in migrations("sqlite")])
    assert _sqlite_schema(stepwise) == _sqlite_schema(fresh)
    # An installation at version 1 that the current errands upgrades by itself:
    old = tmp_path / "old.db"
    _apply_sqlite(old, [migrations("sqlite")[0][2]])
    conn = sqlite3.connect(old)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    conn.execute("INSERT INTO schema_migrations VALUES (1, '0001_initial.sql', 0)")
    conn.commit()
    conn.close()
    applied = await open_store(Settings(db=f"sqlite:///{old}"), SystemClock()).migrate()
    assert applied == [v for v, _, _ in migrations("sqlite")][1:]
    assert _sqlite_schema(old) == _sqlite_schema(fresh)
    assert fresh_schema("sqlite")


async def _pg_schema(url: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name LIKE 'errands_%' AND table_name != 'errands_schema_migrations' "
            "ORDER BY table_name, column_name"
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND indexname LIKE 'errands_%' "
            "AND tablename != 'errands_schema_migrations' ORDER BY indexname"
        )
        constraints = await conn.fetch(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text LIKE 'errands_%' "
            "AND conrelid::regclass::text != 'errands_schema_migrations' ORDER BY 1, 2"
        )
        options = await conn.fetch(
            "SELECT relname, reloptions FROM pg_class WHERE relname LIKE 'errands_%' AND relkind = 'r' ORDER BY relname"
        )
        data = await conn.fetch("SELECT key, value FROM errands_meta ORDER BY key")
        functions = await conn.fetch(
            "SELECT proname, pg_get_functiondef(oid) FROM pg_proc "
            "WHERE pronamespace = 'public'::regnamespace AND proname LIKE 'errands_%' ORDER BY proname"
        )
    finally:
        await conn.close()
    return {
        "columns": [tuple(r) for r in columns],
        "indexes": [tuple(r) for r in indexes],
        "constraints": [tuple(r) for r in constraints],
        "options": [(r[0], r[1]) for r in options if r[0] != "errands_schema_migrations"],
        "data": [tuple(r) for r in data],
        "functions": [tuple(r) for r in functions],
    }


@pytest.mark.postgres
async def test_postgres_upgrade_path_matches_a_fresh_install() -> None:
    import asyncpg

    require_postgres()
    names = [await create_database("errands_mig") for _ in range(3)]
    fresh, stepwise, old = (pg_url(n) for n in names)
    try:
        await open_store(Settings(db=fresh), SystemClock()).migrate()
        conn = await asyncpg.connect(stepwise)
        for _, _, sql in migrations("postgres"):
            await conn.execute(sql)
        await conn.close()
        assert await _pg_schema(stepwise) == await _pg_schema(fresh)
        conn = await asyncpg.connect(old)
        await conn.execute(migrations("postgres")[0][2])
        await conn.execute(
            "CREATE TABLE errands_schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at double precision NOT NULL); INSERT INTO errands_schema_migrations VALUES (1, '0001_initial.sql', 0)"
        )
        await conn.close()
        applied = await open_store(Settings(db=old), SystemClock()).migrate()
        assert applied == [v for v, _, _ in migrations("postgres")][1:]
        assert await _pg_schema(old) == await _pg_schema(fresh)
        assert await open_store(Settings(db=old), SystemClock()).migrate() == []
    finally:
        for name in names:
            await drop_database(name)
