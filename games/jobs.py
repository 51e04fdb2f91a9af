"""Games' background jobs: prize delivery (the outbox), expiring cards and unclaimed goods, invitation
chances, Redis steps a crash left undone, and settling the goods of games that are over."""

from __future__ import annotations

from games.delivery import deliver_prizes, expire_cards, expire_unclaimed_goods, settle_due_games
from games.engine import grant_invite_chances, restore_pending
from shop.worker import JobContext, periodic


@periodic("deliver_prizes", every_seconds=1)
async def deliver(ctx: JobContext) -> int:
    return await deliver_prizes(ctx.pool)


@periodic("expire_scratch_cards", every_seconds=30)
async def expire_scratch_cards(ctx: JobContext) -> int:
    return await expire_cards(ctx.pool, ctx.scripts, ctx.keys)


@periodic("expire_unclaimed_prizes", every_seconds=60)
async def expire_unclaimed_prizes(ctx: JobContext) -> int:
    return await expire_unclaimed_goods(ctx.pool, ctx.scripts, ctx.keys)


@periodic("grant_invite_chances", every_seconds=10)
async def invite_chances(ctx: JobContext) -> int:
    return await grant_invite_chances(ctx.pool, ctx.scripts, ctx.keys, ctx.settings)


@periodic("restore_game_counters", every_seconds=1)
async def restore_game_counters(ctx: JobContext) -> int:
    """Units given back and chances granted (order.paid grants arrive this way) into Redis."""
    return await restore_pending(ctx.pool, ctx.scripts, ctx.keys)


@periodic("settle_games", every_seconds=10)
async def settle_games(ctx: JobContext) -> int:
    return await settle_due_games(ctx.pool, ctx.redis, ctx.keys)
