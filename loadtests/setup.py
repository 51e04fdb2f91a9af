"""Shared set-up for the load tests: a published flash sale and shoppers, written straight to the shop's stores."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis

from shop.auth_tokens import AUD_SHOPPER, issue_access_token
from shop.db import connect
from shop.flash_sale import service
from shop.flash_sale.queries import SOLD
from shop.flash_sale.schemas import FlashItemIn, FlashSaleIn
from shop.keys import Keys
from shop.redis import Scripts, create_redis
from shop.settings import Settings


@dataclass(frozen=True)
class Sale:
    id: int
    item_id: int
    sku_id: int
    quota: int
    per_user_limit: int
    starts_at: float  # unix seconds


async def make_sku(conn: asyncpg.Connection, stock: int) -> int:
    category = await conn.fetchval("select id from categories order by id limit 1") or await conn.fetchval(
        "insert into categories (name) values ('直播') returning id"
    )
    product = await conn.fetchval(
        """insert into products (category_id, title, image_urls, status, min_price)
           values ($1, '直播秒杀 压测', array['https://img.example/p.jpg'], 'on_shelf', 9900) returning id""",
        category,
    )
    return await conn.fetchval(
        "insert into skus (product_id, code, specs, price, stock) values ($1, $2, '{}', 9900, $3) returning id",
        product,
        f"LOAD{time.time_ns()}",
        stock,
    )


async def publish_sale(
    settings: Settings,
    *,
    quota: int,
    per_user_limit: int = 1,
    starts_in: float = 0.0,
    duration: float = 3600.0,
    user_rate_limit: int = 5,
    ip_rate_limit: int = 10_000_000,
) -> Sale:
    """A new SKU with exactly the quota in stock, and a published event on it."""
    conn = await connect(settings)
    redis = create_redis(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    try:
        sku_id = await make_sku(conn, quota)
        starts = datetime.now(UTC) + timedelta(seconds=starts_in)
        data = FlashSaleIn(
            name="直播秒杀 压测",
            starts_at=starts,
            ends_at=starts + timedelta(seconds=duration),
            items=[FlashItemIn(sku_id=sku_id, flash_price=990, quota=quota, per_user_limit=per_user_limit)],
            user_rate_limit=user_rate_limit,
            ip_rate_limit=ip_rate_limit,
        )
        sale = await service.create_sale(conn, redis, keys, data)
        sale = await service.publish_sale(conn, redis, Scripts(redis), keys, sale.id, None)
        return Sale(sale.id, sale.items[0].id, sku_id, quota, per_user_limit, starts.timestamp())
    finally:
        await redis.aclose()
        await conn.close()


async def make_shoppers(settings: Settings, n: int, sale_id: int) -> list[tuple[int, str, int, str]]:
    """n shoppers with an address: (user id, access token, address id, purchase token)."""
    conn = await connect(settings)
    try:
        rows = await conn.fetch(
            "insert into users (nickname) select 'load' || g from generate_series(1, $1) g returning id", n
        )
        ids = [r["id"] for r in rows]
        addresses = await conn.fetch(
            """insert into addresses (user_id, receiver, phone, province, city, district, detail, is_default)
               select u, '张三', '13800138000', '广东省', '深圳市', '南山区', '科技园 1 号', true
               from unnest($1::bigint[]) u returning id, user_id""",
            ids,
        )
    finally:
        await conn.close()
    address = {r["user_id"]: r["id"] for r in addresses}
    expires = int(time.time()) + 3600
    return [
        (
            uid,
            issue_access_token(settings, uid, AUD_SHOPPER),
            address[uid],
            service.make_token(settings, uid, sale_id, expires),
        )
        for uid in ids
    ]


@dataclass(frozen=True)
class Invariants:
    orders: int
    units_in_orders: int
    sold_in_redis: int
    expected: int
    over_limit: list[int]
    sold_column: int

    @property
    def failures(self) -> list[str]:
        out = []
        if not (self.units_in_orders == self.sold_in_redis == self.sold_column == self.expected):
            out.append(
                f"units in PostgreSQL orders {self.units_in_orders}, sold (rows) {self.sold_column}, "
                f"sold in Redis {self.sold_in_redis}, expected min(demand, quota) = {self.expected}"
            )
        if self.over_limit:
            out.append(f"shoppers above the per-user limit: {self.over_limit[:10]}")
        return out


async def check_invariants(settings: Settings, sale: Sale, demand: int) -> Invariants:
    """Orders in PostgreSQL = units sold in Redis = min(demand, quota); no shopper above the limit."""
    conn = await connect(settings)
    redis: aioredis.Redis = create_redis(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    try:
        orders, units = await conn.fetchrow(
            "select count(*), coalesce(sum(qty), 0) from flash_sale_orders where item_id = $1", sale.item_id
        )
        sold_column = await conn.fetchval(
            f"select {SOLD} from flash_sale_items i where id = $1", sale.item_id
        )
        over = await conn.fetch(
            """select user_id from flash_sale_orders where item_id = $1 group by user_id having sum(qty) > $2""",
            sale.item_id,
            sale.per_user_limit,
        )
        remaining = int(await redis.hget(keys.flash_item(sale.id, sale.item_id), "remaining"))
    finally:
        await redis.aclose()
        await conn.close()
    return Invariants(
        orders=orders,
        units_in_orders=units,
        sold_in_redis=sale.quota - remaining,
        expected=min(demand, sale.quota),
        over_limit=[r["user_id"] for r in over],
        sold_column=sold_column,
    )
