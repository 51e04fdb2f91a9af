"""Request and response shapes of checkout and orders."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from shop.schemas import Schema

OrderStatus = Literal["pending_payment", "paid", "shipped", "completed", "cancelled", "refunding", "refunded"]
OrderKind = Literal["normal", "flash_sale", "group_buy", "bargain", "prize"]

Qty = Annotated[int, msgspec.Meta(ge=1, le=999)]
Id = Annotated[int, msgspec.Meta(ge=1, le=2**62)]


class LineIn(Schema):
    sku_id: Id
    qty: Qty


Lines = Annotated[list[LineIn], msgspec.Meta(min_length=1, max_length=50)]


class CheckoutIn(Schema):
    items: Lines
    address_id: Id | None = None
    # Price with this coupon (else the applicable coupons are listed in `discounts`).
    coupon_id: Id | None = None


class OrderIn(Schema):
    items: Lines
    address_id: Id
    remark: Annotated[str, msgspec.Meta(max_length=200)] = ""
    coupon_id: Id | None = None


class PricedLine(Schema):
    sku_id: int
    product_id: int
    title: str
    specs: dict[str, Any]
    image_url: str
    unit_price: int
    qty: int
    line_amount: int
    discount_amount: int = 0
    in_stock: bool = True
    category_id: int | None = None


class CheckoutOut(Schema):
    lines: list[PricedLine]
    items_amount: int
    shipping_fee: int
    discount_amount: int
    payable_amount: int
    # The shopper's applicable coupons, best first: coupon_id, name, discount_amount, payable_amount.
    discounts: list[dict[str, Any]] = []
    coupon_id: int | None = None


class OrderLineOut(Schema):
    id: int
    sku_id: int
    product_id: int
    title: str
    specs: dict[str, Any]
    image_url: str
    unit_price: int
    qty: int
    line_amount: int
    discount_amount: int
    payable_amount: int
    refunded_qty: int
    refunded_amount: int


class ShipmentOut(Schema):
    id: int
    carrier: str
    tracking_no: str
    line_ids: list[int]
    created_at: datetime


class OrderOut(Schema):
    id: int
    order_no: str
    user_id: int
    kind: OrderKind
    activity_id: int | None
    status: OrderStatus
    items_amount: int
    discount_amount: int
    shipping_fee: int
    payable_amount: int
    paid_amount: int
    refunded_amount: int
    address: dict[str, Any] | None
    remark: str
    pay_deadline: datetime | None
    paid_at: datetime | None
    shipped_at: datetime | None
    auto_confirm_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None
    cancel_reason: str | None
    payment_provider: str | None
    created_at: datetime
    coupon_id: int | None = None
    lines: list[OrderLineOut] = []
    shipments: list[ShipmentOut] = []


class OrderPage(Schema):
    items: list[OrderOut]
    next_cursor: str | None = None


class PackageIn(Schema):
    carrier: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    tracking_no: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
    line_ids: list[Id] = []


class ShipIn(Schema):
    packages: Annotated[list[PackageIn], msgspec.Meta(min_length=1, max_length=20)]


class ShippingRuleIO(Schema):
    flat_fee: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    free_threshold: Annotated[int, msgspec.Meta(ge=0, le=100_000_000)] | None = None
