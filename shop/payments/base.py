"""The payment-provider interface every provider implements, and what a notification carries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


class NotifyRejected(Exception):
    """A notification that failed verification; `code` says why (bad_signature, stale, amount_mismatch, …)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code


class ProviderError(Exception):
    """The provider refused or failed a call; retried by the caller where that is safe."""


@dataclass(frozen=True)
class PaidNotice:
    out_trade_no: str
    transaction_id: str
    amount: int
    raw: dict[str, Any]


@dataclass(frozen=True)
class RefundNotice:
    refund_no: str
    provider_refund_id: str
    succeeded: bool
    raw: dict[str, Any]
    # The provider's own word for the outcome (WeChat Pay: SUCCESS, ABNORMAL, CLOSED).
    provider_status: str | None = None
    received_account: str | None = None  # where the money went, as the provider words it


@dataclass(frozen=True)
class RefundResult:
    # "succeeded" | "processing" | "failed" (final for this refund number: asking again under it
    # only gets the same answer; provider_status says why)
    status: str
    provider_refund_id: str | None
    provider_status: str | None = None
    received_account: str | None = None  # where the money went, as the provider words it


@dataclass(frozen=True)
class PaymentAttempt:
    id: int
    out_trade_no: str
    amount: int
    expires_at: datetime
    order_no: str
    description: str
    payer_openid: str | None


class PaymentProvider(Protocol):
    name: str

    async def prepay(self, attempt: PaymentAttempt) -> tuple[str | None, dict[str, Any]]:
        """Open the payment at the provider: (provider's prepay id, the client's pay parameters)."""

    async def close(self, out_trade_no: str) -> PaidNotice | None:
        """Close an unpaid payment so it can no longer be paid; a PaidNotice if it turns out paid already."""

    async def refund(
        self, *, refund_no: str, out_trade_no: str, amount: int, total: int, reason: str
    ) -> RefundResult:
        """Refund (idempotent on refund_no: a retry never refunds twice)."""

    async def query_refund(self, refund_no: str) -> RefundResult:
        """What the provider says of a refund now (raises ProviderError when it cannot tell)."""

    def parse_paid_notify(self, headers: Mapping[str, str], body: bytes) -> PaidNotice:
        """Verify a payment notification and return what it says; raise NotifyRejected otherwise."""

    def parse_refund_notify(self, headers: Mapping[str, str], body: bytes) -> RefundNotice:
        """Verify a refund notification."""

    def ack(self) -> tuple[int, Any]:
        """(status, body) the provider expects for an accepted notification."""

    def nack(self, message: str) -> tuple[int, Any]:
        """(status, body) that makes the provider retry later."""
