"""Prize delivery (the outbox) and units coming back to the prize stock.

The worker delivers each `prize_deliveries` row exactly once (its effect commits with its status
change; a failure is retried with backoff): coupons through `grant_coupon` (source `game`, outside
the template's public claim quota), points through the ledger, goods as a record the winner claims
with an address, which becomes a zero-price order of kind `prize`. Units that come back (an
unscratched card past its time, goods not claimed in the window) return to the prize stock once,
guarded by `game_draws.returned`; Redis is told after the commit (reconcile covers a crash between).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from shop.errors import Conflict, NotFound
from shop.keys import Keys
from shop.orders.service import register_unit_returner, return_to_sku_stock
from shop.points import earn_points
from shop.settings import Settings

log = logging.getLogger("games.delivery")


async def _return_units(redis: aioredis.Redis, keys: Keys, rows: Sequence[Any]) -> None:
    """Give units back to Redis after the guarded change committed (reconcile covers a crash in between)."""
    if not rows:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for r in rows:
            if r["stock"] is not None:
                pipe.hincrby(keys.game_state(r["game_id"]), f"s:{r['position']}", 1)
            if r["kind"] != "thanks":
                pipe.hincrby(keys.game_users(r["game_id"]), f"{r['user_id']}:w:{r['position']}", -1)
        await pipe.execute()


async def expire_cards(pool: asyncpg.Pool, redis: aioredis.Redis, keys: Keys, batch: int = 500) -> int:
    """Unscratched cards past their time: their unit returns to the prize stock exactly once."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """with due as (select id from game_draws where card_status = 'sealed' and expires_at <= now()
                            order by expires_at limit $1 for update skip locked)
               update game_draws d set card_status = 'expired', returned = true
               from due, game_prizes p
               where d.id = due.id and d.card_status = 'sealed' and not d.returned and p.id = d.prize_id
               returning d.game_id, d.user_id, d.position, p.stock, p.kind""",
            batch,
        )
    await _return_units(redis, keys, rows)
    return len(rows)


# ---------------------------------------------------------------- prize delivery (the outbox)


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(3600, 2 ** min(attempts, 12)))


async def deliver_prizes(pool: asyncpg.Pool, batch: int = 100) -> int:
    """Deliver due prizes, each exactly once (its effect commits with its status change); failures retry later."""
    from shop.coupons.service import grant_coupon

    done = 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """select d.id, d.draw_id, d.user_id, d.kind, d.attempts, p.coupon_template_id, p.points, g.claim_days
               from prize_deliveries d join game_prizes p on p.id = d.prize_id join games g on g.id = d.game_id
               where d.status = 'pending' and d.next_attempt_at <= now()
               order by d.id limit $1 for update of d skip locked""",
            batch,
        )
        for row in rows:
            ref = f"prize:{row['draw_id']}"
            try:
                async with conn.transaction():  # savepoint: one failed delivery undoes only itself
                    if row["kind"] == "coupon":
                        coupon_id = await grant_coupon(
                            conn, row["user_id"], row["coupon_template_id"], source="game", ref=ref
                        )
                        if coupon_id is None:  # granted before (a retried batch): find it
                            coupon_id = await conn.fetchval(
                                "select id from coupons where source = 'game' and source_ref = $1 and user_id = $2",
                                ref,
                                row["user_id"],
                            )
                        await conn.execute(
                            """update prize_deliveries set status = 'delivered', coupon_id = $2, delivered_at = now()
                               where id = $1""",
                            row["id"],
                            coupon_id,
                        )
                    elif row["kind"] == "points":
                        await earn_points(conn, row["user_id"], row["points"], kind="prize", ref=ref)
                        await conn.execute(
                            "update prize_deliveries set status = 'delivered', delivered_at = now() where id = $1",
                            row["id"],
                        )
                    else:  # goods: the winner claims it with an address within the claim window
                        await conn.execute(
                            """update prize_deliveries set status = 'awaiting_claim',
                                   claim_deadline = now() + make_interval(days => $2) where id = $1""",
                            row["id"],
                            row["claim_days"],
                        )
                done += 1
            except Exception as exc:
                log.warning("prize delivery %s failed: %s", row["id"], exc)
                await conn.execute(
                    """update prize_deliveries set attempts = attempts + 1, last_error = $2,
                           next_attempt_at = now() + $3 where id = $1""",
                    row["id"],
                    f"{type(exc).__name__}: {exc}"[:500],
                    _backoff(row["attempts"] + 1),
                )
    return done


async def claim_goods(
    conn: asyncpg.Connection, settings: Settings, user_id: int, delivery_id: int, address_id: int
) -> int:
    """The winner gives an address: the prize becomes a zero-price, already-paid order of kind `prize`."""
    from shop.events import record_event
    from shop.orders.schemas import PricedLine
    from shop.orders.service import create_order, take_sku_stock
    from shop.users import get_address_snapshot

    async with conn.transaction():
        address = await get_address_snapshot(conn, user_id, address_id)
        row = await conn.fetchrow(
            """update prize_deliveries set status = 'claimed', delivered_at = now()
               where id = $1 and user_id = $2 and status = 'awaiting_claim' and claim_deadline > now()
               returning game_id, prize_id""",
            delivery_id,
            user_id,
        )
        if row is None:
            status = await conn.fetchval(
                "select status from prize_deliveries where id = $1 and user_id = $2 and kind = 'goods'",
                delivery_id,
                user_id,
            )
            if status is None:
                raise NotFound("No such prize", code="game.prize_not_found")
            raise Conflict(f"The prize cannot be claimed ({status})", code="game.prize_not_claimable")
        sku = await conn.fetchrow(
            """select s.id, s.product_id, s.specs, p.title, p.category_id, coalesce(p.image_urls[1], '') as image_url
               from game_prizes g join skus s on s.id = g.sku_id join products p on p.id = s.product_id
               where g.id = $1""",
            row["prize_id"],
        )
        line = PricedLine(
            sku_id=sku["id"], product_id=sku["product_id"], title=sku["title"], specs=sku["specs"],
            image_url=sku["image_url"], unit_price=0, qty=1, line_amount=0, category_id=sku["category_id"],
        )  # fmt: skip
        await take_sku_stock(conn, [line])
        order_id = await create_order(
            conn, settings, user_id=user_id, lines=[line], address=address, shipping_fee=0, kind="prize",
            activity_id=row["game_id"], remark="game prize",
        )  # fmt: skip
        # Nothing to pay: the order goes straight to paid, ready to ship.
        await conn.execute(
            """update orders set status = 'paid', paid_at = now(), payment_provider = 'prize', updated_at = now()
               where id = $1 and status = 'pending_payment'""",
            order_id,
        )
        await record_event(conn, order_id, "order.paid", {"amount": 0, "provider": "prize"})
        await conn.execute("update prize_deliveries set order_id = $2 where id = $1", delivery_id, order_id)
    return order_id


async def expire_unclaimed_goods(
    pool: asyncpg.Pool, redis: aioredis.Redis, keys: Keys, batch: int = 500
) -> int:
    """Goods not claimed within the window: the unit returns to the prize stock once."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """with due as (select id, draw_id from prize_deliveries
                            where status = 'awaiting_claim' and claim_deadline <= now()
                            order by claim_deadline limit $1 for update skip locked),
                    gone as (update prize_deliveries d set status = 'expired' from due
                             where d.id = due.id and d.status = 'awaiting_claim' returning d.draw_id)
               update game_draws g set returned = true from gone, game_prizes p
               where g.id = gone.draw_id and not g.returned and p.id = g.prize_id
               returning g.game_id, g.user_id, g.position, p.stock, p.kind""",
            batch,
        )
    await _return_units(redis, keys, rows)
    return len(rows)


# Prize orders give their unit back to the warehouse (a refunded prize order), like normal orders.
register_unit_returner("prize", return_to_sku_stock)
