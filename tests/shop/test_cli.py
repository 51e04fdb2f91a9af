"""`shop migrate`, `shop create-admin` and the migration rules, on databases created per test."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from shop.embedded import replace_dbname
from shop.migrate import MigrationError, discover, migrate
from shop.passwords import verify_password

_names = itertools.count()


@pytest.fixture
async def fresh_database(servers):
    """An empty database of its own (URL), dropped afterwards."""
    name = f"shop_cli_{os.getpid()}_{next(_names)}"
    admin = await asyncpg.connect(servers.database_admin_url)
    await admin.execute(f'drop database if exists "{name}" with (force)')
    await admin.execute(f'create database "{name}"')
    try:
        yield replace_dbname(servers.database_admin_url, name)
    finally:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


def shop(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
    return subprocess.run(
        [sys.executable, "-m", "shop.cli", *args],
        env={**clean, "SHOP_LOG_REQUESTS": "false", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _migrations(url: str) -> list[tuple]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select version, name, applied_at from schema_migrations order by version")
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


async def test_migrate_twice_is_a_no_op(fresh_database):
    first = shop("migrate", SHOP_DATABASE_URL=fresh_database)
    assert first.returncode == 0, first.stderr
    files = [m.path.name for m in discover()]
    assert first.stdout.split() == [word for name in files for word in ("applied", name)]
    recorded = await _migrations(fresh_database)
    assert [(v, n) for v, n, _ in recorded] == [(m.version, m.name) for m in discover()]

    second = shop("migrate", SHOP_DATABASE_URL=fresh_database)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "database is up to date"
    assert await _migrations(fresh_database) == recorded


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql)
    return folder


async def test_failed_migration_names_the_file_and_leaves_nothing_half_applied(fresh_database, tmp_path):
    sql_dir = _write(
        tmp_path / "sql",
        {
            "0001_ok.sql": "create table ok_table (id int primary key);",
            # The first statement succeeds, the second fails: the first must be rolled back too.
            "0002_bad.sql": "create table half_done (id int);\ninsert into ok_table values (1);\nselect 1 / 0;",
            "0003_later.sql": "create table later (id int);",
        },
    )
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(MigrationError) as info:
            await migrate(conn, sql_dir=sql_dir)
        assert "0002_bad.sql" in str(info.value)
        assert "division by zero" in str(info.value)
        assert await conn.fetchval("select to_regclass('half_done')") is None
        assert await conn.fetchval("select to_regclass('later')") is None
        assert await conn.fetchval("select count(*) from ok_table") == 0
        assert [r["version"] for r in await conn.fetch("select version from schema_migrations")] == [1]
        # The advisory lock was released: fixing the file lets the next run go on from 0002.
        (sql_dir / "0002_bad.sql").write_text("create table half_done (id int);")
        applied = await migrate(conn, sql_dir=sql_dir)
        assert [m.path.name for m in applied] == ["0002_bad.sql", "0003_later.sql"]
    finally:
        await conn.close()


def test_misnamed_migration_file_is_refused(tmp_path):
    sql_dir = _write(tmp_path / "sql", {"0001_ok.sql": "select 1;", "2_bad-name.sql": "select 1;"})
    with pytest.raises(MigrationError, match=r"2_bad-name\.sql"):
        discover(sql_dir)


async def test_concurrent_migrations_apply_each_file_once(fresh_database):
    first, second = await asyncio.gather(asyncpg.connect(fresh_database), asyncpg.connect(fresh_database))
    try:
        applied = await asyncio.gather(migrate(first), migrate(second))
    finally:
        await asyncio.gather(first.close(), second.close())
    names = sorted(m.path.name for run in applied for m in run)
    assert names == [m.path.name for m in discover()]
    assert sorted(len(run) for run in applied) == [0, len(discover())]
    assert [v for v, _, _ in await _migrations(fresh_database)] == [m.version for m in discover()]


async def test_create_admin_can_log_in(client, db, settings):
    result = shop(
        "create-admin", "night_owl", "--password", "lantern-8-moths", SHOP_DATABASE_URL=settings.database_url
    )
    assert result.returncode == 0, result.stderr
    assert "admin 'night_owl' ready" in result.stdout
    row = await db.fetchrow("select password_hash, is_active from admins where username = 'night_owl'")
    assert row["is_active"] is True
    assert row["password_hash"].startswith("scrypt$")
    assert verify_password("lantern-8-moths", row["password_hash"])
    assert not verify_password("wrong-password", row["password_hash"])
    login = await client.post(
        "/api/v1/admin/auth/login", json={"username": "night_owl", "password": "lantern-8-moths"}
    )
    assert login.status_code == 200, login.text
    assert login.json()["admin"]["username"] == "night_owl"

    # Running it again resets the password instead of failing on the unique username.
    again = shop(
        "create-admin",
        "night_owl",
        SHOP_DATABASE_URL=settings.database_url,
        SHOP_ADMIN_PASSWORD="second-password-9",
    )
    assert again.returncode == 0, again.stderr
    assert await db.fetchval("select count(*) from admins where username = 'night_owl'") == 1
    stored = await db.fetchval("select password_hash from admins where username = 'night_owl'")
    assert verify_password("second-password-9", stored)


async def test_create_admin_refuses_a_short_password(db, settings):
    result = shop("create-admin", "shorty", "--password", "1234567", SHOP_DATABASE_URL=settings.database_url)
    assert result.returncode != 0
    assert "at least 8 characters" in result.stderr
    assert await db.fetchval("select count(*) from admins") == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_serve_refuses_an_unmigrated_database(fresh_database, settings):
    result = shop(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(_free_port()),
        "--workers",
        "1",
        SHOP_DATABASE_URL=fresh_database,
        SHOP_REDIS_URL=settings.redis_url,
    )
    assert result.returncode != 0
    assert "database is not migrated" in result.stderr
    assert "run `shop migrate`" in result.stderr


async def test_worker_refuses_an_unmigrated_database(fresh_database, settings):
    result = shop("worker", SHOP_DATABASE_URL=fresh_database, SHOP_REDIS_URL=settings.redis_url)
    assert result.returncode != 0
    assert "worker refused to start" in result.stderr
    assert "run `shop migrate`" in result.stderr


def test_migrate_names_an_unreachable_database(servers):
    missing = replace_dbname(servers.database_admin_url, f"shop_missing_{os.getpid()}")
    result = shop("migrate", SHOP_DATABASE_URL=missing)
    assert result.returncode == 1
    assert "cannot reach PostgreSQL" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
