"""Coupon background jobs: writing `expired` on coupons past their validity."""

from __future__ import annotations

from shop.coupons.service import expire_coupons
from shop.worker import JobContext, periodic


@periodic("expire_coupons", every_seconds=60)
async def expire(ctx: JobContext) -> int:
    return await expire_coupons(ctx.pool)
