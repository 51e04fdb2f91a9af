"""Flash-sale routes: the shopper's list, purchase token and buy call; the merchant's events and stats."""

from __future__ import annotations

from typing import Annotated

import asyncpg
from litestar import Controller, Request, Response, get, post, put
from litestar.params import Parameter

from shop.auth import client_ip
from shop.auth_tokens import AuthAdmin, AuthUser, admin_guard
from shop.db import provide_conn
from shop.flash_sale import queries, service
from shop.flash_sale.schemas import (
    FlashBuyIn,
    FlashSaleIn,
    FlashSaleOut,
    FlashSalePage,
    FlashSaleStats,
    FlashStatus,
    FlashTokenOut,
    ShopperFlashSales,
)
from shop.idempotency import IdempotencyKey, check_key
from shop.orders.schemas import OrderOut
from shop.pagination import DEFAULT_LIMIT, MAX_LIMIT, decode_id_cursor, encode_cursor

Limit = Annotated[int, Parameter(ge=1, le=MAX_LIMIT)]


class FlashSaleController(Controller):
    path = "/api/v1/flash-sales"
    tags = ["flash sales"]

    @get("/")
    async def current(self, request: Request) -> ShopperFlashSales:
        """Live and upcoming events with their items and what is left (cached for a second per process)."""
        return await service.showcase(request.app.state, lambda: provide_conn(request))

    @get("/{sale_id:int}/token")
    async def token(self, request: Request, sale_id: int, user: AuthUser) -> FlashTokenOut:
        """The purchase token the buy call requires; issued only while the sale is live."""
        return await service.issue_token(request.app.state, lambda: provide_conn(request), user.id, sale_id)

    @post("/{sale_id:int}/items/{item_id:int}/orders")
    async def buy(
        self,
        request: Request,
        sale_id: int,
        item_id: int,
        data: FlashBuyIn,
        user: AuthUser,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[OrderOut]:
        """Buy: refusals come from Redis (or this process's sold-out flag); a 201 means the order is stored.

        Served as a fast route (shop/fastroute.py) unless `SHOP_FAST_ROUTES=false`.
        """
        state = request.app.state
        answer = await service.buy_call(
            state,
            sale_id,
            item_id,
            user.id,
            data,
            client_ip(request, state.settings),
            check_key(idempotency_key),
        )
        if answer.body is not None:
            return Response(content=answer.body, status_code=answer.status, media_type="application/json")
        headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
        return Response(answer.order, status_code=201, headers=headers)


class AdminFlashSaleController(Controller):
    path = "/api/v1/admin/flash-sales"
    tags = ["admin: flash sales"]
    guards = [admin_guard]

    @post("/")
    async def create(
        self, request: Request, data: FlashSaleIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> FlashSaleOut:
        """Create an event as a draft; publishing sets its quota aside and makes it buyable in its window."""
        state = request.app.state
        return await service.create_sale(conn, state.redis, state.redis_keys, data)

    @get("/")
    async def list_sales(
        self,
        request: Request,
        admin: AuthAdmin,
        conn: asyncpg.Connection,
        status: FlashStatus | None = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> FlashSalePage:
        after = decode_id_cursor(cursor)
        rows = await queries.fetch_sales(conn, status=status, before_id=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        items = await queries.fetch_items(conn, [r["id"] for r in rows])
        remaining = await service.live_remaining(
            request.app.state.redis,
            request.app.state.redis_keys,
            [i for i in items if any(r["id"] == i["flash_sale_id"] and r["status"] != "draft" for r in rows)],
        )
        return FlashSalePage(
            items=[
                service.sale_out(r, [i for i in items if i["flash_sale_id"] == r["id"]], remaining)
                for r in rows
            ],
            next_cursor=encode_cursor(rows[-1]["id"]) if more else None,
        )

    @get("/{sale_id:int}")
    async def detail(
        self, request: Request, sale_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> FlashSaleOut:
        return await service.load_sale(conn, request.app.state.redis, request.app.state.redis_keys, sale_id)

    @put("/{sale_id:int}")
    async def update(
        self, request: Request, sale_id: int, data: FlashSaleIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> FlashSaleOut:
        """Edit (the whole form) until the start; quota changes move SKU stock and Redis together."""
        state = request.app.state
        return await service.update_sale(
            conn, state.redis, state.scripts, state.redis_keys, sale_id, data, admin.id
        )

    @post("/{sale_id:int}/publish", status_code=200)
    async def publish(
        self, request: Request, sale_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> FlashSaleOut:
        """Set the quota aside from SKU stock (409 when short) and warm Redis."""
        state = request.app.state
        return await service.publish_sale(
            conn, state.redis, state.scripts, state.redis_keys, sale_id, admin.id
        )

    @post("/{sale_id:int}/stop", status_code=200)
    async def stop(
        self, request: Request, sale_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> FlashSaleOut:
        """End the sale now: no purchase is accepted any more, unsold units go back to SKU stock."""
        state = request.app.state
        return await service.stop_sale(conn, state.redis, state.scripts, state.redis_keys, sale_id, admin.id)

    @get("/{sale_id:int}/stats")
    async def stats(
        self, request: Request, sale_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> FlashSaleStats:
        """Sold and remaining (Redis), orders, paid orders, GMV and buyers (PostgreSQL)."""
        return await service.sale_stats(conn, request.app.state.redis, request.app.state.redis_keys, sale_id)


ROUTES = [FlashSaleController, AdminFlashSaleController]
