"""The worker's hot-path job: persist every registered reservation stream, in one consumer group."""

from __future__ import annotations

import logging

from shop.hotpath.streams import (
    GROUP,
    PERSISTERS,
    STREAMS_OVER,
    consumer_name,
    persist_stream,
    register_stream,
    registered_streams,
    unregister_stream,
)
from shop.worker import JobContext, periodic

CONSUMER = consumer_name()
log = logging.getLogger("shop.hotpath")


async def persist_all_streams(ctx: JobContext, *, min_idle_ms: int | None = None) -> int:
    """One pass over every stream of every kind; returns the number of entries persisted.

    A stream whose activity is over (an ended coupon template or game) is dropped from the pass
    once nothing in it is left unacknowledged: no script adds to it any more, so polling it every
    second for ever would only grow the worker's work with every activity the shop ever ran."""
    done = 0
    for kind in sorted(PERSISTERS):
        streams = await registered_streams(ctx.redis, ctx.keys, kind)
        # Which activities are over, asked before the pass: whatever their scripts added before
        # they ended is then read by this pass. (Best effort: it never holds up the persisting.)
        try:
            ended = await _over(ctx, kind, streams)
        except Exception:
            log.warning("%s streams: could not tell which activities are over", kind, exc_info=True)
            ended = []
        for stream in streams:
            kwargs = {} if min_idle_ms is None else {"min_idle_ms": min_idle_ms}
            done += await persist_stream(ctx.redis, ctx.pool, kind, stream, consumer=CONSUMER, **kwargs)
        if ended:
            try:
                await _drop(ctx, kind, ended)
            except Exception:
                log.warning("%s streams: drained streams not dropped this pass", kind, exc_info=True)
    return done


async def _drop(ctx: JobContext, kind: str, ended: list[str]) -> None:
    dropped = [s for s in ended if (await ctx.redis.xpending(s, GROUP))["pending"] == 0]
    for stream in dropped:
        await unregister_stream(ctx.redis, ctx.keys, kind, stream)
    # An activity reopened meanwhile (a claim window extended) registered its stream after its
    # commit, perhaps just before the removal above: asked again, it is put back. (Should this
    # fail, `shop reconcile` reports the live activity's stream as unregistered; --fix restores it.)
    for stream in set(dropped) - set(await _over(ctx, kind, dropped)):
        await register_stream(ctx.redis, ctx.keys, kind, stream)


async def _over(ctx: JobContext, kind: str, streams: list[str]) -> list[str]:
    over = STREAMS_OVER.get(kind)
    if over is None or not streams:
        return []
    async with ctx.pool.acquire() as conn:
        return await over(conn, ctx.keys, streams)


@periodic("persist_reservations", every_seconds=1)
async def persist_reservations(ctx: JobContext) -> int:
    return await persist_all_streams(ctx)
