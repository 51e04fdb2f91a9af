"""What every game's play endpoint shares: run one engine draw for the request and shape the prize."""

from __future__ import annotations

from typing import Annotated

from litestar import Request
from litestar.params import Parameter

from games import engine
from games.schemas import PrizeWon
from shop.db import provide_conn
from shop.errors import ShopError
from shop.hotpath import hotpath_of
from shop.idempotency import check_key
from shop.keys import Keys

IdempotencyKey = Annotated[str | None, Parameter(header="Idempotency-Key", required=False, max_length=128)]


def keys_of(request: Request) -> Keys:
    return Keys(request.app.state.settings.redis_prefix)


async def play(
    request: Request,
    *,
    game_id: int,
    game_type: str,
    user_id: int,
    idempotency_key: str | None,
    pay_with_points: bool,
    kind: str = "draw",
) -> engine.Drawn:
    """One draw through the engine; the request's database connection is taken only when needed."""
    state = request.app.state
    try:
        return await engine.draw(
            hotpath_of(state),
            state.scripts,
            keys_of(request),
            state.settings,
            game_id=game_id,
            game_type=game_type,
            user_id=user_id,
            idempotency_key=check_key(idempotency_key),
            pay_with_points=pay_with_points,
            kind=kind,
        )
    except ShopError as exc:
        if exc.code == "game.not_ready":
            # Redis knows nothing of it: only a live game is "being restored".
            await engine.explain_missing(await provide_conn(request), game_id, game_type)
        raise


async def prize_at(request: Request, game_id: int, drawn: engine.Drawn) -> PrizeWon:
    prizes = await engine.prizes_of_version(request.app.state, game_id, drawn.version)
    return prizes[drawn.position]
