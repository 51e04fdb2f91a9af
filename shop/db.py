"""asyncpg pool and the `conn` dependency."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import msgspec
from litestar import Request
from litestar.types import ASGIApp, Receive, Scope, Send

from shop.settings import Settings

log = logging.getLogger("shop.db")


def _json_text(value: object) -> str:
    return msgspec.json.encode(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python objects, and go in from dicts/lists (msgspec: several
    # times faster than the json module, same values).
    for name in ("jsonb", "json"):
        await conn.set_type_codec(name, encoder=_json_text, decoder=msgspec.json.decode, schema="pg_catalog")


@asynccontextmanager
async def session_lock(
    conn: asyncpg.Connection,
    name: str,
    *,
    wait: float | None = None,
    timed_out: Callable[[], Exception] | None = None,
) -> AsyncIterator[None]:
    """A session-level advisory lock on `name` (hashtextextended(name, 0), the same lock a
    `pg_advisory_xact_lock` on that key takes), released when done; the pool's reset releases it
    too, should the unlock not run. Taken outside a transaction: an aborted one would refuse the
    unlock. Re-entrant (a session's advisory locks are). `wait`: at most this many seconds, then
    `timed_out()` is raised; None waits for as long as the connection's own limits allow."""
    if conn.is_in_transaction():
        raise RuntimeError(f"the {name} lock must be taken outside a transaction")
    if wait is None:
        await conn.execute("select pg_advisory_lock(hashtextextended($1, 0))", name)
    else:
        try:
            # The limit is local to this short transaction; the session lock outlives its commit.
            async with conn.transaction():
                await conn.execute(
                    "select set_config('lock_timeout', $1, true)", f"{max(1, round(wait * 1000))}ms"
                )
                await conn.execute("select pg_advisory_lock(hashtextextended($1, 0))", name)
        except asyncpg.LockNotAvailableError:
            if timed_out is None:
                raise
            raise timed_out() from None
    try:
        yield
    finally:
        try:
            if not conn.is_closed():
                await conn.execute("select pg_advisory_unlock(hashtextextended($1, 0))", name)
        except Exception:  # the error that got us here matters more; closing or resetting releases it
            log.warning("lock %s not released here", name, exc_info=True)


async def hold_xact_locks(conn: asyncpg.Connection, names: list[str]) -> None:
    """Inside a transaction: the advisory locks on `names` (those session_lock takes), in sorted
    order (no deadlock between two holders of several), until the commit."""
    for name in sorted(set(names)):
        await conn.execute("select pg_advisory_xact_lock(hashtextextended($1, 0))", name)


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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The hot-path pool's reset: nothing beyond asyncpg's own rollback of an open transaction."""


async def create_hot_pool(settings: Settings, size: int = 4) -> asyncpg.Pool:
    """A few connections for the group committers alone (shop/hotpath).

    Their persisters only run statements (no session settings, locks, cursors or LISTEN), so a
    connection goes back without the full RESET query the main pool sends on every release: one
    round trip less per batch of winners.
    """
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=size,
        init=_init_connection,
        reset=_keep_session,
        # The server enforces the time limit: asyncpg's own command_timeout costs an asyncio
        # timeout per statement on the client.
        server_settings={"timezone": "UTC", "application_name": "shop-hotpath", "statement_timeout": "60s"},
    )


@asynccontextmanager
async def snapshot(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """Reads that must agree with each other (a rebuild of Redis counters): one REPEATABLE READ,
    read-only transaction, so a write committing between two of them cannot be seen by one and
    missed by the other. Inside a caller's transaction, that transaction is used as it is."""
    if conn.is_in_transaction():
        yield conn
        return
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        yield conn


class _RequestConnection:
    """At most one pooled connection per request, taken on first use and always given back."""

    __slots__ = ("conn", "pool")

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.conn: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        if self.conn is None:
            self.conn = await self.pool.acquire()
        return self.conn

    async def release(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await self.pool.release(conn)


def connection_middleware(app: ASGIApp) -> ASGIApp:
    """Releases the request's connection when the request ends, however it ends.

    A yield-dependency is not enough: when a later dependency (say, the bearer-token check)
    fails, Litestar skips the cleanup of one already resolved and the connection leaks.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        holder = _RequestConnection(scope["app"].state.pool)
        scope.setdefault("state", {})["db"] = holder
        try:
            await app(scope, receive, send)
        finally:
            await holder.release()

    return wrapped


async def provide_conn(request: Request) -> asyncpg.Connection:
    return await request.scope["state"]["db"].get()


async def connect(settings: Settings) -> asyncpg.Connection:
    """One connection for CLI commands (migrate, seed, create-admin)."""
    conn = await asyncpg.connect(settings.database_url, server_settings={"timezone": "UTC"})
    await _init_connection(conn)
    return conn
