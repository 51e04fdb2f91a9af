"""The order flow's background jobs: timeouts, auto-confirm, event dispatch, refunds, payment closes."""

from __future__ import annotations

from shop.events import drain_order_events
from shop.orders.service import auto_confirm_orders, cancel_expired_orders
from shop.payments.service import sync_payment_closes
from shop.refunds import process_refunds, recheck_failed_refunds
from shop.worker import JobContext, periodic


@periodic("cancel_unpaid_orders", every_seconds=2)
async def cancel_unpaid_orders(ctx: JobContext) -> int:
    return await cancel_expired_orders(ctx.pool)


@periodic("auto_confirm_orders", every_seconds=60)
async def auto_confirm(ctx: JobContext) -> int:
    return await auto_confirm_orders(ctx.pool)


@periodic("dispatch_order_events", every_seconds=1)
async def dispatch_events(ctx: JobContext) -> int:
    return await drain_order_events(ctx.pool, ctx)


@periodic("send_refunds", every_seconds=3)
async def send_refunds(ctx: JobContext) -> int:
    return await process_refunds(ctx.pool, ctx.providers)


@periodic("recheck_failed_refunds", every_seconds=60)
async def recheck_refunds(ctx: JobContext) -> int:
    return await recheck_failed_refunds(ctx.pool, ctx.providers)


@periodic("close_abandoned_payments", every_seconds=10)
async def close_payments(ctx: JobContext) -> int:
    return await sync_payment_closes(ctx.pool, ctx.settings, ctx.providers)


@periodic("purge_idempotency_keys", every_seconds=3600)
async def purge_idempotency_keys(ctx: JobContext) -> int:
    """Replayable responses are kept a day: long past any client's retry window."""
    deleted = 0
    async with ctx.pool.acquire() as conn:
        while True:
            status = await conn.execute(
                """delete from idempotency_keys where ctid = any (array(
                       select ctid from idempotency_keys where created_at < now() - interval '24 hours' limit 1000))"""
            )
            count = int(status.split()[-1])
            deleted += count
            if count < 1000:
                return deleted
