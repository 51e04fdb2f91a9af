"""`shop reconcile` after a Redis loss: prize stock and chance counters come back from PostgreSQL."""

from __future__ import annotations

import asyncio

from games import engine
from shop.hotpath.jobs import persist_all_streams
from shop.keys import Keys
from shop.reconcile import reconcile
from tests.games.test_admin import ADMIN, THANKS, code_of, make_game, many_users
from tests.games.test_draw import draw
from tests.shop.test_hotpath import ctx_of
from tests.shop.test_reconcile import run_cli


async def test_flushed_redis_is_rebuilt_with_stock_and_chances_intact(
    client, app, db, settings, admin_headers, monkeypatch, capsys
):
    prizes = [
        {"name": "20 积分", "kind": "points", "points": 20, "weight": 1, "stock": 4},
        {**THANKS, "weight": 1},
    ]
    game = await make_game(client, admin_headers, prizes=prizes, free_per_day=2, extra_per_day_cap=1)
    (a, ha), (_b, hb), (c, hc) = await many_users(db, settings, 3)
    for headers in (ha, ha, hb):
        assert (await draw(client, headers, game["id"])).status_code == 201
    r = await client.post(
        f"{ADMIN}/{game['id']}/chances",
        json={"user_id": c, "amount": 1, "ref": "task-1"},
        headers=admin_headers,
    )
    assert r.json() == {"granted": 1}
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []
    keys = Keys(settings.redis_prefix)
    before = await app.state.redis.hgetall(keys.game_state(game["id"]))

    # Redis loses everything of this shop.
    redis = app.state.redis
    doomed = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:*")]
    await redis.delete(*doomed)
    r = await draw(client, hb, game["id"])
    assert r.status_code == 503 and code_of(r) == "game.not_ready"
    found = [d for d in (await reconcile(settings)).found if d.checker == "games"]
    assert {"status", "s:0", f"users {a}", f"today {a}:f", f"today {c}:x", "stream registered"} <= {
        d.field for d in found
    }

    assert await asyncio.to_thread(run_cli, monkeypatch, settings, "--fix") == 0
    capsys.readouterr()
    assert (await reconcile(settings)).found == []
    assert await redis.hgetall(keys.game_state(game["id"])) == before
    # Chances hold as before the loss: a has used both, b one, c has two plus the extra one.
    assert code_of(await draw(client, ha, game["id"])) == "game.no_chances"
    assert (await draw(client, hb, game["id"])).status_code == 201
    assert code_of(await draw(client, hb, game["id"])) == "game.no_chances"
    assert [(await draw(client, hc, game["id"])).status_code for _ in range(4)] == [201, 201, 201, 409]
    won = await db.fetchval("select count(*) from game_draws where position = 0")
    assert won <= 4 and int(await redis.hget(keys.game_state(game["id"]), "s:0")) == 4 - won


async def test_a_draw_not_yet_written_is_counted_by_the_rebuild(client, app, db, settings, admin_headers):
    prizes = [{"name": "20 积分", "kind": "points", "points": 20, "weight": 1, "stock": 3}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    [(user_id, _)] = await many_users(db, settings, 1)
    keys = Keys(settings.redis_prefix)
    now = engine.clock()
    day = engine.business_date(settings, now)
    # What an API process that died right after the script leaves behind: an entry, no row.
    reply = await app.state.scripts.game_draw(
        keys=[
            keys.game_state(game["id"]), keys.game_users(game["id"]), keys.game_day(game["id"], day.isoformat()),
            keys.game_idem(game["id"], user_id, None), keys.game_stream(game["id"]),
        ],
        args=engine.draw_args(
            game_id=game["id"], user_id=user_id, rid="LOST1", rand=7, mode="free", game_type="wheel", now=now, day=day
        ),
    )  # fmt: skip
    assert reply[0] == "ok"
    await app.state.redis.hset(keys.game_state(game["id"]), "s:0", 3)  # and a counter goes wrong
    report = await reconcile(settings, fix=True)
    assert [d.field for d in report.found] == ["s:0"] and report.remaining == []
    assert await db.fetchval("select user_id from game_draws where draw_no = 'LOST1'") == user_id
    assert await app.state.redis.hget(keys.game_state(game["id"]), "s:0") == "2"


async def test_the_worker_persists_a_draw_whose_api_process_died(client, app, db, settings, admin_headers):
    prizes = [{"name": "20 积分", "kind": "points", "points": 20, "weight": 1}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    [(user_id, _)] = await many_users(db, settings, 1)
    keys = Keys(settings.redis_prefix)
    now = engine.clock()
    day = engine.business_date(settings, now)
    reply = await app.state.scripts.game_draw(
        keys=[
            keys.game_state(game["id"]), keys.game_users(game["id"]), keys.game_day(game["id"], day.isoformat()),
            keys.game_idem(game["id"], user_id, None), keys.game_stream(game["id"]),
        ],
        args=engine.draw_args(
            game_id=game["id"], user_id=user_id, rid="DIED1", rand=3, mode="free", game_type="wheel", now=now, day=day
        ),
    )  # fmt: skip
    assert reply[0] == "ok"
    assert await persist_all_streams(ctx_of(app)) == 1
    row = await db.fetchrow("select id, rand, position from game_draws where draw_no = 'DIED1'")
    assert (row["rand"], row["position"]) == (3, 0)
    assert await db.fetchval("select kind from prize_deliveries where draw_id = $1", row["id"]) == "points"
    assert await persist_all_streams(ctx_of(app)) == 0
