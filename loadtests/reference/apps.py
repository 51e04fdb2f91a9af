"""Reference apps for the flash-sale benchmark, served exactly like the shop (granian, 2 workers).

- `bare_jwt`: decodes the same body and verifies the same JWT, touches nothing else (the
  ceiling for a sold-out answer).
- `bare_evalsha`: decodes the same body and runs the same `flash_buy.lua` with one EVALSHA
  (no auth, no token, no PostgreSQL): the ceiling of the Redis hot path.
- `naive_for_update`: the way most open-source malls do it: verify the JWT, then in one
  PostgreSQL transaction `SELECT … FOR UPDATE` the stock row, decrement it and insert the order.

Settings come from the same SHOP_* variables as the shop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from litestar import Litestar, Request, Response, post

from shop.auth_tokens import AUD_SHOPPER, _bearer, decode_access_token
from shop.flash_sale.schemas import FlashBuyIn
from shop.hotpath import encode_payload, new_reservation_id
from shop.keys import Keys
from shop.redis import Scripts, create_redis
from shop.settings import load_settings, with_default_urls

SOLD_OUT = {"error": {"code": "flash_sale.sold_out", "message": "Sold out"}}


def redis_lifespan(settings, state: dict, script: str):
    """A reference app's lifespan: a Redis client and the SHA of the one script it runs."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis = create_redis(settings.redis_url)
        state["redis"], state["sha"] = redis, getattr(Scripts(redis), script).sha
        try:
            yield
        finally:
            await redis.aclose()

    return lifespan


def bare_jwt() -> Litestar:
    settings = with_default_urls(load_settings())

    @post("/api/v1/flash-sales/{sale_id:int}/items/{item_id:int}/orders")
    async def buy(request: Request, sale_id: int, item_id: int, data: FlashBuyIn) -> Response:
        decode_access_token(settings, _bearer(request), AUD_SHOPPER)
        return Response(SOLD_OUT, status_code=409)

    return Litestar([buy])


def bare_evalsha() -> Litestar:
    settings = with_default_urls(load_settings())
    keys = Keys(settings.redis_prefix)
    state: dict = {}

    lifespan = redis_lifespan(settings, state, "flash_buy")

    @post("/api/v1/flash-sales/{sale_id:int}/items/{item_id:int}/orders")
    async def buy(request: Request, sale_id: int, item_id: int, data: FlashBuyIn) -> Response:
        user_id = int(request.headers["x-bench-user"])
        rid, now = new_reservation_id(), int(time.time() * 1000)
        payload = encode_payload({"e": sale_id, "i": item_id, "q": data.qty, "a": data.address_id, "at": now})
        script_keys = keys.flash_buy(sale_id, item_id, user_id, None, "127.0.0.1")
        reply = await state["redis"].evalsha(
            state["sha"],
            len(script_keys),
            *script_keys,
            now,
            user_id,
            data.qty,
            rid,
            payload,
            "0",
            60,
            "",
            item_id,
        )
        if reply[0] == "ok":
            return Response({"reservation_id": rid}, status_code=201)
        return Response({"error": {"code": f"flash_sale.{reply[0]}"}}, status_code=409)

    return Litestar([buy], lifespan=[lifespan])


NAIVE_SCHEMA = """
create table if not exists naive_stock (id bigint primary key, stock integer not null check (stock >= 0));
create table if not exists naive_orders (
    id bigint generated always as identity primary key, user_id bigint not null, stock_id bigint not null,
    qty integer not null, address_id bigint not null, created_at timestamptz not null default now());
"""


def naive_for_update() -> Litestar:
    settings = with_default_urls(load_settings())
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(settings.database_url, min_size=4, max_size=20)
        try:
            yield
        finally:
            await state["pool"].close()

    @post("/api/v1/flash-sales/{sale_id:int}/items/{item_id:int}/orders")
    async def buy(request: Request, sale_id: int, item_id: int, data: FlashBuyIn) -> Response:
        claims = decode_access_token(settings, _bearer(request), AUD_SHOPPER)
        async with state["pool"].acquire() as conn, conn.transaction():
            stock = await conn.fetchval("select stock from naive_stock where id = $1 for update", item_id)
            if stock is None or stock < data.qty:
                return Response(SOLD_OUT, status_code=409)
            await conn.execute("update naive_stock set stock = stock - $2 where id = $1", item_id, data.qty)
            order_id = await conn.fetchval(
                "insert into naive_orders (user_id, stock_id, qty, address_id) values ($1, $2, $3, $4) returning id",
                int(claims["sub"]),
                item_id,
                data.qty,
                data.address_id,
            )
        return Response({"id": order_id}, status_code=201)

    return Litestar([buy], lifespan=[lifespan])
