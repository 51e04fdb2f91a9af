"""Request and response shapes of games: merchant configuration, odds, draws, cards, prizes, stats."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from shop.schemas import Schema

GameType = Literal["wheel", "scratch", "egg"]
GameStatus = Literal["draft", "active", "paused", "ended"]
PrizeKind = Literal["coupon", "points", "goods", "thanks"]
OutOfStock = Literal["thanks", "redistribute"]
DeliveryStatus = Literal["pending", "delivered", "awaiting_claim", "claimed", "expired"]

Id = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class PrizeIn(Schema):
    name: Name
    kind: PrizeKind
    weight: Positive
    coupon_template_id: Id | None = None
    points: Positive | None = None
    sku_id: Id | None = None
    stock: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] | None = None  # None: unlimited
    per_user_cap: Positive | None = None


class GameIn(Schema):
    """Everything a merchant sets on a game; an edit (PUT, draft only) sends the whole form again."""

    type: GameType
    name: Name
    starts_at: datetime
    ends_at: datetime
    prizes: Annotated[list[PrizeIn], msgspec.Meta(min_length=1, max_length=20)]
    free_per_day: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 1
    total_per_user: Positive | None = None
    cost_points: Positive | None = None
    chances_per_paid_order: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    chances_per_invite: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    extra_per_day_cap: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    out_of_stock: OutOfStock = "thanks"
    pity_after: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    pity_position: Annotated[int, msgspec.Meta(ge=0, le=19)] | None = None
    egg_count: Annotated[int, msgspec.Meta(ge=2, le=30)] = 9
    card_ttl_minutes: Annotated[int, msgspec.Meta(ge=1, le=30 * 24 * 60)] = 1440
    claim_days: Annotated[int, msgspec.Meta(ge=1, le=365)] = 7


class PrizeOut(Schema):
    id: int
    position: int
    name: str
    kind: PrizeKind
    weight: int
    coupon_template_id: int | None
    points: int | None
    sku_id: int | None
    stock: int | None
    per_user_cap: int | None
    remaining: int | None = None  # stock left (live games; None: unlimited or not live)


class GameOut(Schema):
    id: int
    type: GameType
    name: str
    status: GameStatus
    starts_at: datetime
    ends_at: datetime
    free_per_day: int
    total_per_user: int | None
    cost_points: int | None
    chances_per_paid_order: int
    chances_per_invite: int
    extra_per_day_cap: int
    out_of_stock: OutOfStock
    pity_after: int | None
    pity_position: int | None
    egg_count: int
    card_ttl_minutes: int
    claim_days: int
    weights_version: int
    created_at: datetime
    prizes: list[PrizeOut]


class GamePage(Schema):
    items: list[GameOut]
    next_cursor: str | None = None


class PublicPrize(Schema):
    position: int
    name: str
    kind: PrizeKind


class GameView(Schema):
    """What a shopper sees of a game (no weights, no stock)."""

    id: int
    type: GameType
    name: str
    status: GameStatus
    starts_at: datetime
    ends_at: datetime
    free_per_day: int
    cost_points: int | None
    prizes: list[PublicPrize]
    eggs: list[int] | None = None  # egg smash: the eggs to pick from (indices)
    free_left_today: int | None = None


class Odds(Schema):
    position: int
    name: str
    kind: PrizeKind
    weight: int
    probability: float


class OddsOut(Schema):
    game_id: int
    weights_version: int
    out_of_stock: OutOfStock
    items: list[Odds]


class DrawIn(Schema):
    pay_with_points: bool = False


class SmashIn(Schema):
    egg: Annotated[int, msgspec.Meta(ge=0, le=29)]
    pay_with_points: bool = False


class PrizeWon(Schema):
    position: int
    name: str
    kind: PrizeKind
    is_win: bool
    points: int | None = None
    coupon_template_id: int | None = None
    sku_id: int | None = None


class DrawOut(Schema):
    draw_no: str
    game_id: int
    prize: PrizeWon
    slot_index: int  # where the wheel stops (the prize's position)
    paid: bool
    pity: bool
    egg: int | None = None


class CardOut(Schema):
    """An issued scratch card: sealed, the result is not in it."""

    card_id: str
    game_id: int
    status: Literal["sealed", "revealed", "expired"]
    expires_at: datetime
    paid: bool


class ScratchOut(Schema):
    card_id: str
    game_id: int
    status: Literal["revealed"]
    prize: PrizeWon


class MyDraw(Schema):
    draw_no: str
    game_id: int
    game_type: GameType
    prize: PrizeWon | None  # None: a sealed or expired scratch card
    paid: bool
    card_status: str | None
    drawn_at: datetime


class MyDrawPage(Schema):
    items: list[MyDraw]
    next_cursor: str | None = None


class PrizeRecord(Schema):
    id: int
    draw_no: str
    game_id: int
    prize_name: str
    kind: Literal["coupon", "points", "goods"]
    status: DeliveryStatus
    coupon_id: int | None
    order_id: int | None
    claim_deadline: datetime | None
    delivered_at: datetime | None


class PrizeRecordPage(Schema):
    items: list[PrizeRecord]
    next_cursor: str | None = None


class ClaimIn(Schema):
    address_id: Id


class PrizeStockIn(Schema):
    # The prize's new total stock (every unit it ever offers, those already won included).
    stock: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]


class ChanceGrantIn(Schema):
    """A merchant-defined task completed (say, an invited shopper logged in): extra chances today."""

    user_id: Id
    amount: Annotated[int, msgspec.Meta(ge=1, le=100)]
    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ChanceGrantOut(Schema):
    granted: int


class PrizeStats(Schema):
    position: int
    name: str
    kind: PrizeKind
    won: int
    remaining: int | None
    cost: int  # fen: coupon face value or goods price per unit issued; a point counts as 1 fen


class GameStats(Schema):
    game_id: int
    draws: int
    players: int
    paid_draws: int
    points_spent: int
    winners: int
    prizes: list[PrizeStats]
    cost_total: int
