"""Coupon templates, claiming (the first hot path), grants, redemption at checkout, expiry and stats.

Claiming follows the hot-path contract: `claim_coupon.lua` decides (window, quota, per-user
limit, Idempotency-Key) and XADDs the reservation; losers never reach PostgreSQL; winners are
group-committed (`persist_claims`) before the 201. Redis holds, per template, the claim rules and
two counters (public claims, claims per shopper); PostgreSQL's coupons rows are the truth they are
rebuilt from (`shop reconcile`).

Redemption: a coupon is checked, priced and locked with the order in one conditional UPDATE; it
becomes used when the order is paid (order-event handler) and available again when the order is
cancelled while the coupon is still valid.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from shop.coupons import queries
from shop.coupons.schemas import CouponForCart, CouponOut, TemplateIn, TemplateOut, TemplateStats
from shop.errors import Conflict, NotFound, Unavailable, ValidationFailed
from shop.events import OrderEvent, on_order_event
from shop.hotpath import (
    HotPath,
    Reservation,
    count_tail,
    encode_payload,
    new_reservation_id,
    persist_backlog,
    register_persister,
    register_stream,
    register_streams_over,
    registered_streams,
    streams_past_end,
)
from shop.keys import Keys
from shop.orders.schemas import PricedLine
from shop.reconcile import Difference, ReconcileContext, per_user_differences, register_checker

log = logging.getLogger("shop.coupons")

KIND = "coupon"  # the hot-path stream kind
IDEMPOTENCY_TTL = 24 * 3600
# Fields that decide what a coupon is worth: frozen once shoppers may hold it.
VALUE_FIELDS = (
    "kind",
    "threshold",
    "amount",
    "percent_off",
    "max_discount",
    "scope",
    "scope_ids",
    "validity",
)

REFUSALS = {
    "not_found": (NotFound, "coupon.not_found", "No such coupon"),
    "not_started": (Conflict, "coupon.not_started", "Claiming has not started yet"),
    "ended": (Conflict, "coupon.ended", "Claiming has ended"),
    "paused": (Conflict, "coupon.paused", "Claiming is paused"),
    "sold_out": (Conflict, "coupon.sold_out", "All coupons have been claimed"),
    "limit_exceeded": (Conflict, "coupon.limit_exceeded", "You have already claimed the maximum"),
}


def _ms(value: datetime | None) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- templates


def template_out(row: asyncpg.Record, claimed: int | None = None) -> TemplateOut:
    remaining = None
    if claimed is not None and row["total_quantity"] is not None:
        remaining = max(row["total_quantity"] - claimed, 0)
    return TemplateOut(**dict(row), claimed=claimed, remaining=remaining)


def check_template(data: TemplateIn) -> None:
    """Kind-, scope- and validity-specific rules msgspec constraints cannot express."""
    problems: list[tuple[str, str]] = []
    if data.kind == "percent":
        if data.percent_off is None:
            problems.append(("percent_off", "required for a percent coupon"))
        if data.amount is not None:
            problems.append(("amount", "a percent coupon has no fixed amount"))
    else:
        if data.amount is None:
            problems.append(("amount", "required"))
        if data.percent_off is not None or data.max_discount is not None:
            problems.append(("percent_off", "only for percent coupons"))
    if data.kind == "threshold" and data.threshold < 1:
        problems.append(("threshold", "a threshold coupon needs a threshold"))
    if data.kind == "no_threshold" and data.threshold:
        problems.append(("threshold", "a no-threshold coupon has no threshold"))
    if (data.scope == "all") != (not data.scope_ids):
        problems.append(("scope_ids", "list ids for a limited scope, none for the whole store"))
    if data.claim_starts_at and data.claim_ends_at and data.claim_starts_at >= data.claim_ends_at:
        problems.append(("claim_ends_at", "must be after claim_starts_at"))
    if data.validity == "fixed":
        if data.valid_from is None or data.valid_until is None or data.valid_from >= data.valid_until:
            problems.append(("valid_until", "fixed validity needs valid_from before valid_until"))
        if data.valid_days is not None:
            problems.append(("valid_days", "only for relative validity"))
    elif data.valid_days is None:
        problems.append(("valid_days", "required for relative validity"))
    elif data.valid_from is not None or data.valid_until is not None:
        problems.append(("valid_from", "only for fixed validity"))
    for name in ("claim_starts_at", "claim_ends_at", "valid_from", "valid_until"):
        value = getattr(data, name)
        if value is not None and value.tzinfo is None:
            problems.append((name, "must include a time zone"))
    if problems:
        raise ValidationFailed(
            "; ".join(f"{f}: {m}" for f, m in problems),
            details=[{"field": f, "message": m} for f, m in problems],
        )


TEMPLATE_COLUMNS = [
    "name",
    "description",
    "kind",
    "threshold",
    "amount",
    "percent_off",
    "max_discount",
    "scope",
    "scope_ids",
    "total_quantity",
    "per_user_limit",
    "is_public",
    "for_newcomers",
    "claim_starts_at",
    "claim_ends_at",
    "validity",
    "valid_from",
    "valid_until",
    "valid_days",
]


async def create_template(conn: asyncpg.Connection, data: TemplateIn) -> TemplateOut:
    check_template(data)
    values = [getattr(data, c) for c in TEMPLATE_COLUMNS]
    row = await conn.fetchrow(
        f"""insert into coupon_templates ({", ".join(TEMPLATE_COLUMNS)})
            values ({", ".join(f"${i}" for i in range(1, len(values) + 1))})
            returning {queries.TEMPLATE_FIELDS}""",
        *values,
    )
    return template_out(row)


def state_args(row: asyncpg.Record) -> list[Any]:
    """The claim rules as warm_coupon_template.lua's ARGV[2..7]."""
    ends = _ms(row["claim_ends_at"])
    if row["validity"] == "fixed":
        # A coupon that could no longer be used is not worth claiming: claiming ends with it.
        until = _ms(row["valid_until"])
        ends = min(ends, until) if ends else until
    total = row["total_quantity"] if row["total_quantity"] is not None else -1
    return [
        row["status"],
        _ms(row["claim_starts_at"]),
        ends,
        total,
        row["per_user_limit"],
        "1" if row["is_public"] else "0",
    ]


def _template_keys(keys: Keys, template_id: int) -> list[str]:
    return [keys.coupon_state(template_id), keys.coupon_users(template_id), keys.coupon_stream(template_id)]


async def rebuild_counters(
    conn: asyncpg.Connection, redis: aioredis.Redis, scripts: Any, keys: Keys, row: asyncpg.Record
) -> int:
    """Write the template's rules and counters from PostgreSQL (the truth); returns public claims."""
    stream = keys.coupon_stream(row["id"])
    last = await persist_backlog(redis, conn, KIND, stream)
    counts = await queries.claim_counts(conn, row["id"])
    pairs: list[Any] = []
    for user_id, n in counts.items():
        pairs += [user_id, n]
    reply = await scripts.warm_coupon_template(
        keys=_template_keys(keys, row["id"]),
        args=["rebuild", *state_args(row), sum(counts.values()), last, *pairs],
    )
    await register_stream(redis, keys, KIND, stream)
    return int(reply[1])


async def warm_template(
    conn: asyncpg.Connection, redis: aioredis.Redis, scripts: Any, keys: Keys, row: asyncpg.Record
) -> int:
    """Update the live rules without touching the counters (rebuilt when Redis has none)."""
    reply = await scripts.warm_coupon_template(
        keys=_template_keys(keys, row["id"]), args=["config", *state_args(row)]
    )
    if reply[0] == "cold":
        return await rebuild_counters(conn, redis, scripts, keys, row)
    if reply[0] == "below_claimed":
        raise Conflict(
            f"{reply[1]} coupons are already claimed: the total cannot be lower",
            code="coupon.quantity_below_claimed",
        )
    return int(reply[1])


async def update_template(
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    scripts: Any,
    keys: Keys,
    template_id: int,
    data: TemplateIn,
) -> TemplateOut:
    """Edit a template; a live one keeps its counters and its value (what held coupons are worth)."""
    check_template(data)
    async with conn.transaction():
        old = await queries.fetch_template(conn, template_id, lock=True)
        if old is None:
            raise NotFound("Coupon template not found", code="coupon.template_not_found")
        if old["status"] != "draft":
            changed = [f for f in VALUE_FIELDS if old[f] != getattr(data, f)]
            if changed:
                raise Conflict(
                    f"Cannot change {', '.join(changed)} once shoppers may hold the coupon",
                    code="coupon.template_live",
                )
        values = [getattr(data, c) for c in TEMPLATE_COLUMNS]
        row = await conn.fetchrow(
            f"""update coupon_templates set ({", ".join(TEMPLATE_COLUMNS)}, updated_at)
                = ({", ".join(f"${i}" for i in range(2, len(values) + 2))}, now())
                where id = $1 returning {queries.TEMPLATE_FIELDS}""",
            template_id,
            *values,
        )
        claimed = None
        if row["status"] != "draft":
            # Inside the transaction: a refused quantity (below claimed) rolls the edit back.
            claimed = await warm_template(conn, redis, scripts, keys, row)
    if row["status"] != "draft":
        # After the commit: a claim window extended past its end makes the template claimable
        # again, and the worker, which dropped its stream, must read it again (hotpath.jobs).
        await register_stream(redis, keys, KIND, keys.coupon_stream(template_id))
    return template_out(row, claimed)


TRANSITIONS = {
    "activate": ("active", ["draft", "paused"]),
    "pause": ("paused", ["active"]),
    "end": ("ended", ["active", "paused"]),
}


async def change_status(
    conn: asyncpg.Connection, redis: aioredis.Redis, scripts: Any, keys: Keys, template_id: int, action: str
) -> TemplateOut:
    """activate (prewarms Redis), pause, end: each a conditional UPDATE on the status."""
    target, sources = TRANSITIONS[action]
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""update coupon_templates set status = $2, updated_at = now()
                where id = $1 and status = any($3::text[]) returning {queries.TEMPLATE_FIELDS}""",
            template_id,
            target,
            sources,
        )
        if row is None:
            status = await conn.fetchval("select status from coupon_templates where id = $1", template_id)
            if status is None:
                raise NotFound("Coupon template not found", code="coupon.template_not_found")
            raise Conflict(f"Cannot {action} a template that is {status}", code="coupon.illegal_transition")
        claimed = await warm_template(conn, redis, scripts, keys, row)
    return template_out(row, claimed)


async def live_claimed(
    redis: aioredis.Redis, keys: Keys, template_ids: Sequence[int]
) -> dict[int, int | None]:
    async with redis.pipeline(transaction=False) as pipe:
        for template_id in template_ids:
            pipe.hget(keys.coupon_state(template_id), "claimed")
        values = await pipe.execute()
    return {t: (int(v) if v is not None else None) for t, v in zip(template_ids, values, strict=True)}


# ---------------------------------------------------------------- claiming (the hot path)


@register_persister(KIND)
async def persist_claims(conn: asyncpg.Connection, entries: Sequence[Reservation]) -> None:
    """Many claims in one statement; a reservation already written is skipped (ON CONFLICT)."""
    await conn.execute(
        """insert into coupons (code, template_id, user_id, source, valid_from, valid_until, claimed_at)
           select e.rid, t.id, e.uid, 'claim',
                  case when t.validity = 'fixed' then t.valid_from else e.at end,
                  case when t.validity = 'fixed' then t.valid_until
                       else e.at + make_interval(days => t.valid_days) end,
                  e.at
           from (select rid, uid, tid, to_timestamp(ms / 1000.0) as at
                 from unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) as u (rid, uid, tid, ms)) e
           join coupon_templates t on t.id = e.tid
           on conflict (code) do nothing""",
        [e.id for e in entries],
        [e.user_id for e in entries],
        [e.payload["t"] for e in entries],
        [e.payload["at"] for e in entries],
    )


@dataclass(frozen=True)
class Claimed:
    code: str
    replayed: bool


async def claim_coupon(
    hotpath: HotPath,
    scripts: Any,
    keys: Keys,
    template_id: int,
    user_id: int,
    idempotency_key: str | None,
) -> Claimed:
    """Claim one coupon: Redis decides, then the row is committed; losers raise without touching PostgreSQL."""
    rid = new_reservation_id()
    now = now_ms()
    payload = encode_payload({"t": template_id, "at": now})
    reply = await hotpath.reserve(
        scripts.claim_coupon,
        keys=[
            keys.coupon_state(template_id),
            keys.coupon_users(template_id),
            keys.coupon_claim_key(template_id, user_id, idempotency_key),
            keys.coupon_stream(template_id),
        ],
        args=[now, user_id, rid, payload, "1" if idempotency_key else "0", IDEMPOTENCY_TTL],
    )
    outcome = reply[0]
    if outcome == "ok":
        reservation = Reservation(rid, user_id, {"t": template_id, "at": now})
    elif outcome == "replay":
        # The first request may still be writing (or have died): writing again is a no-op or the rescue.
        reservation = Reservation(reply[1], user_id, msgspec.json.decode(reply[2]))
    elif outcome == "cold":
        raise Unavailable("Coupon claiming is being restored, try again shortly", code="coupon.not_ready")
    else:
        error, code, message = REFUSALS[outcome]
        raise error(message, code=code)
    await hotpath.commit(KIND, reservation)
    return Claimed(reservation.id, outcome == "replay")


async def explain_cold(conn: asyncpg.Connection, template_id: int) -> None:
    """A template Redis does not know: 404 unless it is a live public one (then Redis lost it)."""
    row = await conn.fetchrow("select status, is_public from coupon_templates where id = $1", template_id)
    if row is None or row["status"] == "draft" or not row["is_public"]:
        raise NotFound("No such coupon", code="coupon.not_found")
    if row["status"] in ("ended", "paused"):
        # Not live anyway: the same answer Redis would give, not "being restored".
        error, code, message = REFUSALS[row["status"]]
        raise error(message, code=code)


# ---------------------------------------------------------------- grants


def new_code() -> str:
    return "G" + secrets.token_hex(10).upper()


GRANT_SQL = """insert into coupons (code, template_id, user_id, source, source_ref, valid_from, valid_until)
    select g.code, t.id, g.uid, $2, $3,
           case when t.validity = 'fixed' then t.valid_from else now() end,
           case when t.validity = 'fixed' then t.valid_until else now() + make_interval(days => t.valid_days) end
    from coupon_templates t
    cross join unnest($4::text[], $5::bigint[]) as g (code, uid)
    where t.id = $1
    on conflict (source, source_ref, user_id) where source_ref is not null do nothing
    returning id, user_id"""


async def _grantable(conn: asyncpg.Connection, template_id: int) -> asyncpg.Record:
    row = await queries.fetch_template(conn, template_id)
    if row is None:
        raise NotFound("Coupon template not found", code="coupon.template_not_found")
    if row["status"] != "active":
        raise Conflict(f"The template is {row['status']}", code="coupon.template_inactive")
    if row["validity"] == "fixed" and row["valid_until"] <= datetime.now(row["valid_until"].tzinfo):
        raise Conflict("The coupon's validity has ended", code="coupon.ended")
    return row


async def grant_coupon(
    conn: asyncpg.Connection, user_id: int, template_id: int, *, source: str, ref: str
) -> int | None:
    """Give one coupon outside the public claim quota (prizes, channel gifts, newcomers).

    The caller's own budget (prize stock, channel allowance) limits these; `ref` makes the grant
    idempotent: the same (source, ref, user) never yields a second coupon (returns None then).
    """
    if source == "claim":
        raise ValueError("claims go through claim_coupon")
    await _grantable(conn, template_id)
    row = await conn.fetchrow(GRANT_SQL, template_id, source, ref, [new_code()], [user_id])
    return row["id"] if row else None


async def grant_batch(
    conn: asyncpg.Connection, template_id: int, grant_id: str, user_ids: Sequence[int]
) -> dict:
    """The merchant's batch grant: idempotent per (template, grant id, shopper)."""
    wanted = sorted(set(user_ids))
    async with conn.transaction():
        await _grantable(conn, template_id)
        known = {
            r["id"] for r in await conn.fetch("select id from users where id = any($1::bigint[])", wanted)
        }
        users = [u for u in wanted if u in known]
        rows = await conn.fetch(
            GRANT_SQL, template_id, "grant", f"{template_id}:{grant_id}", [new_code() for _ in users], users
        )
    return {
        "granted": len(rows),
        "already_granted": len(users) - len(rows),
        "unknown_users": [u for u in wanted if u not in known],
    }


async def grant_newcomer_coupons(conn: asyncpg.Connection, user_id: int) -> int:
    """First login: every active newcomer template, once each. Call inside the login transaction."""
    granted = 0
    templates = await conn.fetch(
        "select id from coupon_templates where status = 'active' and for_newcomers order by id"
    )
    for t in templates:
        try:
            async with conn.transaction():  # a template that cannot be granted must not fail the login
                if await grant_coupon(conn, user_id, t["id"], source="newcomer", ref=f"newcomer:{t['id']}"):
                    granted += 1
        except (Conflict, NotFound) as exc:
            log.warning("newcomer coupon %s not granted: %s", t["id"], exc)
    return granted


# ---------------------------------------------------------------- reading


def coupon_out(row: asyncpg.Record) -> CouponOut:
    return CouponOut(**dict(row))


# ---------------------------------------------------------------- pricing and redemption


@dataclass(frozen=True)
class Pricing:
    discount: int
    shares: list[int]  # per line, in the order of the lines given
    reason: str | None  # why the coupon does not apply (None: it does)


def _in_scope(coupon: Any, line: PricedLine, parents: dict[int, int | None]) -> bool:
    scope, ids = coupon["scope"], set(coupon["scope_ids"])
    if scope == "all":
        return True
    if scope == "products":
        return line.product_id in ids
    if scope == "exclude_products":
        return line.product_id not in ids
    # A top-level category covers its children.
    return line.category_id in ids or parents.get(line.category_id) in ids


def price_coupon(
    coupon: Any, lines: Sequence[PricedLine], parents: dict[int, int | None], shipping_fee: int, now: datetime
) -> Pricing:
    """What this coupon takes off these lines, split over the eligible lines; or why it does not apply."""
    from shop.orders.service import allocate_discount

    none = Pricing(0, [0] * len(lines), None)
    if coupon["valid_until"] <= now:
        return Pricing(0, none.shares, "expired")
    if coupon["valid_from"] > now:
        return Pricing(0, none.shares, "not_started")
    eligible = [i for i, line in enumerate(lines) if _in_scope(coupon, line, parents)]
    if not eligible:
        return Pricing(0, none.shares, "scope")
    base = sum(lines[i].line_amount for i in eligible)
    if base < coupon["threshold"]:
        return Pricing(0, none.shares, "threshold")
    if coupon["kind"] == "percent":
        discount = base * coupon["percent_off"] // 100
        if coupon["max_discount"] is not None:
            discount = min(discount, coupon["max_discount"])
    else:
        discount = coupon["amount"]
    items_amount = sum(line.line_amount for line in lines)
    # Never more than the eligible lines, and the order still costs at least 1 fen.
    discount = min(discount, base, items_amount + shipping_fee - 1)
    if discount <= 0:
        return Pricing(0, none.shares, "amount_too_low")
    shares = [0] * len(lines)
    for i, share in zip(
        eligible, allocate_discount([lines[i].line_amount for i in eligible], discount), strict=True
    ):
        shares[i] = share
    return Pricing(discount, shares, None)


REASON_ERRORS = {
    "expired": ("coupon.expired", "The coupon has expired"),
    "not_started": ("coupon.not_started", "The coupon is not valid yet"),
    "scope": ("coupon.not_applicable", "Nothing in the cart qualifies for this coupon"),
    "threshold": ("coupon.threshold_not_met", "The qualifying amount is below the coupon's threshold"),
    "amount_too_low": ("coupon.not_applicable", "The order is too small for this coupon"),
}


async def apply_coupon(
    conn: asyncpg.Connection, user_id: int, coupon_id: int, lines: Sequence[PricedLine], shipping_fee: int
) -> list[PricedLine]:
    """Check ownership, state, validity, threshold and scope; return the lines with their discount share."""
    coupon = await queries.fetch_coupon(conn, coupon_id, user_id)
    if coupon is None:
        raise NotFound("Coupon not found", code="coupon.not_found")
    if coupon["status"] == "expired":
        raise Conflict("The coupon has expired", code="coupon.expired")
    if coupon["status"] != "available":
        raise Conflict(f"The coupon is {coupon['status']}", code="coupon.unavailable")
    parents = await queries.category_parents(conn, [line.category_id for line in lines])
    now = await conn.fetchval("select now()")
    pricing = price_coupon(coupon, lines, parents, shipping_fee, now)
    if pricing.reason is not None:
        code, message = REASON_ERRORS[pricing.reason]
        raise Conflict(message, code=code)
    return [
        msgspec.structs.replace(line, discount_amount=share)
        for line, share in zip(lines, pricing.shares, strict=True)
    ]


async def lock_coupon(conn: asyncpg.Connection, coupon_id: int, user_id: int, order_id: int) -> None:
    """Lock the coupon to the order in one conditional UPDATE: of two racing orders, one gets it."""
    locked = await conn.fetchval(
        """update coupons set status = 'locked', locked_order_id = $3, locked_at = now()
           where id = $1 and user_id = $2 and status = 'available' and valid_from <= now() and valid_until > now()
           returning id""",
        coupon_id,
        user_id,
        order_id,
    )
    if locked is None:
        raise Conflict("The coupon is no longer available", code="coupon.unavailable")
    await conn.execute("update orders set coupon_id = $2 where id = $1", order_id, coupon_id)


async def release_order_coupon(conn: asyncpg.Connection, order_id: int) -> None:
    """The cancelled order's coupon goes back to the shopper once (expired if its validity has passed)."""
    await conn.execute(
        """update coupons set status = case when valid_until > now() then 'available' else 'expired' end,
               expired_at = case when valid_until > now() then null else now() end,
               locked_order_id = null, locked_at = null
           where locked_order_id = $1 and status = 'locked'""",
        order_id,
    )


@on_order_event("order.paid", "coupons.mark_used")
async def mark_coupon_used(conn: asyncpg.Connection, event: OrderEvent, ctx: Any) -> None:
    await conn.execute(
        """update coupons set status = 'used', used_order_id = locked_order_id, used_at = now()
           where locked_order_id = $1 and status = 'locked'""",
        event.order_id,
    )


async def coupons_for_cart(
    conn: asyncpg.Connection, user_id: int, lines: Sequence[PricedLine], shipping_fee: int
) -> tuple[list[CouponForCart], list[CouponForCart]]:
    """(usable best first, unusable with the reason) among the shopper's available coupons."""
    rows = await queries.fetch_usable_coupons(conn, user_id)
    parents = await queries.category_parents(conn, [line.category_id for line in lines])
    now = await conn.fetchval("select now()")
    items_amount = sum(line.line_amount for line in lines)
    usable, unusable = [], []
    for row in rows:
        pricing = price_coupon(row, lines, parents, shipping_fee, now)
        entry = CouponForCart(
            coupon=coupon_out(row),
            applicable=pricing.reason is None,
            reason=pricing.reason,
            discount_amount=pricing.discount,
            payable_amount=items_amount + shipping_fee - pricing.discount,
        )
        (usable if pricing.reason is None else unusable).append(entry)
    usable.sort(key=lambda e: (-e.discount_amount, e.coupon.valid_until, e.coupon.id))
    return usable, unusable


# ---------------------------------------------------------------- expiry and stats


async def expire_coupons(pool: asyncpg.Pool, batch: int = 1000) -> int:
    """Write `expired` on available coupons past valid_until (reads already show them expired)."""
    async with pool.acquire() as conn:
        return await conn.fetchval(
            """with due as (select id from coupons where status = 'available' and valid_until <= now()
                            order by valid_until limit $1 for update skip locked),
                    done as (update coupons c set status = 'expired', expired_at = now() from due
                             where c.id = due.id and c.status = 'available' returning 1)
               select count(*) from done""",
            batch,
        )


async def template_stats(conn: asyncpg.Connection, template_id: int) -> TemplateStats:
    if not await conn.fetchval("select exists (select 1 from coupon_templates where id = $1)", template_id):
        raise NotFound("Coupon template not found", code="coupon.template_not_found")
    row = await conn.fetchrow(
        f"""select count(*) as issued,
                   count(*) filter (where c.source = 'claim') as claimed,
                   count(*) filter (where c.source <> 'claim') as granted,
                   count(*) filter (where {queries.COUPON_STATE} = 'available') as available,
                   count(*) filter (where {queries.COUPON_STATE} = 'locked') as locked,
                   count(*) filter (where {queries.COUPON_STATE} = 'used') as used,
                   count(*) filter (where {queries.COUPON_STATE} = 'expired') as expired
            from coupons c left join orders o on o.id = c.locked_order_id
            where c.template_id = $1""",
        template_id,
    )
    orders = await conn.fetchrow(
        """select count(*) as orders, coalesce(sum(o.paid_amount), 0) as gmv,
                  coalesce(sum(o.discount_amount), 0) as discount_total
           from orders o join coupons c on c.id = o.coupon_id
           where c.template_id = $1 and o.status = any($2::text[])""",
        template_id,
        queries.PAID_ORDER_STATES,
    )
    return TemplateStats(template_id=template_id, **dict(row), **dict(orders))


@register_streams_over(KIND)
async def ended_template_streams(conn: asyncpg.Connection, keys: Keys, streams: Sequence[str]) -> list[str]:
    """The streams of templates no one can claim any more: ended, gone, or their claim window (for
    a fixed validity, the coupon's own) closed over a grace period ago."""
    end = "least(t.claim_ends_at, case when t.validity = 'fixed' then t.valid_until end)"
    ids = await streams_past_end(conn, keys, streams, table="coupon_templates", end=end)
    return [keys.coupon_stream(template_id) for template_id in ids]


# ---------------------------------------------------------------- reconcile


async def check_coupon_counters(ctx: ReconcileContext) -> list[Difference]:
    """Every non-draft template: rules, public claims and claims per shopper, Redis vs PostgreSQL."""
    diffs: list[Difference] = []
    streams = set(await registered_streams(ctx.redis, ctx.keys, KIND))
    rows = await ctx.conn.fetch(
        f"select {queries.TEMPLATE_FIELDS} from coupon_templates where status <> 'draft' order by id"
    )
    # Streams of ended templates are left out of the worker's pass once drained (hotpath.jobs).
    over = set(
        await ended_template_streams(ctx.conn, ctx.keys, [ctx.keys.coupon_stream(r["id"]) for r in rows])
    )
    for row in rows:
        subject = f"coupon template {row['id']}"
        stream = ctx.keys.coupon_stream(row["id"])
        # Everything the stream holds goes to PostgreSQL first, so the counts include it.
        last = await persist_backlog(ctx.redis, ctx.conn, KIND, stream)
        counts = await queries.claim_counts(ctx.conn, row["id"])
        _, tail_users = await count_tail(ctx.redis, stream, last)
        for user_id, n in tail_users.items():
            counts[user_id] = counts.get(user_id, 0) + n
        status, starts, ends, total, limit, public = state_args(row)
        expected = {
            "status": status,
            "starts_ms": str(starts),
            "ends_ms": str(ends),
            "total": str(total),
            "per_user_limit": str(limit),
            "public": public,
            "claimed": str(sum(counts.values())),
        }
        actual = await ctx.redis.hgetall(ctx.keys.coupon_state(row["id"]))
        for field, want in expected.items():
            if actual.get(field) != want:
                diffs.append(Difference("coupons", subject, field, want, actual.get(field)))
        diffs += per_user_differences(
            "coupons", subject, "claims of user {user_id}", counts,
            await ctx.redis.hgetall(ctx.keys.coupon_users(row["id"])),
        )  # fmt: skip
        if stream not in streams and stream not in over:
            diffs.append(Difference("coupons", subject, "stream registered", True, False))
    return diffs


async def fix_coupon_counters(ctx: ReconcileContext, diffs: list[Difference]) -> None:
    template_ids = sorted({int(d.subject.rsplit(" ", 1)[1]) for d in diffs})
    for template_id in template_ids:
        row = await queries.fetch_template(ctx.conn, template_id)
        await rebuild_counters(ctx.conn, ctx.redis, ctx.scripts, ctx.keys, row)


register_checker("coupons", check_coupon_counters, fix_coupon_counters)


# ---------------------------------------------------------------- demo data

DEMO_TEMPLATE = TemplateIn(
    name="新人专享 满99减10",
    description="demo: claim it in the coupon centre, use it on any order of 99 yuan or more",
    kind="threshold",
    threshold=9900,
    amount=1000,
    validity="relative",
    valid_days=30,
    total_quantity=1000,
    per_user_limit=1,
)


async def seed_demo_coupons(conn: asyncpg.Connection, redis: aioredis.Redis, scripts: Any, keys: Keys) -> int:
    """The demo store's claimable coupon, created and activated once; returns how many were created."""
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock(hashtextextended('seed:coupons', 0))")
        if await conn.fetchval(
            "select exists (select 1 from coupon_templates where name = $1)", DEMO_TEMPLATE.name
        ):
            return 0
        template = await create_template(conn, DEMO_TEMPLATE)
    await change_status(conn, redis, scripts, keys, template.id, "activate")
    return 1
