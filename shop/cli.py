"""`shop dev | serve | worker | migrate | seed | create-admin`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import sys
import tempfile
from collections.abc import Coroutine
from typing import Any, TypeVar

from shop.settings import Settings, SettingsError, load_settings

T = TypeVar("T")


def _settings() -> Settings:
    from shop.settings import with_default_urls

    try:
        return with_default_urls(load_settings())
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with a one-line message instead of a traceback when a server cannot be reached."""
    import asyncpg
    import redis

    try:
        return asyncio.run(coro)
    except (OSError, asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        sys.exit(f"cannot reach PostgreSQL: {exc} (check SHOP_DATABASE_URL)")
    except redis.ConnectionError as exc:
        sys.exit(f"cannot reach Redis: {exc} (check SHOP_REDIS_URL)")


async def _migrate(settings: Settings, quiet: bool = False) -> None:
    from shop.db import connect
    from shop.migrate import migrate

    conn = await connect(settings)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    if not quiet:
        if applied:
            for m in applied:
                print(f"applied {m.path.name}")
        else:
            print("database is up to date")


def cmd_migrate(args: argparse.Namespace) -> None:
    from shop.migrate import MigrationError

    try:
        _run(_migrate(_settings()))
    except MigrationError as exc:
        sys.exit(f"migration failed: {exc}")


async def create_admin(settings: Settings, username: str, password: str) -> int:
    from shop.db import connect
    from shop.passwords import hash_password

    conn = await connect(settings)
    try:
        return await conn.fetchval(
            """insert into admins (username, password_hash) values ($1, $2)
               on conflict (username) do update set password_hash = excluded.password_hash, is_active = true
               returning id""",
            username,
            hash_password(password),
        )
    finally:
        await conn.close()


def cmd_create_admin(args: argparse.Namespace) -> None:
    password = args.password or os.environ.get("SHOP_ADMIN_PASSWORD") or getpass.getpass("password: ")
    if len(password) < 8:
        sys.exit("password must be at least 8 characters")
    admin_id = _run(create_admin(_settings(), args.username, password))
    print(f"admin {args.username!r} ready (id {admin_id})")


def prepare_metrics_dir(data_dir: str) -> str:
    """A fresh multi-process metrics folder: stale files from a previous run would be summed in."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
        tempfile.gettempdir(), f"shop-metrics-{os.getpid()}"
    )
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


async def _refuse_unmigrated(settings: Settings) -> None:
    from shop.db import connect
    from shop.migrate import NotMigrated, ensure_migrated

    conn = await connect(settings)
    try:
        await ensure_migrated(conn)
    except NotMigrated as exc:
        sys.exit(str(exc))
    finally:
        await conn.close()


def serve(host: str, port: int, workers: int, settings: Settings | None = None) -> None:
    """Serve the API with granian (ASGI, uvloop): measured ~40% above uvicorn here (BENCHMARKS.md)."""
    from granian import Granian

    settings = settings or _settings()
    _run(_refuse_unmigrated(settings))  # fail fast here, not once in every worker process
    # Each worker process builds its app from the environment (create_app reads SHOP_*).
    os.environ["SHOP_DATABASE_URL"] = settings.database_url
    os.environ["SHOP_REDIS_URL"] = settings.redis_url
    metrics_dir = prepare_metrics_dir(settings.data_dir)
    try:
        Granian(
            "shop.app:create_app",
            factory=True,
            address=host,
            port=port,
            workers=workers,
            interface="asgi",
            loop="uvloop",
            log_access=False,
            log_level="warning",
        ).serve()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def cmd_serve(args: argparse.Namespace) -> None:
    serve(args.host, args.port, args.workers)


def cmd_worker(args: argparse.Namespace) -> None:
    from shop.migrate import NotMigrated
    from shop.worker import run_worker

    try:
        _run(run_worker(_settings()))
    except NotMigrated as exc:
        sys.exit(f"worker refused to start: {exc}")


def cmd_seed(args: argparse.Namespace) -> None:
    from shop.seed import seed

    _run(seed(_settings(), verbose=True))


def cmd_reconcile(args: argparse.Namespace) -> None:
    from shop.reconcile import reconcile

    report = _run(reconcile(_settings(), fix=args.fix))
    for diff in report.found:
        print(diff)
    if not report.found:
        print("redis agrees with postgresql")
    elif args.fix and not report.remaining:
        print(f"fixed {len(report.found)} differences")
    if report.remaining:
        if args.fix:
            for diff in report.remaining:
                print(f"still different: {diff}")
        sys.exit(1)


def cmd_dev(args: argparse.Namespace) -> None:
    from shop.devserver import run_dev

    run_dev(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shop", description="Private-domain mini-store backend")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dev", help="start local servers if needed, migrate, seed, serve API + worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--embedded", action="store_true", help="always use throwaway servers from pip packages")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("serve", help="serve the API with several worker processes")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run background jobs")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="apply pending sql/*.sql migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("seed", help="create the demo store (idempotent)")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("reconcile", help="compare Redis counters with PostgreSQL (exit 1 on differences)")
    p.add_argument("--fix", action="store_true", help="rewrite the Redis counters from PostgreSQL")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("create-admin", help="create or reset a merchant account")
    p.add_argument("username")
    p.add_argument("--password", help="or SHOP_ADMIN_PASSWORD, or asked for")
    p.set_defaults(func=cmd_create_admin)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
