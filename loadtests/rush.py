"""The live-stream rush, end to end: create the event, run Locust headless, check the invariants.

    python -m loadtests.rush --host http://127.0.0.1:8000 --users 1000 --quota 100

Runs against a `shop serve` (and `shop worker`) using the same SHOP_DATABASE_URL, SHOP_REDIS_URL,
SHOP_REDIS_PREFIX and SHOP_JWT_KEYS as this process. Exits non-zero when an invariant fails
(orders in PostgreSQL = units sold in Redis = min(demand, quota); no shopper above the limit)
or when Locust saw unexpected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtests.setup import check_invariants, publish_sale
from shop.settings import load_settings, with_default_urls

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=1000, help="shoppers in the live stream")
    parser.add_argument("--quota", type=int, default=100)
    parser.add_argument("--per-user-limit", type=int, default=1)
    parser.add_argument("--spawn-rate", type=float, default=200, help="shoppers joining per second")
    parser.add_argument(
        "--countdown", type=float, default=None, help="seconds until the start (default: join time + 3)"
    )
    parser.add_argument("--run-time", default=None, help="Locust run time (default: countdown + 20s)")
    args = parser.parse_args(argv)

    settings = with_default_urls(load_settings())
    countdown = args.countdown if args.countdown is not None else args.users / args.spawn_rate + 3
    sale = asyncio.run(
        publish_sale(
            settings,
            quota=args.quota,
            per_user_limit=args.per_user_limit,
            starts_in=countdown,
            user_rate_limit=5,
            ip_rate_limit=10_000_000,  # every simulated shopper comes from this one machine
        )
    )
    print(f"flash sale {sale.id}: {args.quota} units, starts in {countdown:.1f}s, {args.users} shoppers")
    run_time = args.run_time or f"{int(countdown + 20)}s"
    env = {
        **os.environ,
        "RUSH_SALE_ID": str(sale.id),
        "RUSH_ITEM_ID": str(sale.item_id),
        "RUSH_STARTS_AT": str(sale.starts_at),
        "RUSH_PER_USER_LIMIT": str(args.per_user_limit),
    }
    locust = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(HERE / "locustfile.py"),
            "--headless",
            "--host",
            args.host,
            "-u",
            str(args.users),
            "-r",
            str(args.spawn_rate),
            "-t",
            run_time,
            "--stop-timeout",
            "10",
            "--only-summary",
        ],
        env=env,
        cwd=HERE.parent,
    )
    time.sleep(2)  # the worker's persist pass (every second) for any reservation an API died on
    result = asyncio.run(check_invariants(settings, sale, demand=args.users * args.per_user_limit))
    print(
        f"orders {result.orders}, units in orders {result.units_in_orders}, sold (rows) {result.sold_column}, "
        f"sold in Redis {result.sold_in_redis}, expected {result.expected}"
    )
    failures = result.failures
    if locust.returncode != 0:
        failures.append(f"locust exited with {locust.returncode} (unexpected responses, see above)")
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("OK: every invariant holds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
