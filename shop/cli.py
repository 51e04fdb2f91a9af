"""`shop dev | serve | worker | migrate | seed | reconcile | create-admin`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import sys
import tempfile

from shop.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    from shop.app import with_default_urls

    try:
        return with_default_urls(load_settings())
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")


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
        asyncio.run(_migrate(_settings()))
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
    admin_id = asyncio.run(create_admin(_settings(), args.username, password))
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


def serve(host: str, port: int, workers: int, settings: Settings | None = None) -> None:
    import uvicorn

    settings = settings or _settings()
    # Workers are spawned processes: they read settings from the environment.
    os.environ["SHOP_DATABASE_URL"] = settings.database_url
    os.environ["SHOP_REDIS_URL"] = settings.redis_url
    prepare_metrics_dir(settings.data_dir)
    uvicorn.run(
        "shop.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


def cmd_serve(args: argparse.Namespace) -> None:
    serve(args.host, args.port, args.workers)


def cmd_worker(args: argparse.Namespace) -> None:
    from shop.worker import run_worker

    asyncio.run(run_worker(_settings()))


def cmd_seed(args: argparse.Namespace) -> None:
    from shop.seed import seed

    asyncio.run(seed(_settings(), verbose=True))


def cmd_dev(args: argparse.Namespace) -> None:
    from shop.devserver import run_dev

    run_dev(args)


def cmd_reconcile(args: argparse.Namespace) -> None:
    from shop.reconcile import run_reconcile

    sys.exit(asyncio.run(run_reconcile(_settings(), fix=args.fix)))


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

    p = sub.add_parser("reconcile", help="compare Redis counters with PostgreSQL")
    p.add_argument("--fix", action="store_true", help="rebuild Redis counters from PostgreSQL")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("create-admin", help="create or reset a merchant account")
    p.add_argument("username")
    p.add_argument("--password", help="or SHOP_ADMIN_PASSWORD, or asked for")
    p.set_defaults(func=cmd_create_admin)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
