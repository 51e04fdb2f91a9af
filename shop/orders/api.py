"""Checkout and order routes: shopper under /api/v1, merchant under /api/v1/admin."""

from __future__ import annotations

from typing import Annotated

import asyncpg
from litestar import Controller, Request, Response, get, post, put
from litestar.params import Parameter

from shop.auth_tokens import AuthAdmin, AuthUser, admin_guard
from shop.idempotency import IdempotencyKey, idempotent_response, run_idempotent
from shop.orders import service
from shop.orders.schemas import (
    CheckoutIn,
    CheckoutOut,
    OrderIn,
    OrderOut,
    OrderPage,
    OrderStatus,
    ShipIn,
    ShippingRuleIO,
)
from shop.pagination import DEFAULT_LIMIT, IdFilter, Limit, decode_id_cursor, encode_cursor


async def _page(conn, *, user_id, status, cursor, limit, query=None) -> OrderPage:
    after = decode_id_cursor(cursor)
    orders = await service.list_orders(
        conn,
        user_id=user_id,
        status=status,
        before_id=after,
        limit=limit + 1,
        query=query,
    )
    more = len(orders) > limit
    orders = orders[:limit]
    return OrderPage(items=orders, next_cursor=encode_cursor(orders[-1].id) if more else None)


class CheckoutController(Controller):
    path = "/api/v1"
    tags = ["orders"]

    @post("/checkout/preview", status_code=200)
    async def preview(self, data: CheckoutIn, user: AuthUser, conn: asyncpg.Connection) -> CheckoutOut:
        """Price a cart from the database: lines, totals, shipping fee, applicable coupons; nothing is reserved."""
        from shop.coupons.service import apply_coupon, coupons_for_cart

        lines = await service.price_lines(conn, data.items)
        items_amount = sum(line.line_amount for line in lines)
        fee = await service.shipping_fee_for(conn, items_amount)
        usable, _ = await coupons_for_cart(conn, user.id, lines, fee)
        if data.coupon_id is not None:
            lines = await apply_coupon(conn, user.id, data.coupon_id, lines, fee)
        discount = sum(line.discount_amount for line in lines)
        return CheckoutOut(
            lines=lines,
            items_amount=items_amount,
            shipping_fee=fee,
            discount_amount=discount,
            payable_amount=items_amount - discount + fee,
            discounts=[
                {
                    "coupon_id": c.coupon.id,
                    "name": c.coupon.name,
                    "discount_amount": c.discount_amount,
                    "payable_amount": c.payable_amount,
                }
                for c in usable
            ],
            coupon_id=data.coupon_id,
        )

    @post("/orders")
    async def place(
        self,
        request: Request,
        data: OrderIn,
        user: AuthUser,
        conn: asyncpg.Connection,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[OrderOut]:
        """Place an order; the same Idempotency-Key and body replay the first response."""
        settings = request.app.state.settings

        async def work():
            return 201, await service.place_order(conn, settings, user.id, data)

        outcome = await run_idempotent(
            conn, user_id=user.id, scope="orders.place", key=idempotency_key, request=data, work=work
        )
        return idempotent_response(outcome)

    @get("/orders")
    async def list_mine(
        self,
        user: AuthUser,
        conn: asyncpg.Connection,
        status: OrderStatus | None = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> OrderPage:
        """The shopper's own orders, newest first."""
        return await _page(conn, user_id=user.id, status=status, cursor=cursor, limit=limit)

    @get("/orders/{order_id:int}")
    async def detail(self, order_id: int, user: AuthUser, conn: asyncpg.Connection) -> OrderOut:
        return await service.load_order(conn, order_id, user.id)

    @post("/orders/{order_id:int}/cancel", status_code=200)
    async def cancel(self, order_id: int, user: AuthUser, conn: asyncpg.Connection) -> OrderOut:
        """Cancel an unpaid order; its units go back at once."""
        return await service.shopper_cancel(conn, order_id, user.id)

    @post("/orders/{order_id:int}/confirm", status_code=200)
    async def confirm(self, order_id: int, user: AuthUser, conn: asyncpg.Connection) -> OrderOut:
        """Confirm receipt of a shipped order."""
        return await service.complete_order(conn, order_id, user_id=user.id, by="shopper")


class AdminOrderController(Controller):
    path = "/api/v1/admin"
    tags = ["admin: orders"]
    guards = [admin_guard]

    @get("/orders")
    async def search(
        self,
        admin: AuthAdmin,
        conn: asyncpg.Connection,
        status: OrderStatus | None = None,
        user_id: IdFilter = None,
        q: Annotated[str | None, Parameter(max_length=64)] = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> OrderPage:
        """All orders, newest first; `q` is an order number prefix or a receiver phone."""
        return await _page(conn, user_id=user_id, status=status, cursor=cursor, limit=limit, query=q)

    @get("/orders/{order_id:int}")
    async def detail(self, order_id: int, admin: AuthAdmin, conn: asyncpg.Connection) -> OrderOut:
        return await service.load_order(conn, order_id)

    @post("/orders/{order_id:int}/ship", status_code=200)
    async def ship(
        self, request: Request, order_id: int, data: ShipIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> OrderOut:
        """Ship a paid order in one or more packages (carrier + tracking number each)."""
        return await service.ship_order(conn, request.app.state.settings, order_id, data)

    @post("/orders/{order_id:int}/complete", status_code=200)
    async def complete(self, order_id: int, admin: AuthAdmin, conn: asyncpg.Connection) -> OrderOut:
        return await service.complete_order(conn, order_id, by="merchant")

    @get("/settings/shipping")
    async def get_shipping(self, admin: AuthAdmin, conn: asyncpg.Connection) -> ShippingRuleIO:
        row = await conn.fetchrow("select flat_fee, free_threshold from shipping_rule where id = 1")
        return ShippingRuleIO(flat_fee=row["flat_fee"], free_threshold=row["free_threshold"])

    @put("/settings/shipping")
    async def put_shipping(
        self, data: ShippingRuleIO, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> ShippingRuleIO:
        """Flat shipping fee, free at or above `free_threshold` of goods value (null: never free)."""
        await conn.execute(
            """insert into shipping_rule (id, flat_fee, free_threshold) values (1, $1, $2)
               on conflict (id) do update set flat_fee = $1, free_threshold = $2, updated_at = now()""",
            data.flat_fee,
            data.free_threshold,
        )
        return data
