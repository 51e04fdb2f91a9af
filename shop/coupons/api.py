"""Coupon routes: the shopper's coupon centre, claims and wallet; the merchant's templates, grants and stats."""

from __future__ import annotations

import asyncpg
import msgspec
from litestar import Controller, Request, Response, get, post, put

from shop.auth_tokens import AuthAdmin, AuthUser, admin_guard
from shop.coupons import queries, service
from shop.coupons.schemas import (
    CartIn,
    CouponOut,
    CouponPage,
    CouponsForCart,
    CouponState,
    GrantIn,
    GrantOut,
    TemplateIn,
    TemplateOut,
    TemplatePage,
    TemplateStats,
    TemplateStatus,
)
from shop.db import provide_conn
from shop.errors import NotFound, ShopError
from shop.hotpath import hotpath_of
from shop.idempotency import IdempotencyKey, check_key
from shop.orders.service import price_lines, shipping_fee_for
from shop.pagination import DEFAULT_LIMIT, Limit, decode_id_cursor, encode_cursor


async def _template_page(
    request: Request, conn, *, status, cursor, limit, claimable_only=False
) -> TemplatePage:
    after = decode_id_cursor(cursor)
    rows = await queries.fetch_templates(
        conn,
        status=status,
        before_id=after,
        limit=limit + 1,
        claimable_only=claimable_only,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    claimed = await service.live_claimed(
        request.app.state.redis, request.app.state.redis_keys, [r["id"] for r in rows]
    )
    items = [service.template_out(r, claimed[r["id"]]) for r in rows]
    return TemplatePage(items=items, next_cursor=encode_cursor(rows[-1]["id"]) if more else None)


class CouponController(Controller):
    path = "/api/v1/coupons"
    tags = ["coupons"]

    @get("/templates")
    async def claimable(
        self,
        request: Request,
        user: AuthUser,
        conn: asyncpg.Connection,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> TemplatePage:
        """The coupon centre: public templates that can be claimed now or later, with what is left."""
        return await _template_page(
            request, conn, status=None, cursor=cursor, limit=limit, claimable_only=True
        )

    @post("/templates/{template_id:int}/claim")
    async def claim(
        self, request: Request, template_id: int, user: AuthUser, idempotency_key: IdempotencyKey = None
    ) -> Response[CouponOut]:
        """Claim one coupon. Refusals come from Redis alone; a 201 means the coupon is stored."""
        state = request.app.state
        key = check_key(idempotency_key)
        try:
            claimed = await service.claim_coupon(
                hotpath_of(state), state.scripts, state.redis_keys, template_id, user.id, key
            )
        except ShopError as exc:
            if exc.code == "coupon.not_ready":
                # Redis knows nothing of it: only a live template is "being restored".
                await service.explain_cold(await provide_conn(request), template_id)
            raise
        # The database connection is taken only now, for a winner.
        conn = await provide_conn(request)
        row = await queries.fetch_coupon_by_code(conn, claimed.code)
        headers = {"Idempotent-Replayed": "true"} if claimed.replayed else None
        return Response(service.coupon_out(row), status_code=201, headers=headers)

    @get("/")
    async def mine(
        self,
        user: AuthUser,
        conn: asyncpg.Connection,
        status: CouponState | None = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> CouponPage:
        """The shopper's coupons by state (available, locked, used, expired), newest first."""
        after = decode_id_cursor(cursor)
        rows = await queries.fetch_user_coupons(conn, user.id, state=status, before_id=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return CouponPage(
            items=[service.coupon_out(r) for r in rows],
            next_cursor=encode_cursor(rows[-1]["id"]) if more else None,
        )

    @get("/{coupon_id:int}")
    async def detail(self, coupon_id: int, user: AuthUser, conn: asyncpg.Connection) -> CouponOut:
        row = await queries.fetch_coupon(conn, coupon_id, user.id)
        if row is None:
            raise NotFound("Coupon not found", code="coupon.not_found")
        return service.coupon_out(row)

    @post("/for-cart", status_code=200)
    async def for_cart(self, data: CartIn, user: AuthUser, conn: asyncpg.Connection) -> CouponsForCart:
        """The shopper's coupons against a cart: usable ones best first, the others with the reason."""
        lines = await price_lines(conn, data.items)
        fee = await shipping_fee_for(conn, sum(line.line_amount for line in lines))
        usable, unusable = await service.coupons_for_cart(conn, user.id, lines, fee)
        return CouponsForCart(usable=usable, unusable=unusable)


class AdminCouponController(Controller):
    path = "/api/v1/admin/coupon-templates"
    tags = ["admin: coupons"]
    guards = [admin_guard]

    @post("/")
    async def create(self, data: TemplateIn, admin: AuthAdmin, conn: asyncpg.Connection) -> TemplateOut:
        """Create a template as a draft; activating it makes it claimable."""
        return await service.create_template(conn, data)

    @get("/")
    async def list_templates(
        self,
        request: Request,
        admin: AuthAdmin,
        conn: asyncpg.Connection,
        status: TemplateStatus | None = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> TemplatePage:
        return await _template_page(request, conn, status=status, cursor=cursor, limit=limit)

    @get("/{template_id:int}")
    async def detail(
        self, request: Request, template_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> TemplateOut:
        row = await queries.fetch_template(conn, template_id)
        if row is None:
            raise NotFound("Coupon template not found", code="coupon.template_not_found")
        claimed = await service.live_claimed(
            request.app.state.redis, request.app.state.redis_keys, [template_id]
        )
        return service.template_out(row, claimed[template_id])

    @put("/{template_id:int}")
    async def update(
        self, request: Request, template_id: int, data: TemplateIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> TemplateOut:
        """Edit (the whole form). A live template keeps its counters; its value fields are frozen."""
        state = request.app.state
        return await service.update_template(
            conn, state.redis, state.scripts, state.redis_keys, template_id, data
        )

    async def _transition(self, request: Request, conn, template_id: int, action: str) -> TemplateOut:
        state = request.app.state
        return await service.change_status(
            conn, state.redis, state.scripts, state.redis_keys, template_id, action
        )

    @post("/{template_id:int}/activate", status_code=200)
    async def activate(
        self, request: Request, template_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> TemplateOut:
        """Make it claimable: its rules and counters are written to Redis first."""
        return await self._transition(request, conn, template_id, "activate")

    @post("/{template_id:int}/pause", status_code=200)
    async def pause(
        self, request: Request, template_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> TemplateOut:
        return await self._transition(request, conn, template_id, "pause")

    @post("/{template_id:int}/end", status_code=200)
    async def end(
        self, request: Request, template_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> TemplateOut:
        return await self._transition(request, conn, template_id, "end")

    @post("/{template_id:int}/grants", status_code=200)
    async def grant(
        self, template_id: int, data: GrantIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> GrantOut:
        """Give the coupon to listed shoppers; the same grant_id again grants nobody twice."""
        result = await service.grant_batch(conn, template_id, data.grant_id, data.user_ids)
        return msgspec.convert(result, GrantOut)

    @get("/{template_id:int}/stats")
    async def stats(self, template_id: int, admin: AuthAdmin, conn: asyncpg.Connection) -> TemplateStats:
        """Issued, claimed, granted, used, expired; orders and GMV with it."""
        return await service.template_stats(conn, template_id)


ROUTES = [CouponController, AdminCouponController]
