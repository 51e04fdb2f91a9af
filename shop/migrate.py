"""Forward-only migrations: sql/NNNN_name.sql applied in order under an advisory lock."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# Any constant works; it only has to be the same for every `shop migrate`.
MIGRATION_LOCK_ID = 7_420_031


class MigrationError(Exception):
    pass


class NotMigrated(RuntimeError):
    """The database lags behind sql/: nothing may run on it until `shop migrate`."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a number")
    return migrations


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("select to_regclass('schema_migrations') is not null")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("select version from schema_migrations")}


async def pending(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[Migration]:
    done = await applied_versions(conn)
    return [m for m in discover(sql_dir) if m.version not in done]


async def migrate(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Apply pending migrations, each in its own transaction; returns what was applied."""
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """create table if not exists schema_migrations (
                   version integer primary key,
                   name text not null,
                   applied_at timestamptz not null default now())"""
        )
        applied = []
        for migration in await pending(conn, sql_dir):
            try:
                async with conn.transaction():
                    await conn.execute(migration.path.read_text())
                    await conn.execute(
                        "insert into schema_migrations (version, name) values ($1, $2)",
                        migration.version,
                        migration.name,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{migration.path.name} failed: {exc}") from exc
            applied.append(migration)
        return applied
    finally:
        await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def ensure_migrated(conn: asyncpg.Connection) -> None:
    """Refuse to run on a database that `shop migrate` has not brought up to date."""
    missing = await pending(conn)
    if missing:
        raise NotMigrated(
            f"database is not migrated ({len(missing)} pending, first {missing[0].path.name}): run `shop migrate`"
        )
