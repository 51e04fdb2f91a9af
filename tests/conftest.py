"""Real PostgreSQL and real Redis for every test.

The database is built from sql/ once per run; each test starts from empty tables (TRUNCATE,
measured faster here than cloning a template database per test) and gets its own Redis key
prefix, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import pytest

from shop.app import create_app
from shop.auth_tokens import AUD_ADMIN, AUD_SHOPPER, issue_access_token
from shop.db import connect
from shop.embedded import EmbeddedServers, replace_dbname, resolve_servers
from shop.migrate import migrate
from shop.passwords import hash_password
from shop.settings import Settings, load_settings

logging.getLogger("httpx").setLevel(logging.WARNING)
RUN_ID = f"{os.getpid()}"
TEST_DB = f"shop_test_{RUN_ID}"
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def servers() -> EmbeddedServers:
    found = resolve_servers(
        os.environ.get("SHOP_TEST_DATABASE_URL", ""),
        os.environ.get("SHOP_TEST_REDIS_URL", ""),
        data_dir=os.environ.get("SHOP_TEST_DATA_DIR", ".data/test"),
        # SHOP_TEST_EMBEDDED=1: throwaway servers from pip packages even when 5432/6379 answer.
        force_embedded=os.environ.get("SHOP_TEST_EMBEDDED") == "1",
    )
    yield found
    found.stop()


@pytest.fixture(scope="session")
async def database_url(servers: EmbeddedServers) -> AsyncIterator[str]:
    admin = await asyncpg.connect(servers.database_admin_url)
    try:
        await admin.execute(f'drop database if exists "{TEST_DB}" with (force)')
        await admin.execute(f'create database "{TEST_DB}"')
    finally:
        await admin.close()
    url = replace_dbname(servers.database_admin_url, TEST_DB)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        tables = await conn.fetch(
            "select tablename from pg_tables where schemaname = 'public' and tablename <> 'schema_migrations'"
        )
    finally:
        await conn.close()
    global TRUNCATE_SQL
    TRUNCATE_SQL = (
        "truncate " + ", ".join(f'"{r["tablename"]}"' for r in tables) + " restart identity cascade"
        if tables
        else ""
    )
    yield url
    admin = await asyncpg.connect(servers.database_admin_url)
    try:
        await admin.execute(f'drop database if exists "{TEST_DB}" with (force)')
    finally:
        await admin.close()


TRUNCATE_SQL = ""


@pytest.fixture
async def settings(database_url: str, servers: EmbeddedServers) -> Settings:
    prefix = f"t{RUN_ID}_{next(_prefixes)}"
    return load_settings(
        environ={},
        env="test",
        database_url=database_url,
        redis_url=servers.redis_url,
        redis_prefix=prefix,
        log_requests=False,
        db_pool_min=1,
        db_pool_max=20,
    )


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, tables emptied before the test."""
    conn = await connect(settings)
    if TRUNCATE_SQL:
        await conn.execute(TRUNCATE_SQL)
        # Single-row settings tables get their migration defaults back.
        await conn.execute("insert into shipping_rule (id) values (1)")
    yield conn
    await conn.close()


@pytest.fixture
async def app(settings: Settings, db: asyncpg.Connection):
    application = create_app(settings)
    yield application


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app on the test's own event loop, so concurrent requests really interleave on its pool."""
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as test_client:
            yield test_client
    await _drop_prefix(app.state.settings)


@contextlib.asynccontextmanager
async def running(app) -> AsyncIterator[None]:
    """Run the app's lifespan in a task of its own: fixture setup and teardown run in different tasks."""
    started, stop = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(hold())
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # re-raise the start-up failure
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except TimeoutError:
            pool = app.state.pool
            print("POOL", pool.get_size(), pool.get_idle_size())
            for t in asyncio.all_tasks():
                t.print_stack(limit=8)
            raise


async def _drop_prefix(settings: Settings) -> None:
    from shop.redis import create_redis

    redis = create_redis(settings.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
def make_user(db: asyncpg.Connection, settings: Settings) -> Callable[..., Awaitable[tuple[int, dict]]]:
    """Create a shopper directly and return (user_id, auth headers)."""

    async def factory(nickname: str = "shopper") -> tuple[int, dict[str, str]]:
        user_id = await db.fetchval("insert into users (nickname) values ($1) returning id", nickname)
        token = issue_access_token(settings, user_id, AUD_SHOPPER)
        return user_id, {"Authorization": f"Bearer {token}"}

    return factory


@pytest.fixture
async def admin_headers(db: asyncpg.Connection, settings: Settings) -> dict[str, str]:
    admin_id = await db.fetchval(
        "insert into admins (username, password_hash) values ('boss', $1) returning id",
        hash_password("correct horse battery"),
    )
    token = issue_access_token(settings, admin_id, AUD_ADMIN, username="boss")
    return {"Authorization": f"Bearer {token}"}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts real processes (shop dev, embedded servers); seconds, not milliseconds"
    )
