"""`shop dev`: find or start PostgreSQL and Redis, migrate, seed the demo store, run API + worker.

The API (`shop serve`) and the worker (`shop worker`) run as child processes in their own
process group, so only this process decides when they stop: on Ctrl-C or SIGTERM it stops them
first, then the embedded servers it started, and leaves nothing running behind.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import msgspec

from shop.embedded import EmbeddedServers, ensure_database, replace_dbname, resolve_servers
from shop.settings import Settings, SettingsError, load_settings

DEV_DATABASE = "shop"
CHILD_STOP_TIMEOUT = 15.0


class Shutdown(BaseException):
    """A stop signal arrived while starting up (BaseException: no `except Exception` swallows it)."""


def _die_with_parent() -> None:
    # Linux: a child gets SIGTERM if `shop dev` itself is killed with SIGKILL, so no orphan keeps the port.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def prepare_database(settings: Settings) -> bool:
    """Migrate and, on the first run, seed the demo store; returns whether it seeded."""
    from shop.db import connect
    from shop.migrate import migrate

    conn = await connect(settings)
    try:
        applied = await migrate(conn)
        for migration in applied:
            print(f"  applied {migration.path.name}")
        # First run: the database was just created. No admin yet also covers a first seed that failed.
        first_run = any(m.version == 1 for m in applied) or not await conn.fetchval(
            "select exists (select 1 from admins)"
        )
    finally:
        await conn.close()
    if first_run:
        from shop.seed import seed

        await seed(settings)
    return first_run


def _banner(settings: Settings, servers: EmbeddedServers, args: argparse.Namespace, seeded: bool) -> str:
    from shop.seed import DEMO_ADMIN

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}"
    where = {"configured": "configured URL", "local": "local server", "embedded": "embedded, data in "}
    data = str(Path(settings.data_dir).resolve())

    def source(kind: str) -> str:
        return where[kind] + (data if kind == "embedded" else "")

    username, password = DEMO_ADMIN
    return "\n".join(
        [
            "",
            "  shop dev is running" + (" (demo store seeded)" if seeded else ""),
            f"  API          {base}/api/v1",
            f"  API docs     {base}/schema",
            f"  readiness    {base}/readyz",
            f"  demo admin   {username} / {password}   (POST {base}/api/v1/admin/auth/login)",
            f"  PostgreSQL   {_hide_password(settings.database_url)}   [{source(servers.database_source)}]",
            f"  Redis        {_hide_password(settings.redis_url)}   [{source(servers.redis_source)}]",
            "  Ctrl-C stops the API, the worker and any server started here.",
            "",
        ]
    )


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    creds, at, hostpart = authority.rpartition("@")
    if at and ":" in creds and creds.split(":", 1)[1]:
        authority = f"{creds.split(':', 1)[0]}:***@{hostpart}"
    return f"{scheme}{sep}{authority}{slash}{tail}"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _start_children(settings: Settings, args: argparse.Namespace) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "SHOP_DATABASE_URL": settings.database_url,
        "SHOP_REDIS_URL": settings.redis_url,
        "SHOP_DATA_DIR": settings.data_dir,
    }
    cli = [sys.executable, "-m", "shop.cli"]
    commands = [
        [*cli, "serve", "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)],
        [*cli, "worker"],
    ]
    return [
        # process_group=0: a terminal's Ctrl-C reaches only us; we stop the children in order.
        subprocess.Popen(command, env=env, process_group=0, preexec_fn=_die_with_parent)
        for command in commands
    ]


def _stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=CHILD_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_dev(args: argparse.Namespace) -> None:
    """Everything a developer needs, in one command; exits 0 on Ctrl-C/SIGTERM."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")
    # Fail before starting any server rather than after: the API could not bind later.
    if not _port_free(args.host, args.port):
        sys.exit(f"port {args.port} on {args.host} is in use: stop what runs there or pick --port")

    stop_requested = threading.Event()
    serving = False

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.set()
        if not serving:
            raise Shutdown(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    servers = EmbeddedServers()
    children: list[subprocess.Popen] = []
    exit_code = 0
    try:
        print("shop dev: finding PostgreSQL and Redis …", flush=True)
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        servers = resolve_servers(
            settings.database_url,
            settings.redis_url,
            data_dir=settings.data_dir,
            force_embedded=args.embedded,
        )
        if servers.database_source == "configured":
            database_url = servers.database_admin_url  # used as given
        else:
            asyncio.run(ensure_database(servers.database_admin_url, DEV_DATABASE))
            database_url = replace_dbname(servers.database_admin_url, DEV_DATABASE)
        settings = msgspec.structs.replace(settings, database_url=database_url, redis_url=servers.redis_url)

        print("shop dev: migrating …", flush=True)
        from shop.migrate import MigrationError

        try:
            seeded = asyncio.run(prepare_database(settings))
        except MigrationError as exc:
            print(f"migration failed: {exc}", file=sys.stderr)
            exit_code = 1
        else:
            serving = True
            if not stop_requested.is_set():
                exit_code = _serve(settings, servers, args, seeded, children, stop_requested)
    except Shutdown:
        pass
    finally:
        # Signals during the shutdown itself must not interrupt it half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("shop dev: stopping …", flush=True)
        _stop_children(children)
        servers.stop()
    print("shop dev: stopped", flush=True)
    sys.exit(exit_code)


def _serve(
    settings: Settings,
    servers: EmbeddedServers,
    args: argparse.Namespace,
    seeded: bool,
    children: list[subprocess.Popen],
    stop_requested: threading.Event,
) -> int:
    """Run API and worker until a stop signal (0) or until one of them dies (1)."""
    children.extend(_start_children(settings, args))
    print(_banner(settings, servers, args, seeded), flush=True)
    while not stop_requested.wait(0.5):
        failed = [child for child in children if child.poll() is not None]
        if failed:
            names = ", ".join(child.args[3] for child in failed)
            print(f"shop dev: `shop {names}` exited unexpectedly", file=sys.stderr, flush=True)
            return 1
    return 0
