"""Reservation streams: what a hot-path Lua script XADDs, and the worker's side of persisting it.

Every accepted reservation (a coupon claim, a flash-sale unit, a draw) is XADDed by its Lua
script, in the same atomic step that decrements the counter, to the activity's stream (a key
in the activity's hash tag). An entry has three fields: `rid` (the reservation id, unique in
PostgreSQL), `uid` (the shopper) and `p` (the kind's payload, JSON).

The API writes the row itself before answering (shop/hotpath/commit.py). The worker reads every
stream of every registered kind in one consumer group and persists each entry again; the
persister's `ON CONFLICT (reservation id) DO NOTHING` makes entries the API already wrote
no-ops, and entries an API process died on are written. Entries another consumer read but never
acknowledged (a worker that died mid-batch) are taken over with XAUTOCLAIM once idle long enough.

Trimming: XTRIM MINID to the oldest pending entry of the group, or to the last delivered id when
nothing is pending, so an entry is only ever removed after it was acknowledged, i.e. persisted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shop.keys import Keys
from shop.randomness import random_hex

GROUP = "persist"
# An entry read by a consumer that has not acknowledged it for this long is taken over.
DEFAULT_MIN_IDLE_MS = 60_000


@dataclass(frozen=True)
class Reservation:
    id: str
    user_id: int
    payload: dict[str, Any] = field(default_factory=dict)


Persist = Callable[[asyncpg.Connection, Sequence[Reservation]], Awaitable[None]]
# stream kind -> writes many reservations in one multi-row INSERT … ON CONFLICT DO NOTHING.
PERSISTERS: dict[str, Persist] = {}


# Kinds whose persister runs one SQL statement (atomic by itself): written without BEGIN/COMMIT.
SINGLE_STATEMENT: set[str] = set()


# stream kind -> which of the given registered streams belong to activities that are over (no
# script can XADD to them any more). The worker stops polling such a stream once everything in it
# is persisted. Flash sales unregister theirs when they settle, and need no entry here.
StreamsOver = Callable[[asyncpg.Connection, Keys, Sequence[str]], Awaitable[list[str]]]
STREAMS_OVER: dict[str, StreamsOver] = {}
# How long after an activity's end (by PostgreSQL's clock) its stream is still polled: the scripts
# compare the end with the API's clock, which may run behind.
OVER_GRACE_SECONDS = 60


def register_streams_over(kind: str) -> Callable[[StreamsOver], StreamsOver]:
    def decorator(fn: StreamsOver) -> StreamsOver:
        STREAMS_OVER[kind] = fn
        return fn

    return decorator


async def streams_past_end(
    conn: asyncpg.Connection, keys: Keys, streams: Sequence[str], *, table: str, end: str
) -> list[int]:
    """The ids (from the streams' hash tags) of the activities in `table` that are gone, ended, or
    whose `end` (an SQL expression on the row `t`; NULL: no end) passed OVER_GRACE_SECONDS ago."""
    rows = await conn.fetch(
        f"""select s.id from unnest($1::bigint[]) s (id) left join {table} t on t.id = s.id
            where t.id is null or t.status = 'ended' or {end} < now() - make_interval(secs => $2)""",
        [keys.activity_id(stream) for stream in streams],
        OVER_GRACE_SECONDS,
    )
    return [row["id"] for row in rows]


def register_persister(kind: str, *, single_statement: bool = False) -> Callable[[Persist], Persist]:
    """Register the function that writes reservations of `kind` (must be idempotent per reservation id).

    `single_statement`: the function runs exactly one statement, so the group committer need not
    wrap it in a transaction (two round trips fewer per batch).
    """

    def register(func: Persist) -> Persist:
        if kind in PERSISTERS and PERSISTERS[kind] is not func:
            raise RuntimeError(f"two persisters for {kind}")
        PERSISTERS[kind] = func
        if single_statement:
            SINGLE_STATEMENT.add(kind)
        return func

    return register


def new_reservation_id() -> str:
    """Time-ordered (index locality) and unguessable: 11 hex digits of ms + 10 random hex digits."""
    return f"{int(time.time() * 1000):011x}{random_hex(10)}".upper()


def encode_payload(payload: dict[str, Any]) -> str:
    return msgspec.json.encode(payload).decode()


def parse_entry(fields: dict[str, str]) -> Reservation:
    return Reservation(fields["rid"], int(fields["uid"]), json.loads(fields.get("p") or "{}"))


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def ensure_group(redis: aioredis.Redis, stream: str) -> None:
    """Create the stream's consumer group reading from the very first entry (MKSTREAM), if missing."""
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def register_stream(redis: aioredis.Redis, keys: Keys, kind: str, stream: str) -> None:
    """Make the worker persist this stream (called when the activity goes live, and by reconcile)."""
    await ensure_group(redis, stream)
    await redis.sadd(keys.hotpath_streams(kind), stream)


async def unregister_stream(redis: aioredis.Redis, keys: Keys, kind: str, stream: str) -> None:
    await redis.srem(keys.hotpath_streams(kind), stream)


async def registered_streams(redis: aioredis.Redis, keys: Keys, kind: str) -> list[str]:
    return sorted(await redis.smembers(keys.hotpath_streams(kind)))


async def _persist_entries(
    redis: aioredis.Redis, pool: asyncpg.Pool, kind: str, stream: str, entries: list
) -> int:
    entries = [(entry_id, fields) for entry_id, fields in entries if fields]
    if not entries:
        return 0
    async with pool.acquire() as conn, conn.transaction():
        await PERSISTERS[kind](conn, [parse_entry(fields) for _, fields in entries])
    # Acknowledge only after the commit: a crash in between re-delivers, and re-persisting is a no-op.
    await redis.xack(stream, GROUP, *[entry_id for entry_id, _ in entries])
    return len(entries)


async def persist_stream(
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    kind: str,
    stream: str,
    *,
    consumer: str,
    batch: int = 100,
    min_idle_ms: int = DEFAULT_MIN_IDLE_MS,
) -> int:
    """One worker pass over one stream: take over dead consumers' entries, read new ones, persist, ack, trim."""
    try:
        return await _persist_stream(redis, pool, kind, stream, consumer, batch, min_idle_ms)
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        # The group is gone (Redis restarted, or the stream was created by XADD alone): recreate
        # it from the first entry; entries already written are no-ops when persisted again.
        await ensure_group(redis, stream)
        return await _persist_stream(redis, pool, kind, stream, consumer, batch, min_idle_ms)


async def _persist_stream(
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    kind: str,
    stream: str,
    consumer: str,
    batch: int,
    min_idle_ms: int,
) -> int:
    done = 0
    start = "0-0"
    while True:
        reply = await redis.xautoclaim(stream, GROUP, consumer, min_idle_ms, start_id=start, count=batch)
        start, claimed = reply[0], reply[1]
        done += await _persist_entries(redis, pool, kind, stream, claimed)
        if start in ("0-0", b"0-0"):
            break
    while True:
        reply = await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=batch)
        entries = reply[0][1] if reply else []
        done += await _persist_entries(redis, pool, kind, stream, entries)
        if len(entries) < batch:
            break
    await trim_acknowledged(redis, stream)
    return done


async def trim_acknowledged(redis: aioredis.Redis, stream: str) -> None:
    """Drop acknowledged entries only: MINID is the oldest pending entry, else the last delivered one."""
    pending = await redis.xpending(stream, GROUP)
    if pending["pending"]:
        min_id = pending["min"]
    else:
        groups = {g["name"]: g for g in await redis.xinfo_groups(stream)}
        min_id = groups[GROUP]["last-delivered-id"]
    # Entries added after these reads have larger ids, so they are never trimmed by this call.
    await redis.xtrim(stream, minid=min_id, approximate=False)


async def persist_backlog(redis: aioredis.Redis, conn: asyncpg.Connection, kind: str, stream: str) -> str:
    """Persist every entry still in the stream (idempotent) and return the last id written, or "0-0".

    Reconcile uses this so PostgreSQL holds every reservation up to that id before it counts.
    Nothing is acknowledged: the worker still does that in its own pass.
    """
    last = "0-0"
    start = "-"
    while True:
        entries = await redis.xrange(stream, min=start, max="+", count=1000)
        entries = [(entry_id, fields) for entry_id, fields in entries if fields]
        if not entries:
            return last
        async with conn.transaction():
            await PERSISTERS[kind](conn, [parse_entry(fields) for _, fields in entries])
        last = entries[-1][0]
        start = f"({last}"


async def count_tail(redis: aioredis.Redis, stream: str, after: str) -> tuple[int, dict[int, int]]:
    """Entries after `after`: how many, and how many per shopper."""
    total, per_user = 0, {}
    start = f"({after}"
    while True:
        entries = await redis.xrange(stream, min=start, max="+", count=1000)
        for _, fields in entries:
            uid = int(fields["uid"])
            per_user[uid] = per_user.get(uid, 0) + 1
            total += 1
        if len(entries) < 1000:
            return total, per_user
        start = f"({entries[-1][0]}"
