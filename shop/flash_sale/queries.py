"""Flash-sale SQL: events, items, the counts Redis is rebuilt from, and stats."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

SALE_FIELDS = """id, name, live_stream, starts_at, ends_at, pay_deadline_minutes, user_rate_limit,
    ip_rate_limit, status, published_at, stopped_at, settled_at, created_at"""

# Units of an item in orders not given back to the quota (before settlement): counted from the
# rows, so a winners' batch writes no counter row that the next batch would queue behind.
SOLD = """((select coalesce(sum(o.qty), 0) from flash_sale_orders o where o.item_id = i.id)
          - (select coalesce(sum(r.qty), 0) from flash_sale_returns r where r.item_id = i.id))::int"""

ITEM_FIELDS = f"""i.id, i.flash_sale_id, i.sku_id, i.flash_price, i.quota, {SOLD} as sold, i.per_user_limit,
    i.returned_to_stock, s.product_id, p.title, coalesce(p.image_urls[1], '') as image_url,
    coalesce(s.original_price, s.price) as original_price"""

PAID_ORDER_STATES = ["paid", "shipped", "completed", "refunding", "refunded"]


async def fetch_sale(conn: asyncpg.Connection, sale_id: int, *, lock: bool = False) -> asyncpg.Record | None:
    sql = f"select {SALE_FIELDS} from flash_sales where id = $1"
    return await conn.fetchrow(sql + (" for update" if lock else ""), sale_id)


async def fetch_sales(
    conn: asyncpg.Connection, *, status: str | None, before_id: int | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""select {SALE_FIELDS} from flash_sales
            where ($1::text is null or status = $1) and ($2::bigint is null or id < $2)
            order by id desc limit $3""",
        status,
        before_id,
        limit,
    )


async def fetch_items(conn: asyncpg.Connection, sale_ids: Sequence[int]) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""select {ITEM_FIELDS} from flash_sale_items i
            join skus s on s.id = i.sku_id join products p on p.id = s.product_id
            where i.flash_sale_id = any($1::bigint[]) order by i.flash_sale_id, i.id""",
        list(sale_ids),
    )


async def fetch_showcase(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Published events not over yet, soonest first: what the shopper's list shows."""
    return await conn.fetch(
        f"""select {SALE_FIELDS} from flash_sales
            where status = 'published' and ends_at > now() order by starts_at, id limit 50"""
    )


async def bought_counts(conn: asyncpg.Connection, item_id: int) -> dict[int, int]:
    """user id -> units of this item in orders not given back to the quota."""
    rows = await conn.fetch(
        """select user_id, sum(n)::int as n from (
               select user_id, qty as n from flash_sale_orders where item_id = $1
               union all
               select user_id, -qty from flash_sale_returns where item_id = $1) t
           group by user_id having sum(n) > 0""",
        item_id,
    )
    return {r["user_id"]: r["n"] for r in rows}


async def persisted_reservations(conn: asyncpg.Connection, reservation_ids: Sequence[str]) -> list[str]:
    """Which of these reservations have their order row."""
    rows = await conn.fetch(
        "select reservation_id from flash_sale_orders where reservation_id = any($1::text[])",
        list(reservation_ids),
    )
    return [r["reservation_id"] for r in rows]


async def return_ids(conn: asyncpg.Connection, sale_id: int) -> dict[int, list[int]]:
    """item id -> ids of the item's returns."""
    out: dict[int, list[int]] = {}
    for r in await conn.fetch(
        "select id, item_id from flash_sale_returns where flash_sale_id = $1 order by id", sale_id
    ):
        out.setdefault(r["item_id"], []).append(r["id"])
    return out


async def returns_not_in(
    conn: asyncpg.Connection, sale_id: int, known: Sequence[int]
) -> list[asyncpg.Record]:
    """The sale's returns other than `known` (committed after a rebuild's snapshot)."""
    return await conn.fetch(
        """select id, flash_sale_id, item_id, user_id, qty from flash_sale_returns
           where flash_sale_id = $1 and id <> all($2::bigint[]) order by id""",
        sale_id,
        list(known),
    )


async def keyed_orders(conn: asyncpg.Connection, sale_id: int) -> list[asyncpg.Record]:
    """The sale's orders made with an Idempotency-Key (a rebuild puts the keys back into Redis)."""
    return await conn.fetch(
        """select reservation_id, item_id, user_id, qty, address_id, reserved_at, idempotency_key as key
           from flash_sale_orders where flash_sale_id = $1 and idempotency_key is not null""",
        sale_id,
    )


async def keyed_user_ids(conn: asyncpg.Connection, sale_id: int) -> list[int]:
    """The shoppers with an order made with an Idempotency-Key in the sale."""
    rows = await conn.fetch(
        """select distinct user_id from flash_sale_orders
           where flash_sale_id = $1 and idempotency_key is not null""",
        sale_id,
    )
    return [r["user_id"] for r in rows]


async def fetch_keyed_order(conn: asyncpg.Connection, sale_id: int, user_id: int, key: str) -> asyncpg.Record:
    """The order an Idempotency-Key made, with what the request asked for."""
    return await conn.fetchrow(
        """select order_id, item_id, qty, address_id from flash_sale_orders
           where flash_sale_id = $1 and user_id = $2 and idempotency_key = $3""",
        sale_id,
        user_id,
        key,
    )


async def fetch_order_id(conn: asyncpg.Connection, reservation_id: str) -> int | None:
    return await conn.fetchval(
        "select order_id from flash_sale_orders where reservation_id = $1", reservation_id
    )


async def sale_stats(conn: asyncpg.Connection, sale_id: int) -> asyncpg.Record:
    return await conn.fetchrow(
        """select count(*) as orders,
                  count(*) filter (where o.status = any($2::text[])) as paid_orders,
                  coalesce(sum(o.paid_amount) filter (where o.status = any($2::text[])), 0)::bigint as gmv,
                  count(distinct o.user_id) filter (where o.status <> 'cancelled') as buyers
           from flash_sale_items i
           join flash_sale_orders f on f.item_id = i.id
           join orders o on o.id = f.order_id
           where i.flash_sale_id = $1""",
        sale_id,
        PAID_ORDER_STATES,
    )


async def paid_units(conn: asyncpg.Connection, sale_id: int) -> dict[int, int]:
    rows = await conn.fetch(
        """select f.item_id, sum(f.qty)::int as n
           from flash_sale_items i
           join flash_sale_orders f on f.item_id = i.id
           join orders o on o.id = f.order_id
           where i.flash_sale_id = $1 and o.status = any($2::text[]) group by f.item_id""",
        sale_id,
        PAID_ORDER_STATES,
    )
    return {r["item_id"]: r["n"] for r in rows}
