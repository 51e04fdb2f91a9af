"""Scratch cards (sealed at issue, revealed once, expiring with their stock returned once) and egg smash."""

from __future__ import annotations

import asyncio

from games.delivery import deliver_prizes, expire_cards
from shop.keys import Keys
from tests.games.test_admin import THANKS, code_of, make_game

CARD_PRIZES = [{"name": "30 积分", "kind": "points", "points": 30, "weight": 1, "stock": 5}]


async def issue(client, headers, game_id: int, key: str | None = None):
    h = {**headers, "Idempotency-Key": key} if key else headers
    return await client.post(f"/api/v1/games/{game_id}/cards", headers=h)


async def scratch(client, headers, card_id: str):
    return await client.post(f"/api/v1/games/cards/{card_id}/scratch", headers=headers)


async def test_a_card_is_sealed_at_issue_and_revealed_once_under_concurrent_scratches(
    client, app, db, make_user, admin_headers
):
    user_id, headers = await make_user()
    _, other = await make_user()
    game = await make_game(
        client, admin_headers, type="scratch", prizes=CARD_PRIZES, out_of_stock="redistribute"
    )
    r = await issue(client, headers, game["id"])
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["status"] == "sealed" and "prize" not in card and card["expires_at"]
    # Decided and stored at issue: the row and the stock say so, but nothing is delivered yet.
    row = await db.fetchrow(
        "select card_status, position, expires_at from game_draws where draw_no = $1", card["card_id"]
    )
    assert row["card_status"] == "sealed" and row["position"] == 0
    assert await db.fetchval("select count(*) from prize_deliveries") == 0
    mine = (await client.get("/api/v1/games/draws", headers=headers)).json()["items"]
    assert mine[0]["prize"] is None and mine[0]["card_status"] == "sealed"

    # Another shopper cannot scratch it (404, like a card that does not exist).
    r = await scratch(client, other, card["card_id"])
    assert r.status_code == 404 and code_of(r) == "game.card_not_found"
    assert (await scratch(client, headers, "NOPE")).status_code == 404
    assert (await scratch(client, {}, card["card_id"])).status_code == 401

    results = await asyncio.gather(*(scratch(client, headers, card["card_id"]) for _ in range(20)))
    assert {r.status_code for r in results} == {200}
    assert {r.json()["prize"]["name"] for r in results} == {"30 积分"}
    assert await db.fetchval("select count(*) from prize_deliveries") == 1
    while await deliver_prizes(app.state.pool):
        pass
    assert await db.fetchval("select balance from points_accounts where user_id = $1", user_id) == 30
    assert await db.fetchval("select count(*) from points_entries") == 1


async def test_an_unscratched_card_expires_and_returns_its_stock_once(
    client, app, db, make_user, admin_headers
):
    _, headers = await make_user()
    game = await make_game(
        client, admin_headers, type="scratch", prizes=CARD_PRIZES, out_of_stock="redistribute", free_per_day=3
    )
    cards = [(await issue(client, headers, game["id"])).json()["card_id"] for _ in range(2)]
    keys = Keys(app.state.settings.redis_prefix)
    redis = app.state.redis
    assert await redis.hget(keys.game_state(game["id"]), "s:0") == "3"
    await db.execute(
        "update game_draws set expires_at = now() - interval '1 second' where draw_no = $1", cards[0]
    )
    results = await asyncio.gather(*(expire_cards(app.state.pool, app.state.scripts, keys) for _ in range(4)))
    assert sum(results) == 1
    assert await expire_cards(app.state.pool, app.state.scripts, keys) == 0
    assert await redis.hget(keys.game_state(game["id"]), "s:0") == "4"
    r = await scratch(client, headers, cards[0])
    assert r.status_code == 409 and code_of(r) == "game.card_expired"
    assert (await scratch(client, headers, cards[1])).status_code == 200
    stats = (await client.get(f"/api/v1/admin/games/{game['id']}/stats", headers=admin_headers)).json()
    assert stats["prizes"][0]["won"] == 1 and stats["prizes"][0]["remaining"] == 4


async def test_egg_smash_shows_eggs_and_the_index_only_picks_the_animation(
    client, db, make_user, admin_headers
):
    _, headers = await make_user()
    prizes = [{"name": "金蛋 8 积分", "kind": "points", "points": 8, "weight": 1}, {**THANKS, "weight": 3}]
    game = await make_game(client, admin_headers, type="egg", prizes=prizes, egg_count=6, free_per_day=20)
    r = await client.get(f"/api/v1/games/{game['id']}", headers=headers)
    assert r.status_code == 200 and r.json()["eggs"] == [0, 1, 2, 3, 4, 5]
    smash = f"/api/v1/games/{game['id']}/smash"
    results = [await client.post(smash, json={"egg": 2}, headers=headers) for _ in range(12)]
    assert {r.status_code for r in results} == {201}
    assert {r.json()["egg"] for r in results} == {2}
    # Each result is the weighted pick of the server's random value, replayed here from the stored
    # row (weights 1 and 3): the egg index plays no part.
    rows = await db.fetch("select rand, position, weights_version from game_draws order by id")
    assert [r["position"] for r in rows] == [0 if r["rand"] % 4 < 1 else 1 for r in rows]
    assert {r["weights_version"] for r in rows} == {game["weights_version"]}
    assert (await client.post(smash, json={"egg": 6}, headers=headers)).status_code == 422
    assert (await client.post(smash, json={"egg": 1, "result": "win"}, headers=headers)).status_code == 422
    assert (await client.post(smash, json={}, headers=headers)).status_code == 422
    r = await client.post(f"/api/v1/games/{game['id']}/draw", headers=headers)
    assert r.status_code == 404
    r = await client.post(f"/api/v1/games/{game['id']}/cards", headers=headers)
    assert r.status_code == 404
    assert await db.fetchval("select count(*) from game_draws") == 12
