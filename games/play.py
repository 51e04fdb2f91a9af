"""What every game's play endpoint shares: run one engine draw for the request and shape the prize."""

from __future__ import annotations

from litestar import Request, Response

from games import engine
from games.schemas import DrawOut, PrizeWon
from shop.db import provide_conn
from shop.errors import ShopError
from shop.hotpath import hotpath_of
from shop.idempotency import IdempotencyKey, check_key  # noqa: F401  (re-exported for the game routes)


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
            state.redis_keys,
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


async def draw_response(
    request: Request,
    *,
    game_id: int,
    game_type: str,
    user_id: int,
    idempotency_key: str | None,
    pay_with_points: bool,
    egg: int | None = None,
) -> Response[DrawOut]:
    """A wheel spin or an egg smash: the engine's draw as the 201 the mini-program animates."""
    drawn = await play(
        request, game_id=game_id, game_type=game_type, user_id=user_id,
        idempotency_key=idempotency_key, pay_with_points=pay_with_points,
    )  # fmt: skip
    out = DrawOut(
        draw_no=drawn.draw_no,
        game_id=game_id,
        prize=await prize_at(request, game_id, drawn),
        slot_index=drawn.position,
        paid=drawn.paid,
        pity=drawn.pity,
        egg=egg,
    )
    return Response(out, status_code=201, headers={"Idempotent-Replayed": "true"} if drawn.replayed else None)
