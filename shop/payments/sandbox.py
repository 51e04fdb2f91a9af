"""The sandbox provider: the same flow as WeChat Pay with HMAC-signed notifications.

Used by the demo and the load tests. `sign_notification` builds what the sandbox "sends";
`POST /api/v1/payments/sandbox/{order_no}/simulate` feeds it through the notify path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from shop.payments.base import NotifyRejected, PaidNotice, PaymentAttempt, RefundNotice, RefundResult

TOLERANCE_SECONDS = 300


class SandboxProvider:
    name = "sandbox"

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def _sign(self, timestamp: str, nonce: str, body: bytes) -> str:
        message = f"{timestamp}\n{nonce}\n".encode() + body + b"\n"
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign_notification(
        self, payload: dict[str, Any], *, timestamp: int | None = None
    ) -> tuple[dict, bytes]:
        body = json.dumps(payload, separators=(",", ":")).encode()
        ts = str(timestamp if timestamp is not None else int(time.time()))
        nonce = secrets.token_hex(8)
        headers = {
            "X-Sandbox-Timestamp": ts,
            "X-Sandbox-Nonce": nonce,
            "X-Sandbox-Signature": self._sign(ts, nonce, body),
        }
        return headers, body

    def _verify(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        lower = {k.lower(): v for k, v in headers.items()}
        ts, nonce, sig = (
            lower.get("x-sandbox-timestamp", ""),
            lower.get("x-sandbox-nonce", ""),
            lower.get("x-sandbox-signature", ""),
        )
        if not (ts.isdigit() and nonce and sig):
            raise NotifyRejected("unsigned", "missing signature headers")
        if abs(time.time() - int(ts)) > TOLERANCE_SECONDS:
            raise NotifyRejected("stale", "timestamp outside the allowed window")
        if not hmac.compare_digest(self._sign(ts, nonce, body), sig):
            raise NotifyRejected("bad_signature", "signature does not match")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise NotifyRejected("bad_body", "body is not JSON") from exc

    async def prepay(self, attempt: PaymentAttempt) -> tuple[str | None, dict[str, Any]]:
        prepay_id = f"sbx_{attempt.out_trade_no}"
        return prepay_id, {"sandbox": True, "prepay_id": prepay_id, "out_trade_no": attempt.out_trade_no}

    async def close(self, out_trade_no: str) -> PaidNotice | None:
        return None

    async def refund(
        self, *, refund_no: str, out_trade_no: str, amount: int, total: int, reason: str
    ) -> RefundResult:
        return RefundResult("succeeded", f"sbx_refund_{refund_no}")

    async def query_refund(self, refund_no: str) -> RefundResult:
        return RefundResult("succeeded", f"sbx_refund_{refund_no}")  # sandbox refunds succeed at once

    def parse_paid_notify(self, headers: Mapping[str, str], body: bytes) -> PaidNotice:
        data = self._verify(headers, body)
        if data.get("trade_state") != "SUCCESS":
            raise NotifyRejected("not_paid", f"trade_state {data.get('trade_state')!r}")
        try:
            return PaidNotice(
                str(data["out_trade_no"]), str(data["transaction_id"]), int(data["amount"]), data
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NotifyRejected("bad_body", "missing fields") from exc

    def parse_refund_notify(self, headers: Mapping[str, str], body: bytes) -> RefundNotice:
        data = self._verify(headers, body)
        try:
            return RefundNotice(
                str(data["refund_no"]),
                str(data["refund_id"]),
                data["status"] == "SUCCESS",
                data,
                str(data["status"]),
            )
        except (KeyError, TypeError) as exc:
            raise NotifyRejected("bad_body", "missing fields") from exc

    def ack(self) -> tuple[int, Any]:
        return 200, {"code": "SUCCESS", "message": "OK"}

    def nack(self, message: str) -> tuple[int, Any]:
        return 400, {"code": "FAIL", "message": message}
