"""Request and response shapes of coupon templates, coupons, grants and stats."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from shop.orders.schemas import Id, Lines
from shop.schemas import Schema

TemplateKind = Literal["threshold", "percent", "no_threshold"]
TemplateScope = Literal["all", "categories", "products", "exclude_products"]
TemplateStatus = Literal["draft", "active", "paused", "ended"]
Validity = Literal["fixed", "relative"]
CouponState = Literal["available", "locked", "used", "expired"]
CouponSource = Literal["claim", "grant", "newcomer", "game", "channel"]

Fen = Annotated[int, msgspec.Meta(ge=1, le=100_000_000)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ScopeIds = Annotated[list[Id], msgspec.Meta(max_length=500)]


class TemplateIn(Schema):
    """Everything a merchant sets on a template; an edit (PUT) sends the whole form again."""

    name: Name
    kind: TemplateKind
    validity: Validity
    description: Annotated[str, msgspec.Meta(max_length=500)] = ""
    threshold: Annotated[int, msgspec.Meta(ge=0, le=100_000_000)] = 0
    amount: Fen | None = None
    percent_off: Annotated[int, msgspec.Meta(ge=1, le=99)] | None = None
    max_discount: Fen | None = None
    scope: TemplateScope = "all"
    scope_ids: ScopeIds = []
    total_quantity: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] | None = None
    per_user_limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    is_public: bool = True
    for_newcomers: bool = False
    claim_starts_at: datetime | None = None
    claim_ends_at: datetime | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    valid_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] | None = None


class TemplateOut(Schema):
    id: int
    name: str
    description: str
    kind: TemplateKind
    threshold: int
    amount: int | None
    percent_off: int | None
    max_discount: int | None
    scope: TemplateScope
    scope_ids: list[int]
    total_quantity: int | None
    per_user_limit: int
    is_public: bool
    for_newcomers: bool
    claim_starts_at: datetime | None
    claim_ends_at: datetime | None
    validity: Validity
    valid_from: datetime | None
    valid_until: datetime | None
    valid_days: int | None
    status: TemplateStatus
    created_at: datetime
    updated_at: datetime
    # Public claims so far and what is left (null: unlimited), from the live counters.
    claimed: int | None = None
    remaining: int | None = None


class TemplatePage(Schema):
    items: list[TemplateOut]
    next_cursor: str | None = None


class CouponOut(Schema):
    id: int
    code: str
    template_id: int
    name: str
    kind: TemplateKind
    threshold: int
    amount: int | None
    percent_off: int | None
    max_discount: int | None
    scope: TemplateScope
    scope_ids: list[int]
    source: CouponSource
    status: CouponState
    valid_from: datetime
    valid_until: datetime
    claimed_at: datetime
    order_id: int | None = None


class CouponPage(Schema):
    items: list[CouponOut]
    next_cursor: str | None = None


class CartIn(Schema):
    items: Lines


class CouponForCart(Schema):
    coupon: CouponOut
    applicable: bool
    # Why it does not apply: scope (nothing in the cart qualifies), threshold, not_started.
    reason: str | None = None
    discount_amount: int = 0
    payable_amount: int = 0


class CouponsForCart(Schema):
    usable: list[CouponForCart]
    unusable: list[CouponForCart]


class GrantIn(Schema):
    # The merchant's id for this batch: sending the same batch again grants nobody twice.
    grant_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    user_ids: Annotated[list[Id], msgspec.Meta(min_length=1, max_length=1000)]


class GrantOut(Schema):
    granted: int
    already_granted: int
    unknown_users: list[int]


class TemplateStats(Schema):
    template_id: int
    issued: int
    claimed: int
    granted: int
    available: int
    locked: int
    used: int
    expired: int
    orders: int
    gmv: int
    discount_total: int
