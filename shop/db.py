"""asyncpg pool and the `conn` dependency."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
from litestar.datastructures import State

from shop.settings import Settings


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python objects, and go in from dicts/lists.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """Open the pool; session settings go through server_settings so RESET ALL cannot undo them."""
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        init=_init_connection,
        server_settings={"timezone": "UTC", "application_name": "shop"},
        command_timeout=60,
    )


async def provide_conn(state: State) -> AsyncIterator[asyncpg.Connection]:
    async with state.pool.acquire() as conn:
        yield conn


async def connect(settings: Settings) -> asyncpg.Connection:
    """One connection for CLI commands (migrate, seed, create-admin)."""
    conn = await asyncpg.connect(settings.database_url, server_settings={"timezone": "UTC"})
    await _init_connection(conn)
    return conn
