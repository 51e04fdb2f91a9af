"""Refund requests: their own records (several per order), approved, paid back by the worker with retries.

A request reserves the refunded quantity and amount on each line at once (a conditional
UPDATE that never lets them pass what was paid), so concurrent requests cannot refund more
than the shopper paid; a rejected request releases its reservation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from shop.auth_tokens import AuthAdmin, AuthUser, admin_guard
from shop.errors import Conflict, NotFound, ValidationFailed
from shop.events import record_event
from shop.idempotency import IdempotencyKey, idempotent_response, run_idempotent
from shop.orders.service import business_no, give_back_units, run_after_commit
from shop.pagination import DEFAULT_LIMIT, MAX_LIMIT, IdFilter, decode_id_cursor, encode_cursor
from shop.payments.base import NotifyRejected, PaymentProvider, ProviderError
from shop.schemas import Schema
from shop.settings import Settings

log = logging.getLogger("shop.refunds")

# failed: the provider ended the refund without paying it out (WeChat Pay ABNORMAL or CLOSED);
# an operator retries it under a new number (CLOSED) or records how it was settled.
RefundStatus = Literal["requested", "approved", "rejected", "processing", "succeeded", "failed"]
Id = Annotated[int, msgspec.Meta(ge=1, le=2**62)]


class RefundLineIn(Schema):
    line_id: Id
    qty: Annotated[int, msgspec.Meta(ge=0, le=999)]
    # Defaults to the line's paid amount for that quantity; may be lower (e.g. a partial price refund).
    amount: Annotated[int, msgspec.Meta(ge=1)] | None = None


class RefundIn(Schema):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    # Omitted: refund everything still refundable (plus shipping when nothing was shipped).
    lines: Annotated[list[RefundLineIn], msgspec.Meta(min_length=1, max_length=50)] | None = None


class RefundLineOut(Schema):
    order_line_id: int
    qty: int
    amount: int


class RefundOut(Schema):
    id: int
    refund_no: str
    order_id: int
    status: RefundStatus
    origin: str
    reason: str
    amount: int
    restock: bool | None
    reject_reason: str | None
    attempts: int
    last_error: str | None
    provider_status: str | None
    settled_note: str | None
    received_account: str | None
    created_at: datetime
    decided_at: datetime | None
    succeeded_at: datetime | None
    lines: list[RefundLineOut] = []


class RefundActionOut(Schema):
    action: Literal["approve", "reject", "retry", "settle"]
    admin_id: int | None
    admin_username: str | None
    refund_no: str
    note: str | None
    created_at: datetime


class RefundPage(Schema):
    items: list[RefundOut]
    next_cursor: str | None = None


class ApproveIn(Schema):
    # Whether the goods came back (or were never shipped): their units return to stock.
    restock: bool


class RejectIn(Schema):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class SettleIn(Schema):
    # How the money reached the shopper (e.g. "abnormal refund to bank card, merchant platform").
    note: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


REFUND_FIELDS = """id, refund_no, order_id, status, origin, reason, amount, restock, reject_reason, attempts,
    last_error, provider_status, settled_note, received_account, created_at, decided_at, succeeded_at"""


async def load_refunds(conn: asyncpg.Connection, rows) -> list[RefundOut]:
    ids = [r["id"] for r in rows]
    lines: dict[int, list[RefundLineOut]] = {i: [] for i in ids}
    for r in await conn.fetch(
        "select refund_id, order_line_id, qty, amount from refund_lines where refund_id = any($1::bigint[])"
        " order by order_line_id",
        ids,
    ):
        lines[r["refund_id"]].append(
            RefundLineOut(order_line_id=r["order_line_id"], qty=r["qty"], amount=r["amount"])
        )
    return [RefundOut(**dict(r), lines=lines[r["id"]]) for r in rows]


async def load_refund(conn: asyncpg.Connection, refund_id: int) -> RefundOut:
    row = await conn.fetchrow(f"select {REFUND_FIELDS} from refunds where id = $1", refund_id)
    if row is None:
        raise NotFound("Refund not found", code="refund.not_found")
    return (await load_refunds(conn, [row]))[0]


# Provider outcomes that end a refund number unpaid (WeChat Pay's; the sandbox uses the same words).
FAILED_PROVIDER_STATUSES = frozenset({"ABNORMAL", "CLOSED"})
# Of those, the ones after which nothing waits at the provider: the refund may go out under a new number.
RETRYABLE_PROVIDER_STATUSES = frozenset({"CLOSED"})
# And the ones the provider may still finish (the merchant handles an ABNORMAL refund at WeChat
# Pay's platform): asked about every RECHECK_INTERVAL until it succeeds or an operator settles it.
RECHECKED_PROVIDER_STATUSES = frozenset({"ABNORMAL"})
RECHECK_INTERVAL = timedelta(minutes=30)


async def _record_action(
    conn: asyncpg.Connection, refund_id: int, action: str, admin_id: int | None, note: str | None = None
) -> None:
    """In the transaction that makes the decision: who made it, under which refund number."""
    await conn.execute(
        """insert into refund_actions (refund_id, action, admin_id, refund_no, note)
           select id, $2, $3, refund_no, $4 from refunds where id = $1""",
        refund_id,
        action,
        admin_id,
        note,
    )


async def refund_actions(conn: asyncpg.Connection, refund_id: int) -> list[RefundActionOut]:
    await load_refund(conn, refund_id)  # 404 when there is no such refund
    rows = await conn.fetch(
        """select a.action, a.admin_id, m.username as admin_username, a.refund_no, a.note, a.created_at
           from refund_actions a left join admins m on m.id = a.admin_id
           where a.refund_id = $1 order by a.id""",
        refund_id,
    )
    return [RefundActionOut(**dict(r)) for r in rows]


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(3600, 5 * 2 ** min(attempts, 10)))


async def _is_fully_reserved(conn: asyncpg.Connection, order_id: int) -> bool:
    return await conn.fetchval(
        "select bool_and(refunded_amount = payable_amount) from order_lines where order_id = $1", order_id
    )


async def _is_fully_approved(conn: asyncpg.Connection, order_id: int) -> bool:
    """Every line's whole paid amount is in approved (or finished) refunds: the order is being refunded."""
    return await conn.fetchval(
        """select bool_and(coalesce(a.amount, 0) = l.payable_amount)
           from order_lines l
           left join (select rl.order_line_id, sum(rl.amount) as amount
                      from refund_lines rl join refunds r on r.id = rl.refund_id
                      where r.order_id = $1 and r.status in ('approved', 'processing', 'succeeded', 'failed')
                      group by rl.order_line_id) a on a.order_line_id = l.id
           where l.order_id = $1""",
        order_id,
    )


async def _start_full_refund(conn: asyncpg.Connection, order_id: int) -> None:
    """Every line is now being refunded: the order enters `refunding` (remembering where it came from)."""
    await conn.execute(
        """update orders set refund_from_status = status, status = 'refunding', updated_at = now()
           where id = $1 and status in ('paid', 'shipped', 'completed')""",
        order_id,
    )


async def _restock(conn: asyncpg.Connection, order: asyncpg.Record, refund_id: int) -> list:
    units = await conn.fetch(
        """select l.sku_id, r.qty from refund_lines r join order_lines l on l.id = r.order_line_id
           where r.refund_id = $1""",
        refund_id,
    )
    return await give_back_units(conn, order, [(u["sku_id"], u["qty"]) for u in units])


async def request_refund(
    conn: asyncpg.Connection, settings: Settings, user_id: int, order_id: int, body: RefundIn
) -> tuple[RefundOut, list]:
    """Reserve the lines' amounts and create the request; before shipping it is approved at once."""
    order = await conn.fetchrow(
        """select id, user_id, kind, activity_id, status, shipping_fee, paid_amount from orders
           where id = $1 and user_id = $2 for update""",
        order_id,
        user_id,
    )
    if order is None:
        raise NotFound("Order not found", code="order.not_found")
    if order["status"] not in ("paid", "shipped", "completed"):
        raise Conflict(f"An order that is {order['status']} cannot be refunded", code="refund.not_allowed")
    lines = {
        r["id"]: r
        for r in await conn.fetch(
            "select id, sku_id, qty, payable_amount, refunded_qty, refunded_amount from order_lines where order_id = $1",
            order_id,
        )
    }
    # (line_id, qty, amount). A line a coupon covered whole was paid 0 fen: its units still come
    # back (and are reserved, so the order counts as wholly refunded only once they are).
    wanted: list[tuple[int, int, int]] = []
    if body.lines is None:
        for line in lines.values():
            amount = line["payable_amount"] - line["refunded_amount"]
            qty = line["qty"] - line["refunded_qty"]
            if amount > 0 or qty > 0:
                wanted.append((line["id"], qty, amount))
    else:
        seen = set()
        for item in body.lines:
            line = lines.get(item.line_id)
            if line is None:
                raise NotFound(f"Order has no line {item.line_id}", code="order.line_not_found")
            if item.line_id in seen:
                raise ValidationFailed("A line is listed twice", code="refund.duplicate_line")
            seen.add(item.line_id)
            left_qty = line["qty"] - line["refunded_qty"]
            left_amount = line["payable_amount"] - line["refunded_amount"]
            if item.qty > left_qty:
                raise Conflict("Refund quantity exceeds what is left on the line", code="refund.exceeds_paid")
            if item.amount is None:
                # Whole remaining quantity: the exact remainder, so shares of a split discount add up.
                amount = (
                    left_amount if item.qty == left_qty else line["payable_amount"] * item.qty // line["qty"]
                )
            else:
                amount = item.amount
            if amount > left_amount:
                raise Conflict("Refund amount exceeds what was paid for the line", code="refund.exceeds_paid")
            if amount > 0 or item.qty > 0:
                wanted.append((item.line_id, item.qty, amount))
    if not wanted:
        raise Conflict("Nothing left to refund on this order", code="refund.nothing_to_refund")
    for line_id, qty, amount in sorted(wanted):
        ok = await conn.fetchval(
            """update order_lines set refunded_qty = refunded_qty + $2, refunded_amount = refunded_amount + $3
               where id = $1 and refunded_qty + $2 <= qty and refunded_amount + $3 <= payable_amount
               returning 1""",
            line_id,
            qty,
            amount,
        )
        if ok is None:
            raise Conflict("Refund amount exceeds what was paid for the line", code="refund.exceeds_paid")
    total = sum(amount for _, _, amount in wanted)
    full = await _is_fully_reserved(conn, order_id)
    if full and order["status"] == "paid":
        total += order["shipping_fee"]  # nothing was shipped: shipping is refunded too
    if total <= 0:  # only lines paid 0 fen, with no shipping to pay back (the reservations roll back)
        raise Conflict("Nothing was paid for what is asked back", code="refund.nothing_to_refund")
    auto = order["status"] == "paid"
    payment_id = await conn.fetchval("select paid_payment_id from orders where id = $1", order_id)
    refund_id = await conn.fetchval(
        """insert into refunds (refund_no, order_id, user_id, payment_id, status, origin, reason, amount, restock,
               decided_at, next_attempt_at)
           values ($1, $2, $3, $4, $5, 'shopper', $6, $7, $8, case when $9 then now() end,
                   case when $9 then now() end) returning id""",
        await business_no(conn, settings, prefix="R"),
        order_id,
        user_id,
        payment_id,
        "approved" if auto else "requested",
        body.reason,
        total,
        True if auto else None,
        auto,
    )
    await conn.execute(
        """insert into refund_lines (refund_id, order_line_id, qty, amount)
           select $1, l, q, a from unnest($2::bigint[], $3::int[], $4::int[]) as t (l, q, a)""",
        refund_id,
        [w[0] for w in wanted],
        [w[1] for w in wanted],
        [w[2] for w in wanted],
    )
    await record_event(conn, order_id, "order.refund_requested", {"refund_id": refund_id, "amount": total})
    after: list = []
    if auto:
        after = await _restock(conn, order, refund_id)
        if await _is_fully_approved(conn, order_id):
            await _start_full_refund(conn, order_id)
        await record_event(conn, order_id, "order.refund_approved", {"refund_id": refund_id, "auto": True})
    return await load_refund(conn, refund_id), after


async def create_system_refund(
    conn: asyncpg.Connection, settings: Settings, order_id: int, payment_id: int, amount: int, reason: str
) -> int:
    """Refund a whole payment that must not be kept (e.g. it arrived after the order was cancelled)."""
    user_id = await conn.fetchval("select user_id from orders where id = $1", order_id)
    return await conn.fetchval(
        """insert into refunds (refund_no, order_id, user_id, payment_id, status, origin, reason, amount,
               decided_at, next_attempt_at)
           values ($1, $2, $3, $4, 'approved', 'system', $5, $6, now(), now()) returning id""",
        await business_no(conn, settings, prefix="R"),
        order_id,
        user_id,
        payment_id,
        reason,
        amount,
    )


async def approve_refund(
    conn: asyncpg.Connection, refund_id: int, restock: bool, admin_id: int | None = None
) -> RefundOut:
    async with conn.transaction():
        order_id = await conn.fetchval("select order_id from refunds where id = $1", refund_id)
        if order_id is None:
            raise NotFound("Refund not found", code="refund.not_found")
        order = await conn.fetchrow(
            "select id, kind, activity_id, user_id from orders where id = $1 for update", order_id
        )
        row = await conn.fetchrow(
            """update refunds set status = 'approved', restock = $2, decided_at = now(), next_attempt_at = now()
               where id = $1 and status = 'requested' returning id""",
            refund_id,
            restock,
        )
        if row is None:
            raise Conflict("Only a requested refund can be approved", code="refund.illegal_transition")
        await _record_action(conn, refund_id, "approve", admin_id, "restock" if restock else None)
        after = await _restock(conn, order, refund_id) if restock else []
        if await _is_fully_approved(conn, order_id):
            await _start_full_refund(conn, order_id)
        await record_event(
            conn, order_id, "order.refund_approved", {"refund_id": refund_id, "restock": restock}
        )
    await run_after_commit(after)
    return await load_refund(conn, refund_id)


async def reject_refund(
    conn: asyncpg.Connection, refund_id: int, reason: str, admin_id: int | None = None
) -> RefundOut:
    async with conn.transaction():
        order_id = await conn.fetchval("select order_id from refunds where id = $1", refund_id)
        if order_id is None:
            raise NotFound("Refund not found", code="refund.not_found")
        await conn.execute("select 1 from orders where id = $1 for update", order_id)
        row = await conn.fetchrow(
            """update refunds set status = 'rejected', reject_reason = $2, decided_at = now()
               where id = $1 and status = 'requested' returning id""",
            refund_id,
            reason,
        )
        if row is None:
            raise Conflict("Only a requested refund can be rejected", code="refund.illegal_transition")
        await _record_action(conn, refund_id, "reject", admin_id, reason)
        # Release the reservation so the shopper may ask again.
        await conn.execute(
            """update order_lines l set refunded_qty = l.refunded_qty - r.qty, refunded_amount = l.refunded_amount - r.amount
               from refund_lines r where r.refund_id = $1 and l.id = r.order_line_id""",
            refund_id,
        )
        await record_event(conn, order_id, "order.refund_rejected", {"refund_id": refund_id})
    return await load_refund(conn, refund_id)


async def finish_refund(
    conn: asyncpg.Connection,
    refund_id: int,
    provider_refund_id: str | None,
    received_account: str | None = None,
) -> bool:
    """approved/processing/failed -> succeeded, exactly once; a full refund makes the order `refunded`.

    A failed refund succeeds too: WeChat Pay reports SUCCESS once the merchant has handled an
    ABNORMAL refund at its platform, and an operator's settlement ends one the same way.
    """
    row = await conn.fetchrow(
        """update refunds set status = 'succeeded', succeeded_at = now(),
               provider_refund_id = coalesce($2, provider_refund_id), next_attempt_at = null, last_error = null,
               received_account = coalesce($3, received_account)
           where id = $1 and status in ('approved', 'processing', 'failed') returning order_id, amount, origin""",
        refund_id,
        provider_refund_id,
        received_account,
    )
    if row is None:
        return False
    if row["origin"] != "system":
        # `refunding` means every line is in an approved refund: the last one to finish ends it.
        # The order row is locked by a statement of its own first: the update below then starts
        # after a concurrent finish of another refund of this order committed, and sees it (one
        # statement would wait for the row but judge the other refund by its older snapshot, and
        # both would leave the order `refunding`).
        await conn.execute("select 1 from orders where id = $1 for update", row["order_id"])
        await conn.execute(
            """update orders set refunded_amount = refunded_amount + $2, updated_at = now(),
                   status = case when status = 'refunding' and not exists (
                                select 1 from refunds where order_id = $1
                                and status in ('approved', 'processing', 'failed'))
                            then 'refunded' else status end
               where id = $1""",
            row["order_id"],
            row["amount"],
        )
    await record_event(
        conn,
        row["order_id"],
        "order.refunded",
        {"refund_id": refund_id, "amount": row["amount"], "origin": row["origin"]},
    )
    return True


async def fail_refund(
    conn: asyncpg.Connection, refund_id: int, provider_refund_id: str | None, provider_status: str | None
) -> bool:
    """approved/processing -> failed: the provider ended it unpaid; it waits for an operator.

    An ABNORMAL refund is asked about again now and then (recheck_failed_refunds): the merchant
    may settle it at the provider's platform, whose success notification can be lost."""
    order_id = await conn.fetchval(
        """update refunds set status = 'failed', provider_status = $3,
               next_attempt_at = case when $3 = any($4::text[]) then now() + $5 end,
               provider_refund_id = coalesce($2, provider_refund_id),
               last_error = 'the payment provider ended the refund unpaid: ' || coalesce($3, 'unknown')
           where id = $1 and status in ('approved', 'processing') returning order_id""",
        refund_id,
        provider_refund_id,
        provider_status,
        list(RECHECKED_PROVIDER_STATUSES),
        RECHECK_INTERVAL,
    )
    if order_id is None:
        return False
    log.warning(
        "refund failed at the payment provider: an operator must retry or settle it",
        extra={"fields": {"refund_id": refund_id, "order_id": order_id, "provider_status": provider_status}},
    )
    return True


async def retry_refund(
    conn: asyncpg.Connection, settings: Settings, refund_id: int, admin_id: int | None = None
) -> RefundOut:
    """failed (CLOSED: nothing was paid) -> approved under a new refund number, sent again."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "select refund_no, status, provider_status from refunds where id = $1 for update", refund_id
        )
        if row is None:
            raise NotFound("Refund not found", code="refund.not_found")
        if row["status"] != "failed":
            raise Conflict("Only a failed refund can be retried", code="refund.illegal_transition")
        if row["provider_status"] not in RETRYABLE_PROVIDER_STATUSES:
            raise Conflict(
                f"A refund that is {row['provider_status']} at the payment provider holds the money there:"
                " settle it at the provider (or pay it back another way), then record it as settled",
                code="refund.not_retryable",
            )
        await _record_action(conn, refund_id, "retry", admin_id)
        await conn.execute(
            "insert into superseded_refund_nos (refund_no, refund_id, provider_status) values ($1, $2, $3)",
            row["refund_no"],
            refund_id,
            row["provider_status"],
        )
        await conn.execute(
            """update refunds set refund_no = $2, status = 'approved', provider_status = null,
                   provider_refund_id = null, last_error = null, next_attempt_at = now()
               where id = $1""",
            refund_id,
            await business_no(conn, settings, prefix="R"),
        )
    return await load_refund(conn, refund_id)


async def settle_refund(
    conn: asyncpg.Connection, refund_id: int, note: str, admin_id: int | None = None
) -> RefundOut:
    """failed -> succeeded: an operator paid the money back outside this refund number."""
    async with conn.transaction():
        # The refund row first, then the order (in finish_refund): the order the provider's
        # notification takes them in, so the two never deadlock.
        noted = await conn.fetchval(
            "update refunds set settled_note = $2 where id = $1 and status = 'failed' returning 1",
            refund_id,
            note,
        )
        if noted is None:
            await load_refund(conn, refund_id)  # 404 when there is no such refund
            raise Conflict("Only a failed refund can be settled", code="refund.illegal_transition")
        await _record_action(conn, refund_id, "settle", admin_id, note)
        await finish_refund(conn, refund_id, None)
    return await load_refund(conn, refund_id)


async def process_refunds(
    pool: asyncpg.Pool, providers: Mapping[str, PaymentProvider], batch: int = 20
) -> int:
    """Send due refunds to the provider; failures are retried with backoff (idempotent on refund_no).

    Due refunds are leased (next_attempt_at pushed ahead) in one short statement, so no row lock
    is held while the provider is called, and another worker does not pick them up meanwhile.
    """
    done = 0
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """update refunds r set next_attempt_at = now() + interval '2 minutes'
               from payments p
               where r.id in (select id from refunds where status in ('approved', 'processing')
                                and next_attempt_at <= now()
                              order by next_attempt_at limit $1 for update skip locked)
                 and p.id = r.payment_id
               returning r.id, r.refund_no, r.amount, r.reason, r.attempts, p.provider, p.out_trade_no,
                         p.amount as total""",
            batch,
        )
        for row in rows:
            provider = providers.get(row["provider"])
            try:
                if provider is None:
                    raise ProviderError(f"provider {row['provider']} is not configured")
                result = await provider.refund(
                    refund_no=row["refund_no"],
                    out_trade_no=row["out_trade_no"],
                    amount=row["amount"],
                    total=row["total"],
                    reason=row["reason"][:80],
                )
            except ProviderError as exc:
                await conn.execute(
                    """update refunds set attempts = attempts + 1, last_error = $2, next_attempt_at = now() + $3
                       where id = $1 and status in ('approved', 'processing') and refund_no = $4""",
                    row["id"],
                    str(exc)[:500],
                    _backoff(row["attempts"] + 1),
                    row["refund_no"],
                )
                continue
            async with conn.transaction():
                # The answer is about the number that was sent. An operator's retry may have given
                # the refund a new one meanwhile (the old one failed): then this answer is stale.
                current = await conn.fetchval(
                    "update refunds set attempts = attempts + 1 where id = $1 and refund_no = $2 returning 1",
                    row["id"],
                    row["refund_no"],
                )
                if current is None:
                    (log.error if result.status == "succeeded" else log.info)(
                        "refund answer for a superseded refund number",
                        extra={"fields": {"refund_no": row["refund_no"], "refund_id": row["id"],
                                          "provider_status": result.provider_status}},
                    )  # fmt: skip
                elif result.status == "succeeded":
                    done += await finish_refund(
                        conn, row["id"], result.provider_refund_id, result.received_account
                    )
                elif result.status == "failed":
                    await fail_refund(conn, row["id"], result.provider_refund_id, result.provider_status)
                else:
                    # The provider's refund notify finishes it; until then ask again now and then.
                    await conn.execute(
                        """update refunds set status = 'processing', provider_refund_id = $2,
                               next_attempt_at = now() + interval '60 seconds'
                           where id = $1 and status in ('approved', 'processing')""",
                        row["id"],
                        result.provider_refund_id,
                    )
    return done


async def recheck_failed_refunds(
    pool: asyncpg.Pool, providers: Mapping[str, PaymentProvider], batch: int = 20
) -> int:
    """Ask the provider about failed refunds it may still finish (RECHECKED_PROVIDER_STATUSES);
    one it reports paid succeeds. Leased like process_refunds; returns how many succeeded."""
    done = 0
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """update refunds r set next_attempt_at = now() + $2
               from payments p
               where r.id in (select id from refunds where status = 'failed' and next_attempt_at <= now()
                                and provider_status = any($3::text[])
                              order by next_attempt_at limit $1 for update skip locked)
                 and p.id = r.payment_id
               returning r.id, r.refund_no, p.provider""",
            batch,
            RECHECK_INTERVAL,
            list(RECHECKED_PROVIDER_STATUSES),
        )
        for row in rows:
            provider = providers.get(row["provider"])
            if provider is None:
                continue
            try:
                result = await provider.query_refund(row["refund_no"])
            except ProviderError as exc:
                await conn.execute(
                    "update refunds set last_error = $2 where id = $1", row["id"], str(exc)[:500]
                )
                continue
            if result.status != "succeeded":
                continue
            async with conn.transaction():
                # Still failed under the same number (not settled or retried meanwhile).
                still = await conn.fetchval(
                    "select 1 from refunds where id = $1 and refund_no = $2 and status = 'failed' for update",
                    row["id"],
                    row["refund_no"],
                )
                if still:
                    done += await finish_refund(
                        conn, row["id"], result.provider_refund_id, result.received_account
                    )
    return done


async def handle_refund_notify(
    conn: asyncpg.Connection, provider: PaymentProvider, headers: Mapping[str, str], body: bytes
) -> tuple[int, Any]:
    try:
        notice = provider.parse_refund_notify(headers, body)
    except NotifyRejected as exc:
        log.warning(
            "refund notify rejected", extra={"fields": {"provider": provider.name, "reason": exc.code}}
        )
        return provider.nack(exc.code)
    async with conn.transaction():
        # Only the provider that took the payment may finish its refund (a sandbox-signed notice
        # must never settle a WeChat Pay refund).
        refund_id = await conn.fetchval(
            """select r.id from refunds r join payments p on p.id = r.payment_id
               where r.refund_no = $1 and p.provider = $2 for update of r""",
            notice.refund_no,
            provider.name,
        )
        if refund_id is None:
            superseded = await conn.fetchval(
                """select s.refund_id from superseded_refund_nos s
                   join refunds r on r.id = s.refund_id join payments p on p.id = r.payment_id
                   where s.refund_no = $1 and p.provider = $2""",
                notice.refund_no,
                provider.name,
            )
            if superseded is None:
                return provider.nack("unknown_refund")
            # A number a retry replaced: nothing to do, but a success under it means the money went
            # out twice, which only a person can sort out.
            (log.error if notice.succeeded else log.info)(
                "refund notify for a superseded refund number",
                extra={
                    "fields": {
                        "refund_no": notice.refund_no,
                        "refund_id": superseded,
                        "provider_status": notice.provider_status,
                    }
                },
            )
            return provider.ack()
        if notice.succeeded:
            await finish_refund(conn, refund_id, notice.provider_refund_id, notice.received_account)
        elif notice.provider_status in FAILED_PROVIDER_STATUSES:
            await fail_refund(conn, refund_id, notice.provider_refund_id, notice.provider_status)
        else:  # not an outcome (a provider's progress report): the worker keeps asking
            log.info(
                "refund notify without an outcome",
                extra={"fields": {"refund_no": notice.refund_no, "provider_status": notice.provider_status}},
            )
    return provider.ack()


# ---------------------------------------------------------------- routes


class RefundController(Controller):
    path = "/api/v1/orders/{order_id:int}/refunds"
    tags = ["refunds"]

    @post("/")
    async def create(
        self,
        request: Request,
        order_id: int,
        data: RefundIn,
        user: AuthUser,
        conn: asyncpg.Connection,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[RefundOut]:
        """Ask for a refund of the whole order or of some lines; before shipping it is approved at once."""
        settings = request.app.state.settings
        after: list = []

        async def work():
            refund, callbacks = await request_refund(conn, settings, user.id, order_id, data)
            after.extend(callbacks)
            return 201, refund

        outcome = await run_idempotent(
            conn,
            user_id=user.id,
            scope=f"refunds.create:{order_id}",
            key=idempotency_key,
            request=data,
            work=work,
        )
        await run_after_commit(after)
        return idempotent_response(outcome)

    @get("/")
    async def list_for_order(
        self, order_id: int, user: AuthUser, conn: asyncpg.Connection
    ) -> list[RefundOut]:
        owner = await conn.fetchval("select user_id from orders where id = $1", order_id)
        if owner != user.id:
            raise NotFound("Order not found", code="order.not_found")
        rows = await conn.fetch(
            f"select {REFUND_FIELDS} from refunds where order_id = $1 order by id", order_id
        )
        # An operator's settlement note is internal (it may name a bank account).
        return [msgspec.structs.replace(r, settled_note=None) for r in await load_refunds(conn, rows)]


class AdminRefundController(Controller):
    path = "/api/v1/admin/refunds"
    tags = ["admin: refunds"]
    guards = [admin_guard]

    @get("/")
    async def search(
        self,
        admin: AuthAdmin,
        conn: asyncpg.Connection,
        status: RefundStatus | None = None,
        order_id: IdFilter = None,
        cursor: str | None = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    ) -> RefundPage:
        after = decode_id_cursor(cursor)
        rows = await conn.fetch(
            f"""select {REFUND_FIELDS} from refunds
                where ($1::text is null or status = $1) and ($2::bigint is null or order_id = $2)
                  and ($3::bigint is null or id < $3)
                order by id desc limit $4""",
            status,
            order_id,
            after,
            limit + 1,
        )
        items = await load_refunds(conn, rows[:limit])
        return RefundPage(items=items, next_cursor=encode_cursor(items[-1].id) if len(rows) > limit else None)

    @get("/{refund_id:int}")
    async def detail(self, refund_id: int, admin: AuthAdmin, conn: asyncpg.Connection) -> RefundOut:
        return await load_refund(conn, refund_id)

    @get("/{refund_id:int}/actions")
    async def actions(
        self, refund_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> list[RefundActionOut]:
        """Every operator decision on the refund, oldest first: who, what, under which number."""
        return await refund_actions(conn, refund_id)

    @post("/{refund_id:int}/approve", status_code=200)
    async def approve(
        self, refund_id: int, data: ApproveIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> RefundOut:
        """Approve a refund of a shipped order; `restock` says whether the goods came back."""
        return await approve_refund(conn, refund_id, data.restock, admin.id)

    @post("/{refund_id:int}/retry", status_code=200)
    async def retry(
        self, request: Request, refund_id: int, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> RefundOut:
        """Send a failed refund again under a new number (only when the provider closed it unpaid)."""
        return await retry_refund(conn, request.app.state.settings, refund_id, admin.id)

    @post("/{refund_id:int}/settle", status_code=200)
    async def settle(
        self, refund_id: int, data: SettleIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> RefundOut:
        """Record that a failed refund was paid back another way: it succeeds, the order is refunded."""
        return await settle_refund(conn, refund_id, data.note, admin.id)

    @post("/{refund_id:int}/reject", status_code=200)
    async def reject(
        self, refund_id: int, data: RejectIn, admin: AuthAdmin, conn: asyncpg.Connection
    ) -> RefundOut:
        return await reject_refund(conn, refund_id, data.reason, admin.id)
