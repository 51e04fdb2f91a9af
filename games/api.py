"""Games' routes: the shopper's game page, odds, history and prizes, each game's play endpoint, and the merchant's."""

from __future__ import annotations

import asyncpg
from litestar import Controller, Request, get, post

from games import delivery, engine
from games.admin import AdminGameController, odds_of
from games.egg import EggController
from games.schemas import (
    ClaimIn,
    GameView,
    MyDraw,
    MyDrawPage,
    OddsOut,
    PrizeRecord,
    PrizeRecordPage,
    PublicPrize,
)
from games.scratch import ScratchController
from games.wheel import WheelController
from shop.auth_tokens import AuthUser
from shop.errors import NotFound
from shop.orders.schemas import OrderOut
from shop.orders.service import load_order
from shop.pagination import DEFAULT_LIMIT, Limit, decode_id_cursor, encode_cursor


async def _published(conn: asyncpg.Connection, game_id: int):
    game = await engine.fetch_game(conn, game_id)
    if game is None or game["status"] == "draft":
        raise NotFound("No such game", code="game.not_found")
    return game, (await engine.fetch_prizes(conn, [game_id]))[game_id]


class GameController(Controller):
    path = "/api/v1/games"
    tags = ["games"]

    @get("/{game_id:int}")
    async def view(
        self, request: Request, game_id: int, user: AuthUser, conn: asyncpg.Connection
    ) -> GameView:
        """The game page: prizes (no weights), eggs for egg smash, free draws left today."""
        game, prizes = await _published(conn, game_id)
        keys = request.app.state.redis_keys
        today = engine.business_date(request.app.state.settings).isoformat()
        used, extra = await request.app.state.redis.hmget(
            keys.game_day(game_id, today), [f"{user.id}:f", f"{user.id}:x"]
        )
        free_left = max(game["free_per_day"] + int(extra or 0) - int(used or 0), 0)
        return GameView(
            id=game["id"],
            type=game["type"],
            name=game["name"],
            status=game["status"],
            starts_at=game["starts_at"],
            ends_at=game["ends_at"],
            free_per_day=game["free_per_day"],
            cost_points=game["cost_points"],
            prizes=[PublicPrize(position=p["position"], name=p["name"], kind=p["kind"]) for p in prizes],
            eggs=list(range(game["egg_count"])) if game["type"] == "egg" else None,
            free_left_today=free_left,
        )

    @get("/{game_id:int}/odds")
    async def odds(self, game_id: int, conn: asyncpg.Connection) -> OddsOut:
        """Each prize's probability, computed from the configured weights (public)."""
        game, prizes = await _published(conn, game_id)
        return odds_of(game, prizes)

    @get("/draws")
    async def my_draws(
        self,
        user: AuthUser,
        conn: asyncpg.Connection,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> MyDrawPage:
        """The shopper's draws, newest first (a sealed card shows no prize until scratched)."""
        after = decode_id_cursor(cursor)
        rows = await conn.fetch(
            """select d.id, d.draw_no, d.game_id, g.type as game_type, d.paid, d.card_status, d.drawn_at,
                       p.position, p.name, p.kind, p.points, p.coupon_template_id, p.sku_id
                from game_draws d join games g on g.id = d.game_id join game_prizes p on p.id = d.prize_id
                where d.user_id = $1 and ($2::bigint is null or d.id < $2) order by d.id desc limit $3""",
            user.id,
            after,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            MyDraw(
                draw_no=r["draw_no"],
                game_id=r["game_id"],
                game_type=r["game_type"],
                prize=engine.prize_won(r) if r["card_status"] in (None, "revealed") else None,
                paid=r["paid"],
                card_status=r["card_status"],
                drawn_at=r["drawn_at"],
            )
            for r in rows
        ]
        return MyDrawPage(items=items, next_cursor=encode_cursor(rows[-1]["id"]) if more else None)

    @get("/prizes")
    async def my_prizes(
        self,
        user: AuthUser,
        conn: asyncpg.Connection,
        status: str | None = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> PrizeRecordPage:
        """The shopper's prizes; `?status=awaiting_claim` lists goods waiting for an address."""
        after = decode_id_cursor(cursor)
        rows = await conn.fetch(
            """select r.id, d.draw_no, r.game_id, p.name as prize_name, r.kind, r.status, r.coupon_id, r.order_id,
                      r.claim_deadline, r.delivered_at
               from prize_deliveries r join game_draws d on d.id = r.draw_id join game_prizes p on p.id = r.prize_id
               where r.user_id = $1 and ($2::text is null or r.status = $2) and ($3::bigint is null or r.id < $3)
               order by r.id desc limit $4""",
            user.id,
            status,
            after,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return PrizeRecordPage(
            items=[PrizeRecord(**dict(r)) for r in rows],
            next_cursor=encode_cursor(rows[-1]["id"]) if more else None,
        )

    @post("/prizes/{prize_id:int}/claim")
    async def claim(
        self, request: Request, prize_id: int, user: AuthUser, conn: asyncpg.Connection, data: ClaimIn
    ) -> OrderOut:
        """Claim a physical prize with an address: it becomes a zero-price order of kind `prize`."""
        order_id = await delivery.claim_goods(
            conn, request.app.state.settings, user.id, prize_id, data.address_id
        )
        return await load_order(conn, order_id, user.id)


ROUTES: list = [GameController, WheelController, ScratchController, EggController, AdminGameController]
