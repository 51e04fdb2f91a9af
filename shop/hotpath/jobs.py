"""The worker's hot-path job: persist every registered reservation stream, in one consumer group."""

from __future__ import annotations

from shop.hotpath.streams import PERSISTERS, consumer_name, persist_stream, registered_streams
from shop.worker import JobContext, periodic

CONSUMER = consumer_name()


async def persist_all_streams(ctx: JobContext, *, min_idle_ms: int | None = None) -> int:
    """One pass over every stream of every kind; returns the number of entries persisted."""
    done = 0
    for kind in sorted(PERSISTERS):
        for stream in await registered_streams(ctx.redis, ctx.keys, kind):
            kwargs = {} if min_idle_ms is None else {"min_idle_ms": min_idle_ms}
            done += await persist_stream(ctx.redis, ctx.pool, kind, stream, consumer=CONSUMER, **kwargs)
    return done


@periodic("persist_reservations", every_seconds=1)
async def persist_reservations(ctx: JobContext) -> int:
    return await persist_all_streams(ctx)
