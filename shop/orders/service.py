"""Checkout pricing, order creation, the state machine, and giving units back.

Every transition is one conditional UPDATE on the order's status, so two racing transitions
(a payment and a timeout cancel, two confirmations) end in exactly one of them. Each state
change writes its order event in the same transaction (shop/events.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from shop.catalog.queries import fetch_skus_for_sale
from shop.errors import Conflict, NotFound, ValidationFailed
from shop.events import record_event
from shop.orders.schemas import LineIn, OrderIn, OrderLineOut, OrderOut, PricedLine, ShipIn, ShipmentOut
from shop.settings import Settings

AfterCommit = Callable[[], Awaitable[None]]

ORDER_FIELDS = """id, order_no, user_id, kind, activity_id, status, items_amount, discount_amount,
    shipping_fee, payable_amount, paid_amount, refunded_amount, address, remark, pay_deadline, paid_at,
    shipped_at, auto_confirm_at, completed_at, cancelled_at, cancel_reason, payment_provider, created_at, coupon_id"""


# ---------------------------------------------------------------- numbers


async def business_no(conn: asyncpg.Connection, settings: Settings, prefix: str = "") -> str:
    """A human-readable unique number: store-local time + a sequence tail (+ a random digit)."""
    seq = await conn.fetchval("select nextval('business_no_seq')")
    local = datetime.now(settings.tz)
    return f"{prefix}{local:%Y%m%d%H%M%S}{seq % 1_000_000:06d}{secrets.randbelow(10)}"


# ---------------------------------------------------------------- pricing


def merge_lines(items: Iterable[LineIn]) -> dict[int, int]:
    """sku_id -> total qty, so one SKU listed twice is priced and stocked once."""
    merged: dict[int, int] = {}
    for item in items:
        merged[item.sku_id] = merged.get(item.sku_id, 0) + item.qty
    return merged


# The largest cart one order takes, in fen (20 million yuan): amounts are 32-bit integer columns,
# with room left for shipping.
MAX_ORDER_AMOUNT = 2_000_000_000


async def price_lines(conn: asyncpg.Connection, items: Iterable[LineIn]) -> list[PricedLine]:
    """Price every line from the database (a client-sent price is never read), in SKU-id order."""
    wanted = merge_lines(items)
    rows = await fetch_skus_for_sale(conn, list(wanted))
    found = {r["sku_id"]: r for r in rows}
    for sku_id in wanted:
        if sku_id not in found:
            raise NotFound(f"SKU {sku_id} does not exist", code="catalog.sku_not_found")
    lines = []
    for sku_id in sorted(wanted):
        row, qty = found[sku_id], wanted[sku_id]
        if not row["is_active"] or row["product_status"] != "on_shelf":
            raise Conflict(f"{row['title']} is no longer on sale", code="order.sku_unavailable")
        lines.append(
            PricedLine(
                sku_id=sku_id,
                product_id=row["product_id"],
                title=row["title"],
                specs=row["specs"],
                image_url=row["image_url"],
                unit_price=row["price"],
                qty=qty,
                line_amount=row["price"] * qty,
                in_stock=row["stock"] >= qty,
                category_id=row["category_id"],
            )
        )
    if sum(line.line_amount for line in lines) > MAX_ORDER_AMOUNT:
        raise ValidationFailed(
            f"An order may total at most {MAX_ORDER_AMOUNT // 100} yuan; split the cart",
            code="order.amount_too_large",
            details=[{"field": "items", "message": "the cart's total is too large for one order"}],
        )
    return lines


async def shipping_fee_for(conn: asyncpg.Connection, items_amount: int) -> int:
    rule = await conn.fetchrow("select flat_fee, free_threshold from shipping_rule where id = 1")
    if rule is None:
        return 0
    if rule["free_threshold"] is not None and items_amount >= rule["free_threshold"]:
        return 0
    return rule["flat_fee"]


def allocate_discount(amounts: Sequence[int], discount: int) -> list[int]:
    """Split `discount` across lines in proportion to their amounts; the remainder goes on the last line."""
    total = sum(amounts)
    if total == 0 or discount == 0:
        return [0] * len(amounts)
    discount = min(discount, total)
    shares = [discount * a // total for a in amounts[:-1]]
    shares.append(discount - sum(shares))
    # A small last line cannot take more than its amount: the excess moves to earlier lines with room.
    excess, i = shares[-1] - amounts[-1], len(amounts) - 2
    while excess > 0:
        take = min(excess, amounts[i] - shares[i])
        shares[i] += take
        shares[-1] -= take
        excess -= take
        i -= 1
    return shares


# ---------------------------------------------------------------- creating orders


async def take_sku_stock(conn: asyncpg.Connection, lines: Sequence[PricedLine]) -> None:
    """Guarded decrements in SKU-id order: concurrent multi-line orders lock rows in one order, no deadlock."""
    for line in sorted(lines, key=lambda ln: ln.sku_id):
        left = await conn.fetchval(
            "update skus set stock = stock - $2, sales = sales + $2, updated_at = now() "
            "where id = $1 and stock >= $2 returning stock",
            line.sku_id,
            line.qty,
        )
        if left is None:
            raise Conflict(f"Not enough stock for {line.title}", code="stock.insufficient")
    per_product: dict[int, int] = {}
    for line in lines:
        per_product[line.product_id] = per_product.get(line.product_id, 0) + line.qty
    for product_id in sorted(per_product):
        await conn.execute(
            "update products set sales = sales + $2 where id = $1", product_id, per_product[product_id]
        )


async def create_order(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    user_id: int,
    lines: Sequence[PricedLine],
    address: dict[str, Any] | None,
    shipping_fee: int,
    kind: str = "normal",
    activity_id: int | None = None,
    remark: str = "",
    pay_deadline_minutes: int | None = None,
) -> int:
    """Insert the order, its line snapshots and its `order.created` event; units must already be taken."""
    items_amount = sum(line.line_amount for line in lines)
    discount = sum(line.discount_amount for line in lines)
    payable = items_amount - discount + shipping_fee
    if payable < 1 and kind != "prize":
        raise Conflict("The payable amount must be at least 1 fen", code="order.amount_too_low")
    minutes = pay_deadline_minutes or settings.pay_deadline_minutes
    order_no = await business_no(conn, settings)
    order_id = await conn.fetchval(
        """insert into orders (order_no, user_id, kind, activity_id, items_amount, discount_amount,
               shipping_fee, payable_amount, address, remark, pay_deadline)
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(mins => $11))
           returning id""",
        order_no,
        user_id,
        kind,
        activity_id,
        items_amount,
        discount,
        shipping_fee,
        payable,
        address,
        remark,
        minutes,
    )
    await conn.execute(
        """insert into order_lines (order_id, sku_id, product_id, title, specs, image_url, unit_price, qty,
               line_amount, discount_amount, payable_amount)
           select $1, l.sku_id, l.product_id, l.title, l.specs, l.image_url, l.unit_price, l.qty,
                  l.unit_price * l.qty, l.discount, l.unit_price * l.qty - l.discount
           from unnest($2::bigint[], $3::bigint[], $4::text[], $5::jsonb[], $6::text[], $7::int[], $8::int[],
                       $9::int[])
                as l (sku_id, product_id, title, specs, image_url, unit_price, qty, discount)""",
        order_id,
        [ln.sku_id for ln in lines],
        [ln.product_id for ln in lines],
        [ln.title for ln in lines],
        [ln.specs for ln in lines],
        [ln.image_url for ln in lines],
        [ln.unit_price for ln in lines],
        [ln.qty for ln in lines],
        [ln.discount_amount for ln in lines],
    )
    await record_event(conn, order_id, "order.created", {"kind": kind, "payable_amount": payable})
    return order_id


async def place_order(conn: asyncpg.Connection, settings: Settings, user_id: int, body: OrderIn) -> OrderOut:
    """A normal order: price from the database, take SKU stock, snapshot the address. Call inside a transaction."""
    from shop.users import get_address_snapshot

    lines = await price_lines(conn, body.items)
    address = await get_address_snapshot(conn, user_id, body.address_id)
    items_amount = sum(line.line_amount for line in lines)
    fee = await shipping_fee_for(conn, items_amount)
    if body.coupon_id is not None:
        from shop.coupons.service import apply_coupon

        lines = await apply_coupon(conn, user_id, body.coupon_id, lines, fee)
    await take_sku_stock(conn, lines)
    order_id = await create_order(
        conn, settings, user_id=user_id, lines=lines, address=address, shipping_fee=fee, remark=body.remark
    )
    if body.coupon_id is not None:
        from shop.coupons.service import lock_coupon

        # After the SKU rows: every writer locks SKUs before coupons (cancel does too), so no deadlock.
        await lock_coupon(conn, body.coupon_id, user_id, order_id)
    return await load_order(conn, order_id)


# ---------------------------------------------------------------- reading


def _order_out(row: asyncpg.Record, lines: list, shipments: list) -> OrderOut:
    return OrderOut(**dict(row), lines=lines, shipments=shipments)


async def load_orders(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> list[OrderOut]:
    ids = [r["id"] for r in rows]
    line_rows = await conn.fetch(
        """select id, order_id, sku_id, product_id, title, specs, image_url, unit_price, qty, line_amount,
                  discount_amount, payable_amount, refunded_qty, refunded_amount
           from order_lines where order_id = any($1::bigint[]) order by id""",
        ids,
    )
    ship_rows = await conn.fetch(
        """select id, order_id, carrier, tracking_no, line_ids, created_at from shipments
           where order_id = any($1::bigint[]) order by id""",
        ids,
    )
    lines: dict[int, list] = {i: [] for i in ids}
    for r in line_rows:
        d = dict(r)
        lines[d.pop("order_id")].append(OrderLineOut(**d))
    shipments: dict[int, list] = {i: [] for i in ids}
    for r in ship_rows:
        d = dict(r)
        shipments[d.pop("order_id")].append(ShipmentOut(**d))
    return [_order_out(r, lines[r["id"]], shipments[r["id"]]) for r in rows]


async def load_order(conn: asyncpg.Connection, order_id: int, user_id: int | None = None) -> OrderOut:
    """One order with lines and shipments; another shopper's order is 404."""
    row = await conn.fetchrow(
        f"select {ORDER_FIELDS} from orders where id = $1 and ($2::bigint is null or user_id = $2)",
        order_id,
        user_id,
    )
    if row is None:
        raise NotFound("Order not found", code="order.not_found")
    return (await load_orders(conn, [row]))[0]


async def list_orders(
    conn: asyncpg.Connection,
    *,
    user_id: int | None,
    status: str | None,
    before_id: int | None,
    limit: int,
    query: str | None = None,
) -> list[OrderOut]:
    """Newest first; `query` matches an order number prefix or the receiver's phone (merchant search)."""
    rows = await conn.fetch(
        f"""select {ORDER_FIELDS} from orders
            where ($1::bigint is null or user_id = $1)
              and ($2::text is null or status = $2)
              and ($3::bigint is null or id < $3)
              and ($5::text is null or starts_with(order_no, $5) or address->>'phone' = $5)
            order by id desc limit $4""",
        user_id,
        status,
        before_id,
        limit,
        query,
    )
    return await load_orders(conn, rows)


# ---------------------------------------------------------------- giving units back

# order kind -> how its units go back to where they came from. A returner gets the order row
# and [(sku_id, qty)] and may return callbacks to run after commit (Redis quota restores).
UnitReturner = Callable[
    [asyncpg.Connection, asyncpg.Record, list[tuple[int, int]]], Awaitable[list[AfterCommit]]
]


async def return_to_sku_stock(
    conn: asyncpg.Connection, order: asyncpg.Record, units: list[tuple[int, int]]
) -> list[AfterCommit]:
    """SKUs in id order, then products in id order: the lock order take_sku_stock uses, so no deadlock."""
    per_product: dict[int, int] = {}
    for sku_id, qty in sorted(units):
        product_id = await conn.fetchval(
            """update skus set stock = stock + $2, sales = greatest(sales - $2, 0), updated_at = now()
               where id = $1 returning product_id""",
            sku_id,
            qty,
        )
        per_product[product_id] = per_product.get(product_id, 0) + qty
    for product_id in sorted(per_product):
        await conn.execute(
            "update products set sales = greatest(sales - $2, 0) where id = $1",
            product_id,
            per_product[product_id],
        )
    return []


UNIT_RETURNERS: dict[str, UnitReturner] = {"normal": return_to_sku_stock}


def register_unit_returner(kind: str, returner: UnitReturner) -> None:
    UNIT_RETURNERS[kind] = returner


async def give_back_units(
    conn: asyncpg.Connection, order: asyncpg.Record, units: list[tuple[int, int]]
) -> list[AfterCommit]:
    """The one way units go back (cancel, timeout, refund). Call only after the guarded state change."""
    units = [(sku, qty) for sku, qty in units if qty > 0]
    if not units:
        return []
    returner = UNIT_RETURNERS.get(order["kind"])
    if returner is None:
        raise RuntimeError(f"no unit returner for order kind {order['kind']}")
    return await returner(conn, order, units)


async def run_after_commit(callbacks: Iterable[AfterCommit]) -> None:
    for callback in callbacks:
        await callback()


# ---------------------------------------------------------------- transitions


async def _illegal(conn: asyncpg.Connection, order_id: int, user_id: int | None, action: str) -> Exception:
    status = await conn.fetchval(
        "select status from orders where id = $1 and ($2::bigint is null or user_id = $2)", order_id, user_id
    )
    if status is None:
        return NotFound("Order not found", code="order.not_found")
    return Conflict(f"Cannot {action} an order that is {status}", code="order.illegal_transition")


async def cancel_order(
    conn: asyncpg.Connection, order_id: int, *, reason: str, user_id: int | None = None
) -> list[AfterCommit]:
    """pending_payment -> cancelled, units back once, open payments closed. Call inside a transaction."""
    order = await conn.fetchrow(
        """update orders set status = 'cancelled', cancelled_at = now(), cancel_reason = $3, updated_at = now()
           where id = $1 and status = 'pending_payment' and ($2::bigint is null or user_id = $2)
           returning id, kind, activity_id, user_id, coupon_id""",
        order_id,
        user_id,
        reason,
    )
    if order is None:
        raise await _illegal(conn, order_id, user_id, "cancel")
    units = await conn.fetch("select sku_id, qty from order_lines where order_id = $1", order_id)
    after = await give_back_units(conn, order, [(r["sku_id"], r["qty"]) for r in units])
    if order["coupon_id"] is not None:
        from shop.coupons.service import release_order_coupon

        # After the SKU rows (same lock order as placing), guarded by this one status change.
        await release_order_coupon(conn, order_id)
    # The provider's close-order call happens in the worker (close_synced = false marks it due).
    await conn.execute(
        "update payments set status = 'closed', closed_at = now() where order_id = $1 and status = 'open'",
        order_id,
    )
    await record_event(conn, order_id, "order.cancelled", {"reason": reason})
    return after


async def shopper_cancel(conn: asyncpg.Connection, order_id: int, user_id: int) -> OrderOut:
    async with conn.transaction():
        after = await cancel_order(conn, order_id, reason="cancelled by shopper", user_id=user_id)
    await run_after_commit(after)
    return await load_order(conn, order_id, user_id)


async def ship_order(conn: asyncpg.Connection, settings: Settings, order_id: int, body: ShipIn) -> OrderOut:
    """paid -> shipped with one shipment per package; auto-confirm is scheduled."""
    async with conn.transaction():
        order = await conn.fetchrow(
            """update orders set status = 'shipped', shipped_at = now(), updated_at = now(),
                   auto_confirm_at = now() + make_interval(days => $2)
               where id = $1 and status = 'paid' returning id""",
            order_id,
            settings.auto_confirm_days,
        )
        if order is None:
            raise await _illegal(conn, order_id, None, "ship")
        line_ids = {
            r["id"] for r in await conn.fetch("select id from order_lines where order_id = $1", order_id)
        }
        for package in body.packages:
            unknown = set(package.line_ids) - line_ids
            if unknown:
                raise NotFound(f"Order has no line {min(unknown)}", code="order.line_not_found")
            try:
                async with conn.transaction():
                    await conn.execute(
                        "insert into shipments (order_id, carrier, tracking_no, line_ids) values ($1, $2, $3, $4)",
                        order_id,
                        package.carrier,
                        package.tracking_no,
                        package.line_ids,
                    )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(
                    f"Tracking number {package.tracking_no} is already used", code="order.tracking_no_taken"
                ) from exc
        await record_event(conn, order_id, "order.shipped", {"packages": len(body.packages)})
    return await load_order(conn, order_id)


async def complete_order(
    conn: asyncpg.Connection, order_id: int, *, user_id: int | None = None, by: str = "shopper"
) -> OrderOut:
    """shipped -> completed (shopper confirms receipt, merchant marks it, or auto-confirm)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """update orders set status = 'completed', completed_at = now(), updated_at = now()
               where id = $1 and status = 'shipped' and ($2::bigint is null or user_id = $2) returning id""",
            order_id,
            user_id,
        )
        if row is None:
            raise await _illegal(conn, order_id, user_id, "complete")
        await record_event(conn, order_id, "order.completed", {"by": by})
    return await load_order(conn, order_id, user_id)


async def mark_order_paid(
    conn: asyncpg.Connection, order_id: int, *, amount: int, provider: str, payment_id: int
) -> bool:
    """pending_payment -> paid; False when the order is no longer payable (cancelled: caller refunds)."""
    row = await conn.fetchrow(
        """update orders set status = 'paid', paid_at = now(), paid_amount = $2, payment_provider = $3,
               paid_payment_id = $4, updated_at = now()
           where id = $1 and status = 'pending_payment' and payable_amount = $2 returning id""",
        order_id,
        amount,
        provider,
        payment_id,
    )
    if row is None:
        return False
    await record_event(
        conn, order_id, "order.paid", {"amount": amount, "provider": provider, "payment_id": payment_id}
    )
    return True


# ---------------------------------------------------------------- worker jobs


async def cancel_expired_orders(pool: asyncpg.Pool, batch: int = 100) -> int:
    """Cancel unpaid orders past their deadline, one short transaction per order.

    One transaction per order keeps each cancel's SKU locks in SKU-id order (a batch would lock
    them in deadline order and deadlock with checkouts); SKIP LOCKED lets several workers share.
    """
    async with pool.acquire() as conn:
        candidates = await conn.fetch(
            """select id from orders where status = 'pending_payment' and pay_deadline < now()
               order by pay_deadline limit $1""",
            batch,
        )
        cancelled = 0
        for candidate in candidates:
            async with conn.transaction():
                claimed = await conn.fetchval(
                    """select id from orders where id = $1 and status = 'pending_payment' and pay_deadline < now()
                       for update skip locked""",
                    candidate["id"],
                )
                if claimed is None:
                    continue
                after = await cancel_order(conn, claimed, reason="payment timeout")
            await run_after_commit(after)
            cancelled += 1
    return cancelled


async def auto_confirm_orders(pool: asyncpg.Pool, batch: int = 100) -> int:
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """update orders set status = 'completed', completed_at = now(), updated_at = now()
               where id in (select id from orders o where status = 'shipped' and auto_confirm_at < now()
                              -- a refund waiting for the merchant pauses auto-confirm
                              and not exists (select 1 from refunds r where r.order_id = o.id and r.status = 'requested')
                            order by auto_confirm_at limit $1 for update skip locked)
                 and status = 'shipped'
               returning id""",
            batch,
        )
        for row in rows:
            await record_event(conn, row["id"], "order.completed", {"by": "auto_confirm"})
    return len(rows)
