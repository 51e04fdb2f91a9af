"""Prize delivery (the outbox), goods prizes' units, and units coming back to the prize stock.

The worker delivers each `prize_deliveries` row exactly once (its effect commits with its status
change; a failure is retried with backoff): coupons through `grant_coupon` (source `game`, outside
the template's public claim quota), points through the ledger, goods as a record the winner claims
with an address, which becomes a zero-price order of kind `prize`. A goods prize's units are set
aside from SKU stock when the game is activated (like a flash sale's quota), a claim consumes one
of them, and settling the game gives back what no winner holds. Units that come back (an
unscratched card past its time, goods not claimed in the window) return to the prize stock once,
guarded by `game_draws.returned`; Redis is told after the commit, once per draw
(`game_return.lua`), and `restore_pending` retries what a crash or a Redis error left.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from games import engine
from shop.catalog.queries import adjust_stock, record_sales
from shop.errors import Conflict, NotFound
from shop.hotpath import persist_backlog
from shop.keys import Keys
from shop.orders.service import register_unit_returner, return_to_sku_stock
from shop.points import earn_points
from shop.settings import Settings

log = logging.getLogger("games.delivery")


async def expire_cards(pool: asyncpg.Pool, scripts: Any, keys: Keys, batch: int = 500) -> int:
    """Unscratched cards past their time: their unit returns to the prize stock exactly once."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            rows = await conn.fetch(
                """with due as (select id from game_draws where card_status = 'sealed' and expires_at <= now()
                                order by expires_at limit $1 for update skip locked)
                   update game_draws d set card_status = 'expired', returned = true, return_pending = true
                   from due, game_prizes p
                   where d.id = due.id and d.card_status = 'sealed' and not d.returned and p.id = d.prize_id
                   returning d.id, d.game_id, d.user_id, d.position, d.prize_id, p.kind""",
                batch,
            )
            await engine.hold_counters(conn, [r["game_id"] for r in rows])  # no rebuild straddles the commit
            await _release_settled_goods(conn, rows)
        await engine.after_commit(engine.return_units_to_redis(conn, scripts, keys, rows), "returned units")
    return len(rows)


# ---------------------------------------------------------------- goods prizes' units

# A game past its end is settled this long after it, so draws answered on an API host whose
# clock runs a little behind are persisted first.
SETTLE_GRACE_SECONDS = 5.0


async def _move_goods_units(
    conn: asyncpg.Connection, game_id: int, sku_units: dict[int, int], admin_id: int | None = None
) -> None:
    """units > 0: set aside from SKU stock (guarded, 409 when short); < 0: give back. Ledgered, SKU-id order."""
    for sku_id in sorted(sku_units):
        units = sku_units[sku_id]
        if units == 0:
            continue
        reason = "game prize units set aside" if units > 0 else "game prize units given back"
        entry = await adjust_stock(conn, sku_id, -units, reason, admin_id=admin_id, ref=f"game:{game_id}")
        if entry is None:
            raise Conflict(
                f"SKU {sku_id} does not have {units} units in stock to set aside for the game's prizes",
                code="game.insufficient_stock",
            )


async def set_aside_goods(conn: asyncpg.Connection, game_id: int, admin_id: int | None) -> None:
    """At activation (in its transaction): every goods prize's units out of SKU stock, or 409."""
    prizes = await conn.fetch(
        """update game_prizes set held = stock where game_id = $1 and kind = 'goods' and stock > 0
           returning sku_id, stock""",
        game_id,
    )
    per_sku: dict[int, int] = {}
    for p in prizes:
        per_sku[p["sku_id"]] = per_sku.get(p["sku_id"], 0) + p["stock"]
    await _move_goods_units(conn, game_id, per_sku, admin_id)


async def set_aside_more_goods(
    conn: asyncpg.Connection, game_id: int, prize_id: int, sku_id: int, units: int, admin_id: int | None
) -> None:
    """A live goods prize restocked (in its transaction): the added units out of SKU stock, or 409."""
    await conn.execute("update game_prizes set held = held + $2 where id = $1", prize_id, units)
    await _move_goods_units(conn, game_id, {sku_id: units}, admin_id)


async def settle_game(
    conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys, game_id: int, *, admin_id: int | None = None
) -> bool:
    """A game over (ended, or past its end): goods units no winner holds go back to SKU stock, once.

    False when it was not due or already settled. Units winners still hold (sealed cards, prizes
    awaiting their claim) stay set aside; each goes back on its own if it expires.
    """
    # Redis refuses every draw by now; every accepted one is in the stream and is persisted
    # (idempotently) before the winners' units are counted.
    await persist_backlog(redis, conn, engine.KIND, keys.game_stream(game_id))
    async with conn.transaction():
        settled = await conn.fetchval(
            """update games set settled_at = now(), updated_at = now()
               where id = $1 and settled_at is null
                 and (status = 'ended' or (status <> 'draft' and ends_at < now() - make_interval(secs => $2)))
               returning id""",
            game_id,
            SETTLE_GRACE_SECONDS,
        )
        if settled is None:
            return False
        # Lock first, count after: a claim that commits while this waits for the lock is then
        # seen both in `held` and in the count (one statement would count from its older snapshot).
        await conn.execute(
            """select 1 from game_prizes where game_id = $1 and kind = 'goods' and held > 0
               order by sku_id, id for update""",
            game_id,
        )
        prizes = await conn.fetch(
            """select p.id, p.sku_id, p.held,
                      (select count(*) from game_draws d left join prize_deliveries r on r.draw_id = d.id
                       where d.prize_id = p.id and not d.returned
                         and r.status is distinct from 'claimed') as won
               from game_prizes p where p.game_id = $1 and p.kind = 'goods' and p.held > 0
               order by p.sku_id, p.id""",
            game_id,
        )
        per_sku: dict[int, int] = {}
        for p in prizes:
            back = max(p["held"] - p["won"], 0)
            if back:
                await conn.execute("update game_prizes set held = held - $2 where id = $1", p["id"], back)
                per_sku[p["sku_id"]] = per_sku.get(p["sku_id"], 0) - back
        await _move_goods_units(conn, game_id, per_sku, admin_id)
    return True


async def settle_due_games(pool: asyncpg.Pool, redis: aioredis.Redis, keys: Keys) -> int:
    async with pool.acquire() as conn:
        due = await conn.fetch(
            """select id from games where settled_at is null and status <> 'draft'
                 and (status = 'ended' or ends_at < now() - make_interval(secs => $1))
               order by id limit 20""",
            SETTLE_GRACE_SECONDS,
        )
        done = 0
        for row in due:
            done += await settle_game(conn, redis, keys, row["id"])
    return done


async def _release_settled_goods(conn: asyncpg.Connection, returned: Sequence[Any]) -> None:
    """Goods units given back after their game was settled go to SKU stock (its prize stock is over)."""
    goods = [r for r in returned if r["kind"] == "goods"]
    if not goods:
        return
    # FOR SHARE: a settlement (which updates the row) waits for this return, or has already run.
    settled = {
        r["id"]
        for r in await conn.fetch(
            """select id from games where id = any($1::bigint[]) and settled_at is not null
               order by id for share""",
            sorted({r["game_id"] for r in goods}),
        )
    }
    for game_id in sorted(settled):
        per_sku: dict[int, int] = {}
        for prize_id in sorted(r["prize_id"] for r in goods if r["game_id"] == game_id):
            sku_id = await conn.fetchval(
                "update game_prizes set held = held - 1 where id = $1 and held > 0 returning sku_id", prize_id
            )
            if sku_id is not None:
                per_sku[sku_id] = per_sku.get(sku_id, 0) - 1
        await _move_goods_units(conn, game_id, per_sku)


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
        # The unit was set aside at activation; a game activated before goods were set aside
        # (held = 0 from the start) takes it from SKU stock now.
        if await conn.fetchval(
            "update game_prizes set held = held - 1 where id = $1 and held > 0 returning id", row["prize_id"]
        ):
            await record_sales(conn, sku["id"], 1)
        else:
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


async def expire_unclaimed_goods(pool: asyncpg.Pool, scripts: Any, keys: Keys, batch: int = 500) -> int:
    """Goods not claimed within the window: the unit returns to the prize stock once."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            rows = await conn.fetch(
                """with due as (select id, draw_id from prize_deliveries
                                where status = 'awaiting_claim' and claim_deadline <= now()
                                order by claim_deadline limit $1 for update skip locked),
                        gone as (update prize_deliveries d set status = 'expired' from due
                                 where d.id = due.id and d.status = 'awaiting_claim' returning d.draw_id)
                   update game_draws g set returned = true, return_pending = true from gone, game_prizes p
                   where g.id = gone.draw_id and not g.returned and p.id = g.prize_id
                   returning g.id, g.game_id, g.user_id, g.position, g.prize_id, p.kind""",
                batch,
            )
            await engine.hold_counters(conn, [r["game_id"] for r in rows])  # no rebuild straddles the commit
            await _release_settled_goods(conn, rows)
        await engine.after_commit(engine.return_units_to_redis(conn, scripts, keys, rows), "returned units")
    return len(rows)


# Prize orders give their unit back to the warehouse (a refunded prize order), like normal orders.
register_unit_returner("prize", return_to_sku_stock)
