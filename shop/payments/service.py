"""Payment attempts, notifications (deduplicated, replay-safe), and closing abandoned payments."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from shop.errors import Conflict, NotFound
from shop.events import record_event
from shop.orders.service import business_no, mark_order_paid
from shop.payments.base import NotifyRejected, PaidNotice, PaymentAttempt, PaymentProvider, ProviderError
from shop.schemas import Schema
from shop.settings import Settings

log = logging.getLogger("shop.payments")


class PayOut(Schema):
    payment_id: int
    provider: str
    out_trade_no: str
    amount: int
    expires_at: datetime
    # What the mini-program passes to wx.requestPayment (wechatpay), or the sandbox's handle.
    params: dict[str, Any]


async def _payer_openid(conn: asyncpg.Connection, settings: Settings, user_id: int) -> str | None:
    appid = settings.wechatpay_appid or settings.wechat_appid
    return await conn.fetchval(
        """select openid from user_identities where user_id = $1 and provider = 'wechat' and appid = $2
           order by id limit 1""",
        user_id,
        appid,
    )


async def start_payment(
    conn: asyncpg.Connection, settings: Settings, provider: PaymentProvider, user_id: int, order_id: int
) -> PayOut:
    """Open a payment attempt for an unpaid order (its own out-trade-no, expiring at the pay deadline)."""
    async with conn.transaction():
        order = await conn.fetchrow(
            """select id, order_no, status, payable_amount, pay_deadline, kind from orders
               where id = $1 and user_id = $2 for update""",
            order_id,
            user_id,
        )
        if order is None:
            raise NotFound("Order not found", code="order.not_found")
        if order["status"] != "pending_payment":
            raise Conflict(f"Cannot pay an order that is {order['status']}", code="order.illegal_transition")
        if order["pay_deadline"] <= datetime.now(order["pay_deadline"].tzinfo):
            raise Conflict("The payment deadline has passed", code="order.pay_deadline_passed")
        if order["payable_amount"] < 1:
            raise Conflict("This order needs no payment", code="payment.not_required")
        openid = await _payer_openid(conn, settings, user_id) if provider.name == "wechatpay" else None
        if provider.name == "wechatpay" and openid is None:
            raise Conflict("Log in through the mini-program to pay with WeChat Pay", code="payment.no_openid")
        # One open attempt per order: an earlier open attempt is closed (and closed at the provider later).
        await conn.execute(
            "update payments set status = 'closed', closed_at = now() where order_id = $1 and status = 'open'",
            order_id,
        )
        out_trade_no = await business_no(conn, settings, prefix="P")
        payment_id = await conn.fetchval(
            """insert into payments (order_id, provider, out_trade_no, amount, expires_at, payer_openid)
               values ($1, $2, $3, $4, $5, $6) returning id""",
            order_id,
            provider.name,
            out_trade_no,
            order["payable_amount"],
            order["pay_deadline"],
            openid,
        )
        title = await conn.fetchval(
            "select title from order_lines where order_id = $1 order by id limit 1", order_id
        )
    attempt = PaymentAttempt(
        id=payment_id,
        out_trade_no=out_trade_no,
        amount=order["payable_amount"],
        expires_at=order["pay_deadline"],
        order_no=order["order_no"],
        description=(title or order["order_no"])[:120],
        payer_openid=openid,
    )
    try:
        prepay_id, params = await provider.prepay(attempt)
    except ProviderError as exc:
        await conn.execute(
            "update payments set status = 'closed', closed_at = now(), close_synced = true where id = $1",
            payment_id,
        )
        raise Conflict(
            f"The payment provider refused: {exc}", code="payment.provider_error", status=502
        ) from exc
    await conn.execute("update payments set prepay_id = $2 where id = $1", payment_id, prepay_id)
    return PayOut(
        payment_id=payment_id,
        provider=provider.name,
        out_trade_no=out_trade_no,
        amount=order["payable_amount"],
        expires_at=order["pay_deadline"],
        params=params,
    )


async def apply_paid_notice(
    conn: asyncpg.Connection, settings: Settings, provider_name: str, notice: PaidNotice
) -> str:
    """Record a verified payment: 'paid', 'duplicate', or 'refunding' (paid after the order was cancelled)."""
    async with conn.transaction():
        order_id = await conn.fetchval(
            "select order_id from payments where out_trade_no = $1 and provider = $2",
            notice.out_trade_no,
            provider_name,
        )
        if order_id is None:
            raise NotifyRejected("unknown_payment", f"no payment {notice.out_trade_no}")
        # Lock order, then payment: the same order as cancel_order, so the two cannot deadlock.
        await conn.execute("select 1 from orders where id = $1 for update", order_id)
        payment = await conn.fetchrow(
            "select id, amount, status, transaction_id from payments where out_trade_no = $1 for update",
            notice.out_trade_no,
        )
        if notice.amount != payment["amount"]:
            raise NotifyRejected("amount_mismatch", f"paid {notice.amount}, expected {payment['amount']}")
        if payment["status"] == "paid":
            if payment["transaction_id"] == notice.transaction_id:
                return "duplicate"
            raise NotifyRejected("transaction_mismatch", "payment already paid by another transaction")
        try:
            async with conn.transaction():
                await conn.execute(
                    """update payments set status = 'paid', transaction_id = $2, paid_at = now(), notify = $3
                       where id = $1""",
                    payment["id"],
                    notice.transaction_id,
                    notice.raw,
                )
        except asyncpg.UniqueViolationError as exc:
            raise NotifyRejected("transaction_reused", "transaction id already recorded") from exc
        if await mark_order_paid(
            conn, order_id, amount=notice.amount, provider=provider_name, payment_id=payment["id"]
        ):
            await conn.execute(
                "update payments set status = 'closed', closed_at = now() where order_id = $1 and status = 'open'",
                order_id,
            )
            return "paid"
        # The order was cancelled (timeout) or paid by another attempt: give this money back.
        from shop.refunds import create_system_refund

        await create_system_refund(
            conn, settings, order_id, payment["id"], notice.amount, "paid after the order was closed"
        )
        await record_event(
            conn, order_id, "order.paid_after_cancel", {"payment_id": payment["id"], "amount": notice.amount}
        )
        return "refunding"


async def handle_paid_notify(
    conn: asyncpg.Connection,
    settings: Settings,
    provider: PaymentProvider,
    headers: Mapping[str, str],
    body: bytes,
) -> tuple[int, Any]:
    """Verify and apply a payment notification; answer in the provider's expected format."""
    try:
        notice = provider.parse_paid_notify(headers, body)
        outcome = await apply_paid_notice(conn, settings, provider.name, notice)
    except NotifyRejected as exc:
        log.warning(
            "payment notify rejected", extra={"fields": {"provider": provider.name, "reason": exc.code}}
        )
        return provider.nack(exc.code)
    log.info("payment notify", extra={"fields": {"provider": provider.name, "outcome": outcome}})
    return provider.ack()


async def sync_payment_closes(
    pool: asyncpg.Pool, settings: Settings, providers: Mapping[str, PaymentProvider], batch: int = 50
) -> int:
    """Close at the provider every payment we closed locally (order cancelled or superseded).

    The provider is called outside any transaction (closing twice is harmless). A payment the
    provider reports as paid after all is applied like its notification would be, in its own
    transaction (order, then payment: the usual lock order); the order is cancelled, so it is refunded.
    """
    done = 0
    async with pool.acquire() as conn:
        # Leased (pushed ahead) in one short statement: no row lock is held while the provider is
        # called, and another worker takes other rows meanwhile.
        rows = await conn.fetch(
            """update payments p set close_next_attempt_at = now() + interval '2 minutes'
               where p.id in (select id from payments
                              where status = 'closed' and not close_synced
                                and (close_next_attempt_at is null or close_next_attempt_at <= now())
                              order by id limit $1 for update skip locked)
               returning p.id, p.provider, p.out_trade_no, p.close_attempts""",
            batch,
        )
        for row in rows:
            provider = providers.get(row["provider"])
            try:
                if provider is None:
                    raise ProviderError(f"provider {row['provider']} is not configured")
                paid = await provider.close(row["out_trade_no"])
                if paid is not None:
                    await apply_paid_notice(conn, settings, provider.name, paid)
            except (ProviderError, NotifyRejected) as exc:
                log.warning("closing payment %s failed (%s); retried later", row["out_trade_no"], exc)
                # Backs off (to an hour): a row that keeps failing never holds up the others.
                await conn.execute(
                    """update payments set close_attempts = close_attempts + 1,
                           close_next_attempt_at = now() + $2 where id = $1""",
                    row["id"],
                    _close_backoff(row["close_attempts"] + 1),
                )
                continue
            await conn.execute("update payments set close_synced = true where id = $1", row["id"])
            done += 1
    return done


def _close_backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(3600, 10 * 2 ** min(attempts, 9)))


def build_providers(settings: Settings) -> dict[str, PaymentProvider]:
    """Every provider this deployment can use: the sandbox outside production, WeChat Pay when configured."""
    from shop.payments.sandbox import SandboxProvider

    providers: dict[str, PaymentProvider] = {}
    if settings.env != "production":
        providers["sandbox"] = SandboxProvider(settings.sandbox_secret)
    if settings.wechatpay_mchid:
        from shop.payments.wechatpay import WeChatPayConfig
        from shop.payments.wechatpay_provider import WeChatPayProvider

        # Raises WeChatPayConfigError naming the missing or bad SHOP_WECHATPAY_* value: start-up fails.
        providers["wechatpay"] = WeChatPayProvider.from_config(WeChatPayConfig.from_settings(settings))
    return providers


async def close_providers(providers: Mapping[str, PaymentProvider]) -> None:
    """Close the providers' HTTP clients (app and worker shutdown)."""
    for provider in providers.values():
        aclose = getattr(provider, "aclose", None)
        if aclose is not None:
            await aclose()
