"""SQL of coupons: templates, coupons with their state as of now, claim counts."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

TEMPLATE_FIELDS = """id, name, description, kind, threshold, amount, percent_off, max_discount, scope, scope_ids,
    total_quantity, per_user_limit, is_public, for_newcomers, claim_starts_at, claim_ends_at, validity,
    valid_from, valid_until, valid_days, status, created_at, updated_at"""

# Orders in these states have been paid for: a coupon they lock is spent even before the
# `order.paid` handler has written `used`.
PAID_ORDER_STATES = ["paid", "shipped", "completed", "refunding", "refunded"]

# A coupon's state as of now: stored state, except that an available one past valid_until is
# expired and a locked one whose order is paid is used (until the worker writes it).
COUPON_STATE = """case
        when c.status = 'locked' and o.status = any('{paid,shipped,completed,refunding,refunded}'::text[])
            then 'used'
        when c.status = 'available' and c.valid_until <= now() then 'expired'
        else c.status end"""

COUPON_SELECT = f"""select c.id, c.code, c.template_id, t.name, t.kind, t.threshold, t.amount, t.percent_off,
        t.max_discount, t.scope, t.scope_ids, c.source, {COUPON_STATE} as status, c.valid_from, c.valid_until,
        c.claimed_at, coalesce(c.used_order_id, c.locked_order_id) as order_id
    from coupons c
    join coupon_templates t on t.id = c.template_id
    left join orders o on o.id = c.locked_order_id"""


async def fetch_template(
    conn: asyncpg.Connection, template_id: int, *, lock: bool = False
) -> asyncpg.Record | None:
    sql = f"select {TEMPLATE_FIELDS} from coupon_templates where id = $1"
    return await conn.fetchrow(sql + (" for update" if lock else ""), template_id)


async def fetch_templates(
    conn: asyncpg.Connection,
    *,
    status: str | None,
    before_id: int | None,
    limit: int,
    claimable_only: bool = False,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""select {TEMPLATE_FIELDS} from coupon_templates
            where ($1::text is null or status = $1) and ($2::bigint is null or id < $2)
              and (not $4 or (status = 'active' and is_public
                              and (claim_ends_at is null or claim_ends_at > now())
                              and (validity <> 'fixed' or valid_until > now())))
            order by id desc limit $3""",
        status,
        before_id,
        limit,
        claimable_only,
    )


async def fetch_coupon(
    conn: asyncpg.Connection, coupon_id: int, user_id: int | None = None
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"{COUPON_SELECT} where c.id = $1 and ($2::bigint is null or c.user_id = $2)", coupon_id, user_id
    )


async def fetch_coupon_by_code(conn: asyncpg.Connection, code: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"{COUPON_SELECT} where c.code = $1", code)


async def fetch_user_coupons(
    conn: asyncpg.Connection, user_id: int, *, state: str | None, before_id: int | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""select * from ({COUPON_SELECT} where c.user_id = $1 and ($3::bigint is null or c.id < $3)) x
            where ($2::text is null or status = $2) order by id desc limit $4""",
        user_id,
        state,
        before_id,
        limit,
    )


async def fetch_usable_coupons(conn: asyncpg.Connection, user_id: int) -> list[asyncpg.Record]:
    """The shopper's coupons that are available now or later (not expired, not locked, not used)."""
    return await conn.fetch(
        f"""{COUPON_SELECT} where c.user_id = $1 and c.status = 'available' and c.valid_until > now()
            order by c.valid_until, c.id""",
        user_id,
    )


async def category_parents(conn: asyncpg.Connection, category_ids: Sequence[int]) -> dict[int, int | None]:
    rows = await conn.fetch(
        "select id, parent_id from categories where id = any($1::bigint[])", [c for c in category_ids if c]
    )
    return {r["id"]: r["parent_id"] for r in rows}


async def claim_counts(conn: asyncpg.Connection, template_id: int) -> dict[int, int]:
    """user id -> public claims of this template, as PostgreSQL knows them."""
    rows = await conn.fetch(
        """select user_id, count(*) as n from coupons where template_id = $1 and source = 'claim'
           group by user_id""",
        template_id,
    )
    return {r["user_id"]: r["n"] for r in rows}
