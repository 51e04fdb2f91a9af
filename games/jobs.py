"""Games' background jobs: prize delivery (the outbox), expiring cards and unclaimed goods, invitation chances."""

from __future__ import annotations

from games.delivery import deliver_prizes, expire_cards, expire_unclaimed_goods
from games.engine import grant_invite_chances
from shop.worker import JobContext, periodic


@periodic("deliver_prizes", every_seconds=1)
async def deliver(ctx: JobContext) -> int:
    return await deliver_prizes(ctx.pool)


@periodic("expire_scratch_cards", every_seconds=30)
async def expire_scratch_cards(ctx: JobContext) -> int:
    return await expire_cards(ctx.pool, ctx.redis, ctx.keys)


@periodic("expire_unclaimed_prizes", every_seconds=60)
async def expire_unclaimed_prizes(ctx: JobContext) -> int:
    return await expire_unclaimed_goods(ctx.pool, ctx.redis, ctx.keys)


@periodic("grant_invite_chances", every_seconds=10)
async def invite_chances(ctx: JobContext) -> int:
    return await grant_invite_chances(ctx.pool, ctx.redis, ctx.keys, ctx.settings)
