"""刮刮卡 (scratch card): the result is drawn and sealed when the card is issued, shown when scratched."""

from __future__ import annotations

import asyncpg
from litestar import Controller, Request, Response, post

from games import engine
from games.play import IdempotencyKey, check_key, play
from games.schemas import CardOut, DrawIn, ScratchOut
from shop.auth_tokens import AuthUser


class ScratchController(Controller):
    path = "/api/v1/games"
    tags = ["games"]

    @post("/{game_id:int}/cards")
    async def issue(
        self,
        request: Request,
        game_id: int,
        user: AuthUser,
        data: DrawIn | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[CardOut]:
        """Issue a card: its result is decided and stored now, and not part of this answer."""
        data = data or DrawIn()
        drawn = await play(
            request.app.state, game_id=game_id, game_type="scratch", user_id=user.id,
            idempotency_key=check_key(idempotency_key), pay_with_points=data.pay_with_points, kind="card",
        )  # fmt: skip
        out = CardOut(
            card_id=drawn.draw_no,
            game_id=game_id,
            status="sealed",
            expires_at=drawn.expires_at,
            paid=drawn.paid,
        )
        return Response(
            out, status_code=201, headers={"Idempotent-Replayed": "true"} if drawn.replayed else None
        )

    @post("/cards/{card_id:str}/scratch", status_code=200)
    async def scratch(
        self, request: Request, card_id: str, user: AuthUser, conn: asyncpg.Connection
    ) -> ScratchOut:
        """Reveal the card; scratching again shows the same result, and the prize is delivered once."""
        row = await engine.reveal_card(conn, card_id, user.id)
        prize = await conn.fetchrow(
            f"select {engine.PRIZE_FIELDS} from game_prizes where id = $1", row["prize_id"]
        )
        return ScratchOut(
            card_id=card_id, game_id=row["game_id"], status="revealed", prize=engine.prize_won(prize)
        )
