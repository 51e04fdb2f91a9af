"""WeChat Pay as a PaymentProvider: the order flow's calls mapped onto the API v3 client.

Refund notifications go to the notify URL's sibling `…/refund-notify` (SHOP_WECHATPAY_NOTIFY_URL
with its last path segment replaced), so one setting serves both routes and a path prefix added
by a reverse proxy is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from shop.payments.base import (
    NotifyRejected,
    PaidNotice,
    PaymentAttempt,
    ProviderError,
    RefundNotice,
    RefundResult,
)
from shop.payments.wechatpay import (
    NotificationError,
    WeChatPayClient,
    WeChatPayConfig,
    WeChatPayError,
    check_paid_resource,
    notify_ack,
    notify_nack,
    parse_refund_resource,
    user_received_account,
)

log = logging.getLogger("shop.payments.wechatpay")

# ABNORMAL (the shopper's account cannot take the money: it waits at WeChat Pay for the merchant)
# and CLOSED (nothing was paid) are final for the refund number: an operator takes over.
REFUND_STATUSES = {
    "SUCCESS": "succeeded",
    "PROCESSING": "processing",
    "ABNORMAL": "failed",
    "CLOSED": "failed",
}
# A rejected notification is the sender's fault (forged, stale, not ours): 4xx, not a 5xx alarm.
NACK_STATUS = 400


def refund_notify_url(notify_url: str) -> str:
    """The refund-notify route next to the payment-notify route."""
    parts = urlsplit(notify_url)
    head, _, _last = parts.path.rstrip("/").rpartition("/")
    return urlunsplit((parts.scheme, parts.netloc, f"{head}/refund-notify", "", ""))


def _refund_result(refund_no: str, data: dict[str, Any]) -> RefundResult:
    status = REFUND_STATUSES.get(data["status"])
    if status is None:
        raise ProviderError(f"refund {refund_no} is {data['status']!r} at WeChat Pay")
    return RefundResult(status, data.get("refund_id"), data["status"], user_received_account(data))


class WeChatPayProvider:
    name = "wechatpay"

    def __init__(self, client: WeChatPayClient, http: httpx.AsyncClient | None = None) -> None:
        self.client = client
        self.config = client.config
        # Shared with the mini-program client (shipping-info upload); closed by aclose().
        self.http = http
        self.refund_notify_url = refund_notify_url(client.config.notify_url)

    @classmethod
    def from_config(cls, config: WeChatPayConfig) -> WeChatPayProvider:
        http = httpx.AsyncClient(timeout=httpx.Timeout(config.timeout, connect=min(5.0, config.timeout)))
        return cls(WeChatPayClient(config, http=http), http)

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        await self.client.aclose()

    async def prepay(self, attempt: PaymentAttempt) -> tuple[str | None, dict[str, Any]]:
        if not attempt.payer_openid:
            raise ProviderError("WeChat Pay needs the payer's openid")
        try:
            prepay_id = await self.client.jsapi_prepay(
                attempt.out_trade_no,
                attempt.description,
                attempt.amount,
                attempt.payer_openid,
                attempt.expires_at,
            )
        except (WeChatPayError, ValueError) as exc:
            raise ProviderError(str(exc)) from exc
        return prepay_id, self.client.mini_program_pay_params(prepay_id)

    async def close(self, out_trade_no: str) -> PaidNotice | None:
        try:
            outcome = await self.client.close_order(out_trade_no)
            if outcome != "paid":
                return None
            # The shopper paid a payment we closed: settle it from WeChat's own record, so the money
            # is refunded even if the notification never arrives.
            resource = await self.client.query_order(out_trade_no)
            paid = check_paid_resource(resource, self.config.mchid, self.config.appid)
        except (WeChatPayError, NotificationError, ValueError) as exc:
            raise ProviderError(str(exc)) from exc
        if not paid.paid:
            raise ProviderError(f"{out_trade_no} is {paid.trade_state} at WeChat Pay")
        log.warning(
            "closed payment was already paid at WeChat Pay", extra={"fields": {"out_trade_no": out_trade_no}}
        )
        return PaidNotice(paid.out_trade_no, paid.transaction_id, paid.amount_total, resource)

    async def refund(
        self, *, refund_no: str, out_trade_no: str, amount: int, total: int, reason: str
    ) -> RefundResult:
        try:
            data = await self.client.refund(
                refund_no, out_trade_no, amount, total, reason=reason, notify_url=self.refund_notify_url
            )
        except (WeChatPayError, ValueError) as exc:
            raise ProviderError(str(exc)) from exc
        return _refund_result(refund_no, data)

    async def query_refund(self, refund_no: str) -> RefundResult:
        try:
            data = await self.client.query_refund(refund_no)
        except (WeChatPayError, ValueError) as exc:
            raise ProviderError(str(exc)) from exc
        return _refund_result(refund_no, data)

    def _verified(self, headers: Mapping[str, str], body: bytes, event_prefix: str) -> dict[str, Any]:
        try:
            notification = self.client.verify_notification(headers, body)
        except NotificationError as exc:
            raise NotifyRejected(exc.code, exc.message) from exc
        event_type = str(notification.get("event_type") or "")
        if not event_type.startswith(event_prefix):
            raise NotifyRejected("unexpected_event", f"event {event_type!r} on this route")
        return notification

    def parse_paid_notify(self, headers: Mapping[str, str], body: bytes) -> PaidNotice:
        notification = self._verified(headers, body, "TRANSACTION.")
        resource = notification["resource"]
        try:
            paid = check_paid_resource(resource, self.config.mchid, self.config.appid)
        except NotificationError as exc:
            raise NotifyRejected(exc.code, exc.message) from exc
        if notification["event_type"] != "TRANSACTION.SUCCESS" or not paid.paid:
            raise NotifyRejected("not_paid", f"trade_state {paid.trade_state}")
        if paid.currency != "CNY":
            raise NotifyRejected("amount_mismatch", f"currency {paid.currency}")
        return PaidNotice(paid.out_trade_no, paid.transaction_id, paid.amount_total, resource)

    def parse_refund_notify(self, headers: Mapping[str, str], body: bytes) -> RefundNotice:
        resource = self._verified(headers, body, "REFUND.")["resource"]
        try:
            refund = parse_refund_resource(resource, self.config.mchid)
        except NotificationError as exc:
            raise NotifyRejected(exc.code, exc.message) from exc
        return RefundNotice(
            refund.out_refund_no,
            refund.refund_id,
            refund.refund_status == "SUCCESS",
            resource,
            refund.refund_status,
            refund.user_received_account,
        )

    def ack(self) -> tuple[int, Any]:
        reply = notify_ack()
        return reply.status, reply.body

    def nack(self, message: str) -> tuple[int, Any]:
        reply = notify_nack(message, NACK_STATUS)
        return reply.status, reply.body
