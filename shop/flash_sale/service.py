"""Flash sales: events and their quota, the purchase hot path, giving units back, settlement, reconcile.

Publishing moves each item's quota out of SKU stock in PostgreSQL (a guarded UPDATE) and warms
Redis. A purchase is one `flash_buy.lua` call (idempotency, per-shopper and per-IP rate limits,
window, stock, per-shopper limit, decrement, XADD); losers are answered from Redis alone, or
from a per-process sold-out flag without even that. Winners' orders are group-committed
(`persist_flash_orders`, a few multi-row statements per batch) before the 201; the worker
persists what an API process died on. Units come back (timeout, cancel, refund) through the
order's unit returner, once, guarded by the order's status change; Redis gets them back through
`flash_return.lua`, idempotent per return id. When the event ends its unsold units go back to
SKU stock, once (`settle_sale`). `shop reconcile` rebuilds every counter from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from shop.db import session_lock, snapshot
from shop.errors import (
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    ShopError,
    Unavailable,
    ValidationFailed,
    is_outage,
)
from shop.events import subscribed
from shop.flash_sale import queries
from shop.flash_sale.schemas import (
    FlashBuyIn,
    FlashItemOut,
    FlashItemStats,
    FlashSaleIn,
    FlashSaleOut,
    FlashSaleStats,
    FlashTokenOut,
    ShopperFlashSaleOut,
    ShopperFlashSales,
    ShopperItemOut,
)
from shop.hotpath import (
    HotPath,
    Reservation,
    ScriptsNotSent,
    encode_payload,
    hotpath_of,
    new_reservation_id,
    persist_backlog,
    register_persister,
    register_stream,
    registered_streams,
    unregister_stream,
)
from shop.idempotency import key_mismatch
from shop.keys import Keys
from shop.orders.schemas import OrderLineOut, OrderOut
from shop.orders.service import (
    ORDER_FIELDS,
    AfterCommit,
    load_order,
    register_unit_returner,
    return_to_sku_stock,
)
from shop.reconcile import Difference, ReconcileContext, per_user_differences, register_checker
from shop.settings import Settings
from shop.users import get_address_snapshot

log = logging.getLogger("shop.flash_sale")

KIND = "flash_sale"  # the hot-path stream kind (and the order kind)
IDEMPOTENCY_TTL = 24 * 3600
# The worker settles an event this long after its end, so purchases answered on an API host whose
# clock runs a little behind are persisted first.
SETTLE_GRACE_SECONDS = 5.0
# A settled event's Redis keys (state, items, buyers, returns, stream) are kept this long for
# anyone still looking, then expire: nothing reads them for the sale any more.
SETTLED_KEYS_TTL_SECONDS = 86_400

REFUSALS = {
    "not_found": (NotFound, "flash_sale.not_found", "No such flash sale item"),
    "not_started": (Conflict, "flash_sale.not_started", "The flash sale has not started yet"),
    "ended": (Conflict, "flash_sale.ended", "The flash sale has ended"),
    "sold_out": (Conflict, "flash_sale.sold_out", "Sold out"),
    "limit_exceeded": (Conflict, "flash_sale.limit_exceeded", "You have already bought the maximum"),
}


def now_ms() -> int:
    return int(time.time() * 1000)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


# ---------------------------------------------------------------- events (merchant)


def check_sale(data: FlashSaleIn) -> None:
    problems: list[tuple[str, str]] = []
    for name in ("starts_at", "ends_at"):
        if getattr(data, name).tzinfo is None:
            problems.append((name, "must include a time zone"))
    if not problems and data.ends_at <= data.starts_at:
        problems.append(("ends_at", "must be after starts_at"))
    skus = [item.sku_id for item in data.items]
    if len(set(skus)) != len(skus):
        problems.append(("items", "each SKU may appear once"))
    if problems:
        raise ValidationFailed(
            "; ".join(f"{f}: {m}" for f, m in problems),
            details=[{"field": f, "message": m} for f, m in problems],
        )


async def _check_skus(conn: asyncpg.Connection, data: FlashSaleIn) -> None:
    wanted = [item.sku_id for item in data.items]
    found = {r["id"] for r in await conn.fetch("select id from skus where id = any($1::bigint[])", wanted)}
    missing = [s for s in wanted if s not in found]
    if missing:
        raise NotFound(f"SKU {missing[0]} does not exist", code="catalog.sku_not_found")


_ITEM_FIELDS = (
    "id", "sku_id", "product_id", "title", "image_url", "original_price", "flash_price", "quota", "per_user_limit",
)  # fmt: skip


def _item_fields(item: asyncpg.Record) -> dict[str, Any]:
    """The item fields the merchant's and the shopper's views share."""
    return {name: item[name] for name in _ITEM_FIELDS}


def sale_out(
    row: asyncpg.Record, items: Sequence[asyncpg.Record], remaining: dict[int, int | None]
) -> FlashSaleOut:
    return FlashSaleOut(
        **dict(row),
        items=[FlashItemOut(**_item_fields(i), remaining=remaining.get(i["id"])) for i in items],
    )


async def live_remaining(redis: aioredis.Redis, keys: Keys, items: Sequence[Any]) -> dict[int, int | None]:
    """item id -> what Redis may still sell (None: Redis does not hold it)."""
    if not items:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for item in items:
            pipe.hget(keys.flash_item(item["flash_sale_id"], item["id"]), "remaining")
        values = await pipe.execute()
    return {item["id"]: (int(v) if v is not None else None) for item, v in zip(items, values, strict=True)}


async def load_sale(
    conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys, sale_id: int
) -> FlashSaleOut:
    row = await queries.fetch_sale(conn, sale_id)
    if row is None:
        raise NotFound("Flash sale not found", code="flash_sale.not_found")
    items = await queries.fetch_items(conn, [sale_id])
    remaining = await live_remaining(redis, keys, items) if row["status"] != "draft" else {}
    return sale_out(row, items, remaining)


SALE_COLUMNS = [
    "name",
    "live_stream",
    "starts_at",
    "ends_at",
    "pay_deadline_minutes",
    "user_rate_limit",
    "ip_rate_limit",
]


async def create_sale(
    conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys, data: FlashSaleIn
) -> FlashSaleOut:
    """A draft: nothing is set aside until it is published."""
    check_sale(data)
    async with conn.transaction():
        await _check_skus(conn, data)
        sale_id = await conn.fetchval(
            f"""insert into flash_sales ({", ".join(SALE_COLUMNS)}) values ($1, $2, $3, $4, $5, $6, $7)
                returning id""",
            *[getattr(data, c) for c in SALE_COLUMNS],
        )
        await _insert_items(conn, sale_id, data.items)
    return await load_sale(conn, redis, keys, sale_id)


async def _insert_items(conn: asyncpg.Connection, sale_id: int, items: Sequence[Any]) -> None:
    await conn.execute(
        """insert into flash_sale_items (flash_sale_id, sku_id, flash_price, quota, per_user_limit)
           select $1, u.sku, u.price, u.quota, u.lim
           from unnest($2::bigint[], $3::int[], $4::int[], $5::int[]) as u (sku, price, quota, lim)""",
        sale_id,
        [i.sku_id for i in items],
        [i.flash_price for i in items],
        [i.quota for i in items],
        [i.per_user_limit for i in items],
    )


async def _move_stock(
    conn: asyncpg.Connection, sale_id: int, sku_id: int, units: int, admin_id: int | None
) -> None:
    """units > 0: set aside from SKU stock (guarded, 409 when short); < 0: give back. Ledgered."""
    if units == 0:
        return
    left = await conn.fetchval(
        "update skus set stock = stock - $2, updated_at = now() where id = $1 and stock >= $2 returning stock",
        sku_id,
        units,
    )
    if left is None:
        raise Conflict(
            f"SKU {sku_id} does not have {units} units in stock to set aside",
            code="flash_sale.insufficient_stock",
        )
    await conn.execute(
        """insert into stock_ledger (sku_id, delta, reason, stock_after, admin_id, ref)
           values ($1, $2, $3, $4, $5, $6)""",
        sku_id,
        -units,
        "flash sale quota set aside" if units > 0 else "flash sale quota given back",
        left,
        admin_id,
        f"flash_sale:{sale_id}",
    )


def _state_args(row: Any) -> list[Any]:
    return [
        "status",
        row["status"],
        "starts_ms",
        _ms(row["starts_at"]),
        "ends_ms",
        _ms(row["ends_at"]),
        "user_rate",
        row["user_rate_limit"],
        "ip_rate",
        row["ip_rate_limit"],
    ]


def _item_keys(keys: Keys, sale_id: int, item_id: int) -> list[str]:
    return [
        keys.flash_item(sale_id, item_id),
        keys.flash_bought(sale_id, item_id),
        keys.flash_stream(sale_id),
        keys.flash_returned(sale_id, item_id),
    ]


async def rebuild_sale(
    conn: asyncpg.Connection, redis: aioredis.Redis, scripts: Any, keys: Keys, sale_id: int
) -> None:
    """Write the event's rules and counters from PostgreSQL (the truth)."""
    stream = keys.flash_stream(sale_id)
    # Everything the stream holds goes to PostgreSQL first, so the counts include it; entries
    # added after `last` are taken on top by the script.
    last = await persist_backlog(redis, conn, KIND, stream)
    async with snapshot(conn):  # one snapshot: a return committing meanwhile is counted once or not at all
        row = await queries.fetch_sale(conn, sale_id)
        items = await queries.fetch_items(conn, [sale_id])
        returns = await queries.return_ids(conn, sale_id)
        bought = {item["id"]: await queries.bought_counts(conn, item["id"]) for item in items}
        keyed = await queries.keyed_orders(conn, sale_id)
        # Entries after `last` that an API process wrote between persist_backlog and this
        # snapshot are counted by it already: the script must not take them on top again. (An
        # entry added after this XRANGE was committed after the snapshot began.)
        tail = [fields["rid"] for _, fields in await redis.xrange(stream, min=f"({last}", max="+")]
        counted = await queries.persisted_reservations(conn, tail) if tail else []
    ends_in = max(0, int((row["ends_at"] - datetime.now(UTC)).total_seconds()))
    async with redis.pipeline(transaction=False) as pipe:
        # Idempotency-Keys of orders back in Redis (a no-op where Redis still has them).
        for k in keyed:
            payload = _payload(
                sale_id, k["item_id"], k["qty"], k["address_id"], _ms(k["reserved_at"]), k["key"]
            )
            record = f"{k['reservation_id']}\n{_fingerprint(k['item_id'], k['qty'], k['address_id'])}\n"
            pipe.set(
                keys.flash_idem(sale_id, k["user_id"], k["key"]),
                record + encode_payload(payload),
                ex=IDEMPOTENCY_TTL + ends_in,
                nx=True,
            )
        if keyed:
            pipe.sadd(keys.flash_keyed(sale_id), *{k["user_id"] for k in keyed})
            pipe.expire(keys.flash_keyed(sale_id), IDEMPOTENCY_TTL + ends_in)
        await pipe.execute()
    for item in items:
        pairs: list[Any] = []
        for user_id, n in bought[item["id"]].items():
            pairs += [user_id, n]
        await scripts.flash_warm_item(
            keys=_item_keys(keys, sale_id, item["id"]),
            args=[
                "rebuild",
                item["quota"] - item["sold"],
                item["per_user_limit"],
                item["flash_price"],
                item["quota"],
                last,
                item["id"],
                len(returns.get(item["id"], [])),
                *returns.get(item["id"], []),
                len(counted),
                *counted,
                *pairs,
            ],
        )
    await redis.hset(keys.flash_state(sale_id), mapping=dict(zip(*[iter(_state_args(row))] * 2, strict=True)))
    await register_stream(redis, keys, KIND, stream)
    counted_returns = [i for ids in returns.values() for i in ids]
    await _mark_returns_done(conn, counted_returns)
    # Returns committed after the snapshot: the warm reset their item's markers, so each is
    # applied now exactly once (again, if it had reached the counters the warm overwrote).
    late = [tuple(r) for r in await queries.returns_not_in(conn, sale_id, counted_returns)]
    await _mark_returns_done(conn, await _returns_to_redis(scripts, keys, late))


# How long an admin call waits for another writer of the same event (another admin's call, a
# settle, a long `reconcile --fix`) before it is told to try again: a 409, not the pool's command
# timeout (a 500).
ADMIN_LOCK_WAIT_SECONDS = 20.0


def _busy() -> Conflict:
    return Conflict(
        "Another change to this flash sale is in progress; try again shortly", code="flash_sale.busy"
    )


def sale_lock(conn: asyncpg.Connection, sale_id: int, *, wait: float | None = None):
    """One writer of an event's rules and counters in Redis at a time: publishing, an edit
    (including the rebuild after a failed one), settling and `shop reconcile --fix`. Each of them
    reads PostgreSQL and then writes Redis; interleaved, a slower one could write back what the
    other had just changed (an edit's lowered quota, a settled event's "ended"). A session lock
    (shop.db.session_lock), taken before any row lock. `wait`: at most this many seconds, then
    409 `flash_sale.busy` (admin calls); None waits for as long as the connection's own limits
    allow (the worker's pool: its command timeout; reconcile: no limit)."""
    return session_lock(conn, f"flash_sale:{sale_id}", wait=wait, timed_out=_busy)


async def publish_sale(
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    scripts: Any,
    keys: Keys,
    sale_id: int,
    admin_id: int | None,
) -> FlashSaleOut:
    """draft -> published: quota out of SKU stock (guarded), then Redis warmed."""
    async with sale_lock(conn, sale_id, wait=ADMIN_LOCK_WAIT_SECONDS):
        async with conn.transaction():
            row = await conn.fetchrow(
                """update flash_sales set status = 'published', published_at = now(), updated_at = now()
                   where id = $1 and status = 'draft' and ends_at > now() returning id""",
                sale_id,
            )
            if row is None:
                existing = await queries.fetch_sale(conn, sale_id)
                if existing is None:
                    raise NotFound("Flash sale not found", code="flash_sale.not_found")
                if existing["status"] == "draft":
                    raise Conflict("The flash sale's end is already past", code="flash_sale.ended")
                raise Conflict(
                    f"Cannot publish a flash sale that is {existing['status']}",
                    code="flash_sale.illegal_transition",
                )
            items = await queries.fetch_items(conn, [sale_id])
            for item in sorted(items, key=lambda i: i["sku_id"]):  # SKU-id order, like every stock writer
                await _move_stock(conn, sale_id, item["sku_id"], item["quota"], admin_id)
        # After the commit: Redis never sells units PostgreSQL has not set aside. If this fails,
        # purchases answer 503 until `shop reconcile --fix` warms it.
        await rebuild_sale(conn, redis, scripts, keys, sale_id)
        return await load_sale(conn, redis, keys, sale_id)


async def update_sale(
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    scripts: Any,
    keys: Keys,
    sale_id: int,
    data: FlashSaleIn,
    admin_id: int | None,
) -> FlashSaleOut:
    """Edit (the whole form) until the start; a published event's quota changes move SKU stock and Redis together."""
    check_sale(data)
    async with sale_lock(conn, sale_id, wait=ADMIN_LOCK_WAIT_SECONDS):
        redis_edited = False  # once the edit's Redis steps begin
        try:
            async with conn.transaction():
                old = await queries.fetch_sale(conn, sale_id, lock=True)
                if old is None:
                    raise NotFound("Flash sale not found", code="flash_sale.not_found")
                if old["status"] not in ("draft", "published"):
                    raise Conflict(
                        f"A flash sale that is {old['status']} cannot be edited",
                        code="flash_sale.illegal_transition",
                    )
                # The clock now, not the transaction's start (now()); Redis refuses to remove an item
                # that sold meanwhile (_apply_redis_edit), so an edit that commits after the start
                # cannot orphan orders.
                if old["status"] == "published" and await conn.fetchval(
                    "select clock_timestamp() >= $1::timestamptz", old["starts_at"]
                ):
                    raise Conflict(
                        "The flash sale has started: its rules are fixed", code="flash_sale.started"
                    )
                await _check_skus(conn, data)
                row = await conn.fetchrow(
                    f"""update flash_sales set ({", ".join(SALE_COLUMNS)}, updated_at) = ($2, $3, $4, $5, $6, $7, $8, now())
                        where id = $1 returning {queries.SALE_FIELDS}""",
                    sale_id,
                    *[getattr(data, c) for c in SALE_COLUMNS],
                )
                old_items = {i["sku_id"]: i for i in await queries.fetch_items(conn, [sale_id])}
                new_items = {i.sku_id: i for i in data.items}
                live = old["status"] == "published"
                redis_steps: list[tuple[str, int, Any]] = []
                for sku_id in sorted(set(old_items) | set(new_items)):
                    before, after = old_items.get(sku_id), new_items.get(sku_id)
                    delta = (after.quota if after else 0) - (before["quota"] if before else 0)
                    if live:
                        await _move_stock(conn, sale_id, sku_id, delta, admin_id)
                    if before is None:
                        await _insert_items(conn, sale_id, [after])
                        redis_steps.append(("add", sku_id, None))
                    elif after is None:
                        if before["sold"]:
                            raise Conflict(
                                "An item with orders cannot be removed", code="flash_sale.item_sold"
                            )
                        await conn.execute("delete from flash_sale_items where id = $1", before["id"])
                        redis_steps.append(("remove", sku_id, before["id"]))
                    else:
                        updated = await conn.fetchval(
                            f"""update flash_sale_items i set flash_price = $2, quota = $3, per_user_limit = $4
                                where id = $1 and {queries.SOLD} <= $3 returning id""",
                            before["id"],
                            after.flash_price,
                            after.quota,
                            after.per_user_limit,
                        )
                        if updated is None:
                            raise Conflict(
                                "The quota cannot drop below what is sold", code="flash_sale.quota_below_sold"
                            )
                        redis_steps.append(("config", sku_id, (before["id"], delta, after)))
                if live:
                    # Inside the transaction: a refusal from Redis rolls the PostgreSQL side back.
                    redis_edited = True
                    await _apply_redis_edit(conn, redis, scripts, keys, row, redis_steps)
        except BaseException:  # a cancelled call too (cancelled in its COMMIT, it may have committed:
            # the rebuild writes whatever PostgreSQL holds either way)
            if redis_edited:
                # PostgreSQL rolled the edit back, but Redis may hold part of it (a quota already
                # raised, an item already gone): rewrite the event in Redis from PostgreSQL, as
                # `shop reconcile --fix` would, so Redis never sells what PostgreSQL did not set aside.
                try:
                    await rebuild_sale(conn, redis, scripts, keys, sale_id)
                except BaseException:  # logged whatever stopped it; the edit's own error goes on
                    log.exception(
                        "flash sale %s: Redis not restored after a failed edit; run shop reconcile --fix",
                        sale_id,
                    )
            raise
        return await load_sale(conn, redis, keys, sale_id)


async def _apply_redis_edit(conn, redis, scripts, keys: Keys, row, steps) -> None:
    sale_id = row["id"]
    rebuild = False
    # Removals last: a refusal raised by an earlier step rolls back PostgreSQL before any item's
    # keys are gone from Redis.
    for action, _sku_id, extra in sorted(steps, key=lambda step: step[0] == "remove"):
        if action == "remove":
            reply = await scripts.flash_warm_item(keys=_item_keys(keys, sale_id, extra), args=["remove"])
            if reply[0] == "sold":
                raise Conflict("An item with orders cannot be removed", code="flash_sale.item_sold")
        elif action == "add":
            rebuild = True
        else:
            item_id, delta, item = extra
            reply = await scripts.flash_warm_item(
                keys=_item_keys(keys, sale_id, item_id),
                args=["config", delta, item.per_user_limit, item.flash_price, item.quota],
            )
            if reply[0] == "cold":
                rebuild = True
            elif reply[0] == "below_sold":
                raise Conflict("The quota cannot drop below what is sold", code="flash_sale.quota_below_sold")
    if rebuild:
        await rebuild_sale(conn, redis, scripts, keys, sale_id)
    else:
        await redis.hset(
            keys.flash_state(sale_id), mapping=dict(zip(*[iter(_state_args(row))] * 2, strict=True))
        )


async def stop_sale(
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    scripts: Any,
    keys: Keys,
    sale_id: int,
    admin_id: int | None,
) -> FlashSaleOut:
    """published -> stopped: no purchase is accepted from now on; unsold units go back to stock.
    The lock is taken before the status changes, so a busy event refuses the stop whole."""
    async with sale_lock(conn, sale_id, wait=ADMIN_LOCK_WAIT_SECONDS):
        row = await conn.fetchrow(
            """update flash_sales set status = 'stopped', stopped_at = now(), updated_at = now()
               where id = $1 and status = 'published' returning id""",
            sale_id,
        )
        if row is None:
            existing = await queries.fetch_sale(conn, sale_id)
            if existing is None:
                raise NotFound("Flash sale not found", code="flash_sale.not_found")
            raise Conflict(
                f"Cannot stop a flash sale that is {existing['status']}", code="flash_sale.illegal_transition"
            )
        await settle_sale(conn, redis, keys, sale_id, admin_id=admin_id)  # the lock again (re-entrant)
    return await load_sale(conn, redis, keys, sale_id)


async def _close_in_redis(redis: aioredis.Redis, keys: Keys, sale_id: int) -> None:
    state = keys.flash_state(sale_id)
    if await redis.exists(state):
        await redis.hset(state, "status", "ended")


async def settle_sale(
    conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys, sale_id: int, *, admin_id: int | None = None
) -> bool:
    """Unsold units back to SKU stock, exactly once; False when it was not due or already done."""
    async with sale_lock(conn, sale_id):
        # Redis refuses every purchase first; every accepted one is then in the stream, and is
        # persisted (idempotently) before `sold` is read.
        await _close_in_redis(redis, keys, sale_id)
        await persist_backlog(redis, conn, KIND, keys.flash_stream(sale_id))
        async with conn.transaction():
            row = await conn.fetchrow(
                """update flash_sales set status = 'settled', settled_at = now(), updated_at = now()
                   where id = $1 and (status = 'stopped'
                                      or (status = 'published' and ends_at < now() - make_interval(secs => $2)))
                   returning id""",
                sale_id,
                SETTLE_GRACE_SECONDS,
            )
            if row is None:
                return False
            items = await conn.fetch(
                f"""select i.id, i.sku_id, i.quota, {queries.SOLD} as sold from flash_sale_items i
                    where flash_sale_id = $1 order by sku_id for update""",
                sale_id,
            )
            for item in items:
                if item["sold"] > item["quota"]:  # cannot happen: Redis never sells past the quota
                    log.error(
                        "flash sale %s item %s: %s sold of %s",
                        sale_id,
                        item["id"],
                        item["sold"],
                        item["quota"],
                    )
                unsold = max(0, item["quota"] - item["sold"])
                await _move_stock(conn, sale_id, item["sku_id"], -unsold, admin_id)
                # The units sold count as the SKU's and product's sales now, once (a return after
                # this goes to SKU stock and takes its units off the sales, like any order's).
                await conn.execute(
                    """with i as (update flash_sale_items set returned_to_stock = $2 where id = $1 returning sku_id),
                            s as (update skus set sales = sales + $3 from i where skus.id = i.sku_id
                                  returning skus.product_id)
                       update products set sales = sales + $3 from s where products.id = s.product_id""",
                    item["id"],
                    unsold,
                    item["sold"],
                )
        try:
            await retire_in_redis(redis, keys, sale_id, [item["id"] for item in items])
        except Exception:  # committed: the worker's next settle pass retires it
            log.warning("flash sale %s: settled, Redis not yet retired", sale_id, exc_info=True)
        return True


async def retire_in_redis(redis: aioredis.Redis, keys: Keys, sale_id: int, item_ids: Sequence[int]) -> None:
    """A settled event sells nothing more, and every reservation in its stream is in PostgreSQL
    (settling persisted the backlog after Redis closed the event): the worker stops reading the
    stream, and the event's keys expire a day later instead of filling a `noeviction` Redis."""
    async with redis.pipeline(transaction=False) as pipe:
        for key in (keys.flash_state(sale_id), keys.flash_stream(sale_id), keys.flash_keyed(sale_id)):
            pipe.expire(key, SETTLED_KEYS_TTL_SECONDS)
        for item_id in item_ids:
            for key in (
                keys.flash_item(sale_id, item_id),
                keys.flash_bought(sale_id, item_id),
                keys.flash_returned(sale_id, item_id),
            ):
                pipe.expire(key, SETTLED_KEYS_TTL_SECONDS)
        await pipe.execute()
    # Last: an event still registered is one not retired yet (the settle pass retries it).
    await unregister_stream(redis, keys, KIND, keys.flash_stream(sale_id))


async def settle_due_sales(pool: asyncpg.Pool, redis: aioredis.Redis, keys: Keys) -> int:
    async with pool.acquire() as conn:
        due = await conn.fetch(
            """select id from flash_sales
               where status = 'stopped' or (status = 'published' and ends_at < now() - make_interval(secs => $1))
               order by id limit 20""",
            SETTLE_GRACE_SECONDS,
        )
        done = 0
        for row in due:
            done += await settle_sale(conn, redis, keys, row["id"])
        # Settled events whose Redis was not retired when they settled (Redis failed then, or they
        # settled before events were retired): retired now.
        registered = [keys.flash_stream_event(s) for s in await registered_streams(redis, keys, KIND)]
        settled = await conn.fetch(
            """select f.id, array_remove(array_agg(i.id order by i.id), null) as items
               from flash_sales f left join flash_sale_items i on i.flash_sale_id = f.id
               where f.id = any($1::bigint[]) and f.status = 'settled' group by f.id""",
            [sale_id for sale_id in registered if sale_id is not None],
        )
        for row in settled:
            await retire_in_redis(redis, keys, row["id"], row["items"])
    return done


async def sale_stats(
    conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys, sale_id: int
) -> FlashSaleStats:
    row = await queries.fetch_sale(conn, sale_id)
    if row is None:
        raise NotFound("Flash sale not found", code="flash_sale.not_found")
    items = await queries.fetch_items(conn, [sale_id])
    remaining = await live_remaining(redis, keys, items) if row["status"] in ("published", "stopped") else {}
    totals = await queries.sale_stats(conn, sale_id)
    paid = await queries.paid_units(conn, sale_id)
    item_stats = [
        FlashItemStats(
            item_id=i["id"],
            sku_id=i["sku_id"],
            quota=i["quota"],
            sold=i["sold"],
            remaining=remaining.get(i["id"]),
            paid_units=paid.get(i["id"], 0),
            returned_to_stock=i["returned_to_stock"],
        )
        for i in items
    ]
    known = [r for r in remaining.values() if r is not None]
    return FlashSaleStats(
        flash_sale_id=sale_id,
        status=row["status"],
        sold=sum(i["sold"] for i in items),
        remaining=sum(known) if known else None,
        orders=totals["orders"],
        paid_orders=totals["paid_orders"],
        gmv=totals["gmv"],
        buyers=totals["buyers"],
        items=item_stats,
    )


# ---------------------------------------------------------------- the shopper's list (cached)

SHOWCASE_SECONDS = 1.0


@dataclass
class Showcase:
    expires: float = 0.0
    value: ShopperFlashSales | None = None
    refreshing: asyncio.Future | None = None


async def showcase(state: Any, conn_factory) -> ShopperFlashSales:
    """Current and upcoming events with what is left; rebuilt at most once a second per process."""
    cache: Showcase | None = getattr(state, "flash_showcase", None)
    if cache is None:
        cache = state.flash_showcase = Showcase()
    now = time.monotonic()
    if cache.value is not None and now < cache.expires:
        return cache.value
    if cache.refreshing is not None:  # one rebuild at a time; the others wait for it
        return await asyncio.shield(cache.refreshing)
    cache.refreshing = asyncio.get_running_loop().create_future()
    try:
        value = await _build_showcase(await conn_factory(), state.redis, state.redis_keys)
    except Exception as exc:
        cache.refreshing.set_exception(exc)
        cache.refreshing.exception()  # retrieved: waiters get it, nobody logs "never retrieved"
        raise
    else:
        cache.value, cache.expires = value, time.monotonic() + SHOWCASE_SECONDS
        cache.refreshing.set_result(value)
        return value
    finally:
        cache.refreshing = None


async def _build_showcase(conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys) -> ShopperFlashSales:
    sales = await queries.fetch_showcase(conn)
    items = await queries.fetch_items(conn, [s["id"] for s in sales])
    remaining = await live_remaining(redis, keys, items)
    now = datetime.now(UTC)
    out = []
    for sale in sales:
        out.append(
            ShopperFlashSaleOut(
                id=sale["id"],
                name=sale["name"],
                live_stream=sale["live_stream"],
                starts_at=sale["starts_at"],
                ends_at=sale["ends_at"],
                phase="upcoming" if now < sale["starts_at"] else "live",
                items=[
                    ShopperItemOut(
                        **_item_fields(i),
                        remaining=max(remaining[i["id"]], 0) if remaining.get(i["id"]) is not None else None,
                    )
                    for i in items
                    if i["flash_sale_id"] == sale["id"]
                ],
            )
        )
    return ShopperFlashSales(items=out)


# ---------------------------------------------------------------- purchase tokens


@functools.lru_cache(maxsize=8)
def _token_key(flash_token_secret: str, jwt_keys: str, signing_secret: str) -> bytes:
    if flash_token_secret:
        return flash_token_secret.encode()
    # Derived from the JWT signing key: production already refuses a weak or default one.
    return hmac.new(signing_secret.encode(), b"flash-sale-purchase-token", hashlib.sha256).digest()


def token_key(settings: Settings) -> bytes:
    return _token_key(
        settings.flash_token_secret, settings.jwt_keys, settings.jwt_key_map[settings.signing_kid]
    )


def _sign(key: bytes, user_id: int, sale_id: int, expires: int) -> str:
    mac = hmac.digest(key, f"{user_id}.{sale_id}.{expires}".encode(), "sha256")[:18]
    return base64.urlsafe_b64encode(mac).decode()


def make_token(settings: Settings, user_id: int, sale_id: int, expires: int) -> str:
    return f"{expires}.{_sign(token_key(settings), user_id, sale_id, expires)}"


# Tokens whose signature checked out, per process: (token, shopper, event, key) -> expiry. A
# shopper's retries in a rush carry the same token: the HMAC is computed once (as for JWTs).
_VALID_TOKENS: dict[tuple[str, int, int, bytes], int] = {}
_VALID_TOKENS_MAX = 100_000


def verify_token(
    settings: Settings, token: str, user_id: int, sale_id: int, now: float | None = None
) -> None:
    """An HMAC over shopper, event and expiry: checked without Redis or PostgreSQL."""
    key = token_key(settings)
    cache_key = (token, user_id, sale_id, key)
    expires = _VALID_TOKENS.get(cache_key)
    if expires is None:
        expires_text, _, signature = token.partition(".")
        # Only the spelling make_token writes (ASCII digits, no leading zero): another spelling of
        # the same expiry would pass the HMAC and be remembered as another token.
        if (
            not (expires_text.isascii() and expires_text.isdigit() and signature.isascii())
            or expires_text != str(int(expires_text))
            or not hmac.compare_digest(signature, _sign(key, user_id, sale_id, int(expires_text)))
        ):
            raise Forbidden("Invalid purchase token", code="flash_sale.token_invalid")
        expires = int(expires_text)
        if len(_VALID_TOKENS) >= _VALID_TOKENS_MAX:
            _VALID_TOKENS.clear()
        _VALID_TOKENS[cache_key] = expires
    if expires <= (time.time() if now is None else now):
        raise Forbidden("The purchase token has expired: get a new one", code="flash_sale.token_expired")


WINDOW_SECONDS = 0.5
MEMORY_SIZE = 10_000  # entries of each per-process memory below (ids anyone may ask about)


async def _remembered(
    state: Any, memory: str, key: Any, until: float, fetch: Callable[[], Awaitable[Any]]
) -> Any:
    """`fetch()`'s value, remembered by this process in `state.<memory>` under `key` until the
    monotonic time `until`. A crowd asking at the same instant waits for one fetch, not one each
    (each would hold a Redis connection). The fetch is a task of its own, so a caller that goes
    away does not take it from the others; a failed fetch is not remembered."""
    cache: dict = getattr(state, memory, None)
    if cache is None:
        cache = {}
        setattr(state, memory, cache)
    hit = cache.get(key)
    if hit is None or hit[0] <= time.monotonic():
        if len(cache) >= MEMORY_SIZE:  # bounded (a waiter keeps its task)
            cache.clear()
        task = asyncio.get_running_loop().create_task(fetch())
        hit = cache[key] = (until, task)

        def forget_failure(done: asyncio.Task) -> None:
            if (done.cancelled() or done.exception() is not None) and cache.get(key, (0, None))[1] is done:
                del cache[key]

        task.add_done_callback(forget_failure)
    return await asyncio.shield(hit[1])


async def _window(state: Any, sale_id: int) -> tuple[str, int, int] | None:
    """(status, starts_ms, ends_ms) from Redis, remembered for half a second per process: the
    whole audience asks for a token at the same instant."""

    async def fetch() -> tuple[str, int, int] | None:
        status, starts, ends = await state.redis.hmget(
            state.redis_keys.flash_state(sale_id), "status", "starts_ms", "ends_ms"
        )
        return None if status is None else (status, int(starts), int(ends))

    return await _remembered(state, "flash_windows", sale_id, time.monotonic() + WINDOW_SECONDS, fetch)


async def issue_token(state: Any, conn_factory, user_id: int, sale_id: int) -> FlashTokenOut:
    """A purchase token, only while the sale is live (so scripts cannot fire before the start)."""
    settings: Settings = state.settings
    window = await _window(state, sale_id)
    if window is None:
        row = await queries.fetch_sale(await conn_factory(), sale_id)
        if row is None or row["status"] == "draft":
            raise NotFound("Flash sale not found", code="flash_sale.not_found")
        if row["status"] != "published":
            raise Conflict("The flash sale has ended", code="flash_sale.ended")
        raise Unavailable("The flash sale is being restored, try again shortly", code="flash_sale.not_ready")
    status, starts, ends = window
    if status == "draft":
        raise NotFound("Flash sale not found", code="flash_sale.not_found")
    now = now_ms()
    if status != "published" or now >= ends:
        raise Conflict("The flash sale has ended", code="flash_sale.ended")
    if now < starts:
        raise Conflict("The flash sale has not started yet", code="flash_sale.not_started")
    expires = min(ends // 1000 + 1, int(time.time()) + settings.flash_token_ttl)
    return FlashTokenOut(
        token=make_token(settings, user_id, sale_id, expires), expires_at=datetime.fromtimestamp(expires, UTC)
    )


# ---------------------------------------------------------------- buying (the hot path)


@dataclass(frozen=True)
class Bought:
    order: OrderOut
    replayed: bool


SOLD_OUT_BODY = msgspec.json.encode({"error": {"code": "flash_sale.sold_out", "message": "Sold out"}})


@dataclass
class Answer:
    """What the buy call answers: the order (201), or prebuilt bytes (the sold-out crowd)."""

    status: int = 201
    body: bytes | None = None
    order: OrderOut | None = None
    replayed: bool = False


SOLD_OUT = Answer(409, SOLD_OUT_BODY)


async def buy_call(
    state: Any,
    sale_id: int,
    item_id: int,
    user_id: int,
    body: FlashBuyIn,
    ip: str,
    idempotency_key: str | None,
) -> Answer:
    """The buy call after auth and validation (shared by the Litestar route and the ASGI fast path)."""
    verify_token(state.settings, body.token, user_id, sale_id)
    # The losing crowd's path: this process's sold-out flag answers with prebuilt bytes (no
    # exception machinery, no Redis, no PostgreSQL). A request carrying an Idempotency-Key may be
    # a winner's retry, to be answered with its order: only shoppers holding a key record ask Redis.
    until = sold_out_until(state, sale_id, item_id)
    if until and (
        idempotency_key is None or user_id not in await _key_holders(state, sale_id, item_id, until)
    ):
        return SOLD_OUT
    bind_app(state)
    try:
        # Read again only after the key holders' fetch (the flag may have ended while it ran).
        sold_out = bool(until) and sold_out_here(state, sale_id, item_id)
        bought = await buy(state, sale_id, item_id, user_id, body, ip, idempotency_key, sold_out=sold_out)
    except ShopError as exc:
        if exc.code == "flash_sale.not_ready":
            # Redis knows nothing of it: only a live event is "being restored".
            async with state.pool.acquire() as conn:
                await explain_cold(conn, sale_id, item_id)
        raise
    return Answer(order=bought.order, replayed=bought.replayed)


def sold_out_here(state: Any, sale_id: int, item_id: int) -> bool:
    """This process saw the item sold out less than `flash_sold_out_seconds` ago."""
    return sold_out_until(state, sale_id, item_id) > 0.0


def sold_out_until(state: Any, sale_id: int, item_id: int) -> float:
    """When this process's sold-out flag for the item ends (monotonic time), 0.0 if none is up."""
    until = _sold_out_flags(state).get((sale_id, item_id), 0.0)
    return until if until > time.monotonic() else 0.0


async def _key_holders(state: Any, sale_id: int, item_id: int, until: float) -> frozenset[int]:
    """The shoppers holding an Idempotency-Key record in the event (its `keyed` set: its winners
    with a key, given back or not), read from Redis at most once per sold-out flag and process.
    Only they can be retrying a win; anyone else's keyed request is a loser like the rest. (A
    shopper winning with a key in another process after the read, which needs a unit given back
    and won again, is seen at the next read, a flag later.)"""

    async def fetch() -> frozenset[int]:
        return frozenset(map(int, await state.redis.smembers(state.redis_keys.flash_keyed(sale_id))))

    # Per item: the read comes after this item's flag was set, so it holds whoever won its last unit.
    return await _remembered(state, "flash_key_holders", (sale_id, item_id), until, fetch)


def _sold_out_flags(state: Any) -> dict[tuple[int, int], float]:
    flags = getattr(state, "flash_sold_out", None)
    if flags is None:
        flags = state.flash_sold_out = {}
    return flags


async def buy(
    state: Any,
    sale_id: int,
    item_id: int,
    user_id: int,
    body: FlashBuyIn,
    ip: str,
    idempotency_key: str | None,
    *,
    sold_out: bool,
) -> Bought:
    """One purchase attempt (token checked; `sold_out`: this process's flag for the item is up).
    Losers never touch PostgreSQL; a winner's order is committed before this returns."""
    settings: Settings = state.settings
    flags = _sold_out_flags(state)
    if not sold_out:
        # Not while this process saw the item sold out (a keyed retry still asks Redis, which
        # will most likely refuse it): losers do not reach PostgreSQL.
        await _check_address(state, user_id, body.address_id)
    keys: Keys = state.redis_keys
    hotpath: HotPath = hotpath_of(state)
    rid = new_reservation_id()
    now = now_ms()
    payload = _payload(sale_id, item_id, body.qty, body.address_id, now, idempotency_key)
    fingerprint = _fingerprint(item_id, body.qty, body.address_id)
    try:
        reply = await hotpath.reserve(
            state.scripts.flash_buy,
            keys=keys.flash_buy(sale_id, item_id, user_id, idempotency_key, ip),
            args=[
                now,
                user_id,
                body.qty,
                rid,
                encode_payload(payload),
                "1" if idempotency_key else "0",
                IDEMPOTENCY_TTL,
                fingerprint,
                item_id,
            ],
        )
    except Exception as exc:
        if not is_outage(exc) or isinstance(exc, ScriptsNotSent):
            raise  # (not sent: nothing ran, a retry is a first try: the plain outage answer)
        # Redis went away after the script was sent: whether it accepted cannot be known.
        raise _unsettled(
            exc,
            sale_id,
            idempotency_key,
            "flash_sale.unconfirmed",
            "Your purchase could not be confirmed: look in your orders before pressing again",
        ) from exc
    outcome = reply[0]
    if outcome == "ok":
        if int(reply[3]) <= 0:
            flags[(sale_id, item_id)] = time.monotonic() + settings.flash_sold_out_seconds
        reservation = Reservation(rid, user_id, payload)
    elif outcome == "replay":
        if reply[2] != fingerprint:
            raise key_mismatch()
        # The first request may still be writing (or have died): writing again is a no-op or the rescue.
        reservation = Reservation(reply[1], user_id, msgspec.json.decode(reply[3]))
    elif outcome == "rate_limited":
        raise RateLimited("Too many purchase attempts", retry_after=-(-int(reply[1]) // 1000))
    elif outcome == "cold":
        raise Unavailable("The flash sale is being restored, try again shortly", code="flash_sale.not_ready")
    else:
        if outcome == "sold_out" and int(reply[1]) <= 0:
            flags[(sale_id, item_id)] = time.monotonic() + settings.flash_sold_out_seconds
        error, code, message = REFUSALS[outcome]
        if outcome == "sold_out" and int(reply[1]) > 0:
            message = f"Only {reply[1]} left"
        raise error(message, code=code)
    if settings.flash_fault_pause_seconds and settings.env != "production":
        # Fault injection (tests): the reservation is in Redis, the order not yet in PostgreSQL.
        await asyncio.sleep(settings.flash_fault_pause_seconds)
    replayed = outcome == "replay"
    try:
        order = await hotpath.commit(KIND, reservation)
        if order is None:
            # Written before: a replay, the worker got there first, or (Redis forgot the key) the
            # key's first order. In that last case Redis counted the units twice: `shop reconcile`
            # finds that (never an oversell, at worst a unit held back) and rebuilds the counters.
            async with state.pool.acquire() as conn:
                order_id = await queries.fetch_order_id(conn, reservation.id)
                if order_id is None and idempotency_key is not None:
                    first = await queries.fetch_keyed_order(conn, sale_id, user_id, idempotency_key)
                    if _fingerprint(first["item_id"], first["qty"], first["address_id"]) != fingerprint:
                        raise key_mismatch()
                    order_id, replayed = first["order_id"], True
                order = await load_order(conn, order_id)
    except Exception as exc:
        if not is_outage(exc):
            raise
        # The unit is the shopper's: the reservation is in the stream, and the worker writes its
        # order once PostgreSQL is back.
        raise _unsettled(
            exc,
            sale_id,
            idempotency_key,
            "flash_sale.order_pending",
            "Your purchase was accepted; its order is being written and will be in your orders shortly",
        ) from exc
    return Bought(order, replayed)


def _unsettled(
    outage: Exception, sale_id: int, idempotency_key: str | None, code: str, message: str
) -> Unavailable:
    """503 for a purchase a store outage left unanswered (the outage logged). Only a keyed request
    is invited to retry (Retry-After): its retry is answered with the first outcome; an unkeyed
    retry would be a second purchase."""
    log.warning("flash sale %s: purchase answered %s, a store is unavailable", sale_id, code, exc_info=outage)
    if idempotency_key is not None:
        return Unavailable(
            f"{message} (retrying with the same Idempotency-Key is safe)",
            code=code,
            headers={"Retry-After": "1"},
        )
    return Unavailable(message, code=code)


# Addresses checked to be the shopper's, per process: (user id, address id) -> checked until.
ADDRESS_CHECK_SECONDS = 60.0
ADDRESS_CACHE_SIZE = 100_000


async def _check_address(state: Any, user_id: int, address_id: int) -> None:
    """404 `address.not_found` unless the address is the shopper's; a hit is remembered a minute,
    so a shopper's retries in a rush cost PostgreSQL one read per process."""
    cache: dict[tuple[int, int], float] | None = getattr(state, "flash_addresses", None)
    if cache is None:
        cache = state.flash_addresses = {}
    now = time.monotonic()
    if cache.get((user_id, address_id), 0.0) > now:
        return
    async with state.pool.acquire() as conn:
        await get_address_snapshot(conn, user_id, address_id)
    if len(cache) >= ADDRESS_CACHE_SIZE:
        cache.clear()
    cache[(user_id, address_id)] = now + ADDRESS_CHECK_SECONDS


def _payload(
    sale_id: int, item_id: int, qty: int, address_id: int | None, at_ms: int, key: str | None
) -> dict[str, Any]:
    """A reservation's stream payload (what the persister writes the order from)."""
    payload: dict[str, Any] = {"e": sale_id, "i": item_id, "q": qty, "a": address_id, "at": at_ms}
    if key is not None:
        payload["k"] = key
    return payload


def _fingerprint(item_id: int, qty: int, address_id: int | None) -> str:
    """What a replay of an Idempotency-Key must repeat: item, quantity and address."""
    return f"{item_id}:{qty}:{address_id}"


async def explain_cold(conn: asyncpg.Connection, sale_id: int, item_id: int) -> None:
    """An event Redis does not know: 404 or ended unless it is live (then Redis lost it)."""
    row = await conn.fetchrow(
        """select f.status from flash_sales f join flash_sale_items i on i.flash_sale_id = f.id
           where f.id = $1 and i.id = $2""",
        sale_id,
        item_id,
    )
    if row is None or row["status"] == "draft":
        raise NotFound("No such flash sale item", code="flash_sale.not_found")
    if row["status"] != "published":
        raise Conflict("The flash sale has ended", code="flash_sale.ended")


# ---------------------------------------------------------------- persisting winners


# One statement per batch of winners (one round trip, one plan): the links, the orders, their
# lines and (when subscribed) the `order.created` events, each a data-modifying CTE over the same input (a flash
# order has one line). No counter row is updated: an item's sold units are counted from the
# rows. A reservation already written (same id), or a second reservation with an
# Idempotency-Key that already has an order (Redis forgot the key), is skipped: both conflicts
# end in "do nothing", and the CTEs below build only on the rows `links` inserted.
#
# The address: the one the API checked is the shopper's (a primary-key lookup); only if it was
# deleted since does the order take the shopper's default (or latest) address.
ADDRESS_SNAPSHOT = """coalesce(
    case when a.id is not null then jsonb_build_object('receiver', a.receiver, 'phone', a.phone,
        'province', a.province, 'city', a.city, 'district', a.district, 'detail', a.detail,
        'postal_code', a.postal_code) end,
    (select to_jsonb(d) from (select receiver, phone, province, city, district, detail, postal_code
                              from addresses where user_id = n.user_id
                              order by is_default desc, id desc limit 1) d))"""

_ORDER_COLUMNS = [c.strip() for c in ORDER_FIELDS.split(",")]
_LINE_COLUMNS = list(OrderLineOut.__struct_fields__)
if OrderOut.__struct_fields__[: len(_ORDER_COLUMNS)] != tuple(_ORDER_COLUMNS):  # built by position below
    raise RuntimeError("ORDER_FIELDS must list OrderOut's fields in their order")
_PERSIST_TEMPLATE = f"""
with links as (
    insert into flash_sale_orders (reservation_id, order_id, flash_sale_id, item_id, user_id, qty, reserved_at,
        idempotency_key, address_id)
    select e.rid, nextval('orders_id_seq'::regclass), i.flash_sale_id, e.item_id, e.uid, e.qty,
           to_timestamp(e.ms / 1000.0), nullif(e.k, ''), e.address_id
    from unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::bigint[], $6::text[], $7::bigint[])
         as e (rid, uid, item_id, qty, ms, k, address_id)
    join flash_sale_items i on i.id = e.item_id
    order by e.rid
    on conflict do nothing
    returning reservation_id, order_id, item_id, user_id, qty, reserved_at, address_id
), n as (
    select l.*, i.flash_sale_id, i.flash_price, i.flash_price * l.qty as amount, i.sku_id, f.pay_deadline_minutes
    from links l join flash_sale_items i on i.id = l.item_id join flash_sales f on f.id = i.flash_sale_id
), o as (
    insert into orders (id, order_no, user_id, kind, activity_id, items_amount, discount_amount,
        shipping_fee, payable_amount, address, pay_deadline)
    overriding system value
    select n.order_id,
           -- the store-local time part once per statement (an InitPlan), not once per row
           (select to_char(now() at time zone $8, 'YYYYMMDDHH24MISS'))
               || lpad((nextval('business_no_seq') % 1000000)::text, 6, '0') || floor(random() * 10)::int::text,
           n.user_id, 'flash_sale', n.flash_sale_id, n.amount, 0, fee.amount, n.amount + fee.amount,
           {ADDRESS_SNAPSHOT},
           n.reserved_at + make_interval(mins => n.pay_deadline_minutes)
    from n
    left join addresses a on a.id = n.address_id and a.user_id = n.user_id
    left join shipping_rule r on r.id = 1
    cross join lateral (select case when r.id is null then 0
                                    when r.free_threshold is not null and n.amount >= r.free_threshold then 0
                                    else r.flat_fee end as amount) fee
    order by n.order_id
    returning {ORDER_FIELDS}
), l as (
    insert into order_lines (order_id, sku_id, product_id, title, specs, image_url, unit_price, qty, line_amount,
        discount_amount, payable_amount)
    select n.order_id, s.id, p.id, p.title, s.specs, coalesce(p.image_urls[1], ''), n.flash_price, n.qty,
           n.amount, 0, n.amount
    from n join skus s on s.id = n.sku_id join products p on p.id = s.product_id
    order by n.order_id
    returning id, order_id, sku_id, product_id, title, specs, image_url, unit_price, qty, line_amount,
        discount_amount, payable_amount, refunded_qty, refunded_amount
){{events}}
select o.*, links.reservation_id, {", ".join(f"l.{c} as line_{c}" for c in _LINE_COLUMNS)}
from o join links on links.order_id = o.id join l on l.order_id = o.id"""
# The `order.created` outbox rows, only while a handler subscribes to that type: none does, and
# at a rush the event row was 10-15% of PostgreSQL's CPU per winner (and one more update each
# when the worker dispatched it to nobody). BENCHMARKS.md, "fifth session".
CREATED_EVENTS = """, ev as (
    insert into order_events (order_id, type, payload)
    select o.id, 'order.created', jsonb_build_object('kind', 'flash_sale', 'payable_amount', o.payable_amount)
    from o
)"""
PERSIST_STATEMENTS = {
    subscribers: _PERSIST_TEMPLATE.replace("{events}", CREATED_EVENTS if subscribers else "")
    for subscribers in (False, True)
}


@register_persister(KIND, single_statement=True)
async def persist_flash_orders(
    conn: asyncpg.Connection, entries: Sequence[Reservation]
) -> dict[str, OrderOut]:
    """Many winners' orders in one statement; a reservation already written is skipped. Returns the new orders by reservation id (the API answers with them without reading back)."""
    rows = await conn.fetch(
        PERSIST_STATEMENTS[subscribed("order.created")],
        [e.id for e in entries],
        [e.user_id for e in entries],
        [e.payload["i"] for e in entries],
        [e.payload["q"] for e in entries],
        [e.payload["at"] for e in entries],
        [e.payload.get("k", "") for e in entries],
        [e.payload.get("a") for e in entries],
        _TIMEZONE["name"],
    )
    # Each row is the order's fields in OrderOut's order, the reservation id, then the line's
    # fields in OrderLineOut's order (the statement's final select): built positionally.
    n = len(_ORDER_COLUMNS)
    out = {}
    for row in rows:
        values = tuple(row)
        out[values[n]] = OrderOut(*values[:n], [OrderLineOut(*values[n + 1 :])], [])
    return out


# The store's time zone for order numbers: the persister gets only a connection, so the API and
# the worker set it when they bind (bind_runtime); the default is the settings' default.
_TIMEZONE = {"name": "Asia/Shanghai"}


# ---------------------------------------------------------------- giving units back


@dataclass
class Runtime:
    """What after-commit Redis restores need; bound by the API and the worker of this process."""

    pool: asyncpg.Pool
    redis: aioredis.Redis
    scripts: Any
    keys: Keys


_runtime: dict[str, Runtime] = {}


def bind_runtime(
    pool: asyncpg.Pool, redis: aioredis.Redis, scripts: Any, keys: Keys, settings: Settings
) -> None:
    current = _runtime.get("current")
    if current is None or current.pool is not pool or current.redis is not redis:
        _runtime["current"] = Runtime(pool, redis, scripts, keys)
        _TIMEZONE["name"] = settings.timezone


def bind_app(state: Any) -> None:
    current = _runtime.get("current")
    if current is None or current.pool is not state.pool or current.redis is not state.redis:
        bind_runtime(state.pool, state.redis, state.scripts, state.redis_keys, state.settings)


async def return_flash_units(
    conn: asyncpg.Connection, order: asyncpg.Record, units: list[tuple[int, int]]
) -> list[AfterCommit]:
    """The order's units back to the event's quota (or to SKU stock once the event is settled)."""
    sale_id = order["activity_id"]
    # FOR SHARE: settlement (which updates this row) waits for us, or we see it settled.
    status = await conn.fetchval("select status from flash_sales where id = $1 for share", sale_id)
    if status is None or status == "settled":
        return await return_to_sku_stock(conn, order, units)
    returned = []
    for sku_id, qty in sorted(units):
        row = await conn.fetchrow(
            """insert into flash_sale_returns (order_id, flash_sale_id, item_id, user_id, qty)
               select $4, $1, i.id, $5, $3 from flash_sale_items i where flash_sale_id = $1 and sku_id = $2
               returning id, item_id""",
            sale_id,
            sku_id,
            qty,
            order["id"],
            order["user_id"],
        )
        if row is not None:
            returned.append((row["id"], sale_id, row["item_id"], order["user_id"], qty))

    async def restore() -> None:
        runtime = _runtime.get("current")
        if runtime is None:
            return  # the worker's restore_flash_returns job applies it within a second
        try:
            await apply_returns(runtime, returned)
        except Exception:
            log.exception("flash-sale units not yet back in Redis (the worker retries)")

    return [restore] if returned else []


register_unit_returner(KIND, return_flash_units)


Return = tuple[int, int, int, int, int]  # (return id, sale, item, user, qty)


async def _returns_to_redis(scripts: Any, keys: Keys, returns: Sequence[Return]) -> list[int]:
    """Each return's units back into Redis, once (flash_return.lua); the ids Redis took."""
    done = []
    for return_id, sale_id, item_id, user_id, qty in returns:
        reply = await scripts.flash_return(
            keys=[
                keys.flash_item(sale_id, item_id),
                keys.flash_bought(sale_id, item_id),
                keys.flash_returned(sale_id, item_id),
            ],
            args=[return_id, user_id, qty],
        )
        # 'cold': Redis lost the sale. It stays pending: the rebuild counts it (and marks it done)
        # if its snapshot saw it, and if not, the next retry applies it on the rebuilt counters.
        if reply != "cold":
            done.append(return_id)
    return done


async def _mark_returns_done(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    if ids:
        await conn.execute(
            "update flash_sale_returns set redis_done = true where id = any($1::bigint[]) and not redis_done",
            list(ids),
        )


async def apply_returns(runtime: Runtime, returns: Sequence[Return]) -> int:
    """(return id, sale, item, user, qty) back into Redis, once each; marks them done in PostgreSQL."""
    done = await _returns_to_redis(runtime.scripts, runtime.keys, returns)
    if done:
        async with runtime.pool.acquire() as conn:
            await _mark_returns_done(conn, done)
    return len(done)


async def restore_pending_returns(runtime: Runtime, batch: int = 500) -> int:
    """Returns whose after-commit step did not run (process died, no runtime): applied now."""
    async with runtime.pool.acquire() as conn:
        # A settled sale sells no more: its returns went to SKU stock with the unsold units.
        await conn.execute(
            """update flash_sale_returns r set redis_done = true from flash_sales f
               where not r.redis_done and f.id = r.flash_sale_id and f.status = 'settled'"""
        )
        rows = await conn.fetch(
            """select id, flash_sale_id, item_id, user_id, qty from flash_sale_returns
               where not redis_done and created_at < now() - interval '200 milliseconds'
               order by id limit $1""",
            batch,
        )
    return await apply_returns(runtime, [tuple(r) for r in rows])


# ---------------------------------------------------------------- reconcile


async def _tail(redis: aioredis.Redis, stream: str, after: str) -> dict[int, tuple[int, dict[int, int]]]:
    """Stream entries after `after`: item id -> (units, units per shopper)."""
    out: dict[int, tuple[int, dict[int, int]]] = {}
    start = f"({after}"
    while True:
        entries = await redis.xrange(stream, min=start, max="+", count=1000)
        for _, fields in entries:
            item_id, qty, uid = int(fields["i"]), int(fields["q"]), int(fields["uid"])
            units, users = out.get(item_id, (0, {}))
            users[uid] = users.get(uid, 0) + qty
            out[item_id] = (units + qty, users)
        if len(entries) < 1000:
            return out
        start = f"({entries[-1][0]}"


async def check_flash_counters(ctx: ReconcileContext) -> list[Difference]:
    """Every live event: rules, remaining per item and units per shopper, Redis vs PostgreSQL."""
    diffs: list[Difference] = []
    streams = set(await registered_streams(ctx.redis, ctx.keys, KIND))
    sales = await ctx.conn.fetch(
        f"select {queries.SALE_FIELDS} from flash_sales where status in ('published', 'stopped') order by id"
    )
    for sale in sales:
        sale_id = sale["id"]
        subject = f"flash sale {sale_id}"
        stream = ctx.keys.flash_stream(sale_id)
        last = await persist_backlog(ctx.redis, ctx.conn, KIND, stream)
        tail = await _tail(ctx.redis, stream, last)
        state = await ctx.redis.hgetall(ctx.keys.flash_state(sale_id))
        expected_state = dict(zip(*[iter(_state_args(sale))] * 2, strict=True))
        if state.get("status") == "ended" and sale["status"] == "stopped":
            expected_state["status"] = "ended"
        for field, want in expected_state.items():
            if state.get(field) != str(want):
                diffs.append(Difference("flash_sales", subject, field, str(want), state.get(field)))
        # Every shopper with a key record is in the keyed set (extra ones are harmless: they only
        # send that shopper's keyed requests to Redis). The stream's tail is in both or neither.
        keyed = set(await queries.keyed_user_ids(ctx.conn, sale_id))
        missing = sorted(keyed - set(map(int, await ctx.redis.smembers(ctx.keys.flash_keyed(sale_id)))))
        if missing:
            diffs.append(
                Difference("flash_sales", subject, "shoppers with a key record", str(missing[:10]), None)
            )
        # Returns not yet applied to Redis (their after-commit step is pending) are expected missing.
        pending = await ctx.conn.fetch(
            """select item_id, user_id, sum(qty)::int as n from flash_sale_returns
               where flash_sale_id = $1 and not redis_done group by item_id, user_id""",
            sale_id,
        )
        for item in await queries.fetch_items(ctx.conn, [sale_id]):
            item_id = item["id"]
            tail_units, tail_users = tail.get(item_id, (0, {}))
            not_back = {r["user_id"]: r["n"] for r in pending if r["item_id"] == item_id}
            expected = item["quota"] - item["sold"] - tail_units - sum(not_back.values())
            actual = await ctx.redis.hgetall(ctx.keys.flash_item(sale_id, item_id))
            wants = {
                "remaining": expected,
                "limit": item["per_user_limit"],
                "price": item["flash_price"],
                "quota": item["quota"],
            }
            for field, want in wants.items():
                if actual.get(field) != str(want):
                    diffs.append(
                        Difference(
                            "flash_sales", subject, f"item {item_id} {field}", str(want), actual.get(field)
                        )
                    )
            counts = await queries.bought_counts(ctx.conn, item_id)
            for uid, n in list(tail_users.items()) + list(not_back.items()):
                counts[uid] = counts.get(uid, 0) + n
            diffs += per_user_differences(
                "flash_sales", subject, f"item {item_id} units of user {{user_id}}", counts,
                await ctx.redis.hgetall(ctx.keys.flash_bought(sale_id, item_id)),
            )  # fmt: skip
        if stream not in streams:
            diffs.append(Difference("flash_sales", subject, "stream registered", True, False))
    return diffs


async def fix_flash_counters(ctx: ReconcileContext, diffs: list[Difference]) -> None:
    for sale_id in sorted({int(d.subject.rsplit(" ", 1)[1]) for d in diffs}):
        async with sale_lock(ctx.conn, sale_id):
            await rebuild_sale(ctx.conn, ctx.redis, ctx.scripts, ctx.keys, sale_id)
            status = await ctx.conn.fetchval("select status from flash_sales where id = $1", sale_id)
            if status == "stopped":
                await _close_in_redis(ctx.redis, ctx.keys, sale_id)


register_checker("flash_sales", check_flash_counters, fix_flash_counters)
