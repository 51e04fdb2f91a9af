"""The flash-sale winners' statement alone: PostgreSQL CPU and WAL per order.

    python -m loadtests.bench_persist --batch 24 --connections 2 --batches 400
                                                # SHOP_DATABASE_URL / SHOP_REDIS_URL / SHOP_REDIS_PREFIX

Publishes a sale and makes shoppers (as bench_flash does), then calls the persister
(`persist_flash_orders`, the group commit's statement) from a few connections at once, without
HTTP, Redis or the API's Python in the way. It prints orders/s, the CPU that PostgreSQL's
processes used per order (from /proc), and the WAL bytes written per order. It is the measure
behind schema changes on the winners' rows (BENCHMARKS.md). Use a database of its own: every run
adds orders.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from loadtests.bench_flash import cpu_by_process, cpu_spent
from loadtests.setup import make_shoppers, publish_sale
from shop.db import connect
from shop.flash_sale.service import persist_flash_orders
from shop.hotpath import Reservation, new_reservation_id
from shop.settings import load_settings, with_default_urls


async def run(args: argparse.Namespace) -> dict[str, float]:
    settings = with_default_urls(load_settings())
    sale = await publish_sale(settings, quota=1_000_000, per_user_limit=999, user_rate_limit=100_000)
    shoppers = await make_shoppers(settings, args.users, sale.id)
    conns = [await connect(settings) for _ in range(args.connections)]
    turn = 0

    def batch() -> list[Reservation]:
        nonlocal turn
        out = []
        now = int(time.time() * 1000)
        for _ in range(args.batch):
            user_id, _, address_id, _ = shoppers[turn % len(shoppers)]
            turn += 1
            payload = {"e": sale.id, "i": sale.item_id, "q": 1, "a": address_id, "at": now}
            out.append(Reservation(new_reservation_id(), user_id, payload))
        return out

    async def writer(conn, batches: int) -> None:
        for _ in range(batches):
            await persist_flash_orders(conn, batch())

    try:
        await writer(conns[0], 10)  # warm: prepared statement, plan, caches
        lsn = await conns[0].fetchval("select pg_current_wal_lsn()")
        before, started = cpu_by_process(), time.perf_counter()
        await asyncio.gather(*(writer(conn, args.batches) for conn in conns))
        elapsed = time.perf_counter() - started
        cpu = cpu_spent(before, cpu_by_process())
        wal = await conns[0].fetchval("select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)", lsn)
    finally:
        for conn in conns:
            await conn.close()
    orders = args.batches * args.connections * args.batch
    return {
        "orders_per_s": orders / elapsed,
        "postgres_us": cpu.get("postgres", 0.0) / orders * 1e6,
        "wal_bytes": float(wal) / orders,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=24, help="orders per statement")
    parser.add_argument("--connections", type=int, default=2, help="statements in flight at once")
    parser.add_argument("--batches", type=int, default=400, help="statements per connection")
    parser.add_argument("--users", type=int, default=2000)
    args = parser.parse_args(argv)
    r = asyncio.run(run(args))
    print(
        f"batch {args.batch}, {args.connections} connections: {r['orders_per_s']:.0f} orders/s, "
        f"PostgreSQL {r['postgres_us']:.1f} µs CPU and {r['wal_bytes']:.0f} bytes of WAL per order"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
