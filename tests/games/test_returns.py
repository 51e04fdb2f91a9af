"""Units given back to the prize stock reach Redis once: never onto a lost (cold) state, and a
return whose Redis step failed after its commit is retried by the worker and counted once."""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError

from games import engine
from games.delivery import expire_cards
from shop.keys import Keys
from shop.reconcile import reconcile
from tests.games.test_admin import ADMIN, make_game
from tests.games.test_scratch_egg import CARD_PRIZES, issue


class RedisDownForReturns:
    """The app's scripts, except that giving a unit back fails as if Redis went away."""

    def __init__(self, scripts) -> None:
        self._scripts = scripts

    def __getattr__(self, name: str):
        if name == "game_return":

            async def fail(**_):
                raise RedisConnectionError("Redis went away")

            return fail
        return getattr(self._scripts, name)


async def expire(db, app, card_id: str, scripts=None) -> int:
    await db.execute(
        "update game_draws set expires_at = now() - interval '1 second' where draw_no = $1", card_id
    )
    keys = Keys(app.state.settings.redis_prefix)
    return await expire_cards(app.state.pool, scripts or app.state.scripts, keys)


async def games_differences(settings) -> list:
    return [d for d in (await reconcile(settings)).found if d.checker == "games"]


async def test_a_unit_returned_while_redis_is_lost_leaves_no_partial_state(
    client, app, db, settings, make_user, admin_headers
):
    _, headers = await make_user()
    game = await make_game(
        client, admin_headers, type="scratch", prizes=CARD_PRIZES, out_of_stock="redistribute", free_per_day=2
    )
    card = (await issue(client, headers, game["id"])).json()["card_id"]
    keys, redis = Keys(settings.redis_prefix), app.state.redis
    assert await redis.hget(keys.game_state(game["id"]), "s:0") == "4"

    # Redis loses the game, then the card expires: nothing may be written onto the missing state.
    await redis.delete(*[k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:*")])
    assert await expire(db, app, card) == 1
    assert not await redis.exists(keys.game_state(game["id"]), keys.game_users(game["id"]))

    # Pausing and resuming find Redis cold and rebuild it from PostgreSQL: all five units left.
    assert (await client.post(f"{ADMIN}/{game['id']}/pause", headers=admin_headers)).status_code == 200
    assert (await client.post(f"{ADMIN}/{game['id']}/activate", headers=admin_headers)).status_code == 200
    assert await redis.hget(keys.game_state(game["id"]), "s:0") == "5"
    assert (await issue(client, headers, game["id"])).status_code == 201
    assert await redis.hget(keys.game_state(game["id"]), "s:0") == "4"
    assert await games_differences(settings) == []


async def test_a_return_whose_redis_step_failed_is_retried_and_counted_once(
    client, app, db, settings, make_user, admin_headers
):
    user_id, headers = await make_user()
    game = await make_game(
        client, admin_headers, type="scratch", prizes=CARD_PRIZES, out_of_stock="redistribute", free_per_day=3
    )
    cards = [(await issue(client, headers, game["id"])).json()["card_id"] for _ in range(2)]
    keys, redis = Keys(settings.redis_prefix), app.state.redis
    state, users = keys.game_state(game["id"]), keys.game_users(game["id"])
    assert await expire(db, app, cards[0], RedisDownForReturns(app.state.scripts)) == 1
    # Committed in PostgreSQL, not in Redis yet; reconcile knows it is on its way.
    assert await db.fetchval("select return_pending from game_draws where draw_no = $1", cards[0])
    assert await redis.hget(state, "s:0") == "3"
    assert await games_differences(settings) == []

    # Several workers retry at once: the unit comes back once.
    pool, scripts = app.state.pool, app.state.scripts
    await asyncio.gather(*(engine.restore_pending(pool, scripts, keys) for _ in range(5)))
    assert await redis.hget(state, "s:0") == "4"
    assert await redis.hget(users, f"{user_id}:w:0") == "1"
    assert not await db.fetchval("select return_pending from game_draws where draw_no = $1", cards[0])
    assert await engine.restore_pending(pool, scripts, keys) == 0
    # The flag's write was lost after Redis applied it: the retry finds the return done.
    await db.execute("update game_draws set return_pending = true where draw_no = $1", cards[0])
    assert await engine.restore_pending(pool, scripts, keys) == 1
    assert await redis.hget(state, "s:0") == "4"
    assert await redis.hget(users, f"{user_id}:w:0") == "1"
    assert await games_differences(settings) == []
