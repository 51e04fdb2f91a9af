"""Flash-sale background jobs: unsold units back to stock at the end, returned units back into Redis."""

from __future__ import annotations

from shop.flash_sale import service
from shop.worker import JobContext, periodic


def _runtime(ctx: JobContext) -> service.Runtime:
    service.bind_runtime(ctx.pool, ctx.redis, ctx.scripts, ctx.keys, ctx.settings)
    return service.Runtime(ctx.pool, ctx.redis, ctx.scripts, ctx.keys)


@periodic("settle_flash_sales", every_seconds=2)
async def settle_flash_sales(ctx: JobContext) -> int:
    _runtime(ctx)
    return await service.settle_due_sales(ctx.pool, ctx.redis, ctx.keys)


@periodic("restore_flash_returns", every_seconds=1)
async def restore_flash_returns(ctx: JobContext) -> int:
    return await service.restore_pending_returns(_runtime(ctx))
