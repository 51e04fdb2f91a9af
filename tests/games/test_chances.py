"""Extra chances reach Redis only after their grant committed, once per grant, even when the event
handler that granted them fails and is retried."""

from __future__ import annotations

import asyncio

from shop.auth_tokens import AUD_SHOPPER, issue_access_token
from shop.events import dispatch_order_events
from shop.worker import registered_jobs, tick
from tests.games.test_admin import ADMIN, code_of, make_game
from tests.games.test_draw import draw
from tests.shop.test_events import paid_order
from tests.shop.test_hotpath import ctx_of

# The database refuses a grant for the games listed here: the handler dies after its first grant.
FAIL_GRANTS = """
create table test_fail_grants (game_id bigint primary key);
create function test_fail_grant() returns trigger language plpgsql as $$
begin
    if exists (select 1 from test_fail_grants where game_id = new.game_id) then
        raise exception 'the handler dies after its first grant';
    end if;
    return new;
end $$;
create trigger test_fail_grant before insert on game_chance_grants
    for each row execute function test_fail_grant();
"""
DROP_FAIL_GRANTS = """
drop trigger if exists test_fail_grant on game_chance_grants;
drop function if exists test_fail_grant();
drop table if exists test_fail_grants;
"""


async def games_jobs(app) -> None:
    """One run of every games job, the way the worker runs them (twice: a retry changes nothing)."""
    jobs = [job for job in registered_jobs() if job.func.__module__ == "games.jobs"]
    for _ in range(2):
        assert all((await tick(ctx_of(app), jobs)).values())


async def test_a_paid_order_grant_retried_after_its_handler_failed_counts_once(
    client, app, db, make_user, admin_headers
):
    first, second = [
        await make_game(client, admin_headers, free_per_day=0, chances_per_paid_order=1, extra_per_day_cap=3)
        for _ in range(2)
    ]
    order_id = await paid_order(client, db, make_user)
    user_id = await db.fetchval("select user_id from orders where id = $1", order_id)
    await db.execute(DROP_FAIL_GRANTS + FAIL_GRANTS)
    try:
        await db.execute("insert into test_fail_grants values ($1)", second["id"])
        # The first attempt grants in the first game, then fails: its transaction rolls back.
        await dispatch_order_events(app.state.pool, ctx_of(app))
        assert await db.fetchval("select attempts from order_events where type = 'order.paid'") == 1
        assert await db.fetchval("select count(*) from game_chance_grants") == 0
        await games_jobs(app)
        await db.execute("delete from test_fail_grants")
        await db.execute("update order_events set next_attempt_at = now()")
        # The retry (here two dispatchers at once) grants in both games.
        await asyncio.gather(*(dispatch_order_events(app.state.pool, ctx_of(app)) for _ in range(2)))
    finally:
        await db.execute(DROP_FAIL_GRANTS)
    assert await db.fetchval("select count(*) from game_chance_grants where user_id = $1", user_id) == 2
    await games_jobs(app)
    assert await db.fetchval("select bool_and(redis_done) from game_chance_grants")

    headers = {"Authorization": f"Bearer {issue_access_token(app.state.settings, user_id, AUD_SHOPPER)}"}
    for game in (first, second):
        r = await client.get(f"/api/v1/games/{game['id']}", headers=headers)
        assert r.json()["free_left_today"] == 1
        results = [await draw(client, headers, game["id"]) for _ in range(2)]
        assert [r.status_code for r in results] == [201, 409] and code_of(results[1]) == "game.no_chances"


async def test_a_merchant_grant_is_in_redis_when_answered_and_once_per_reference(
    client, app, db, make_user, admin_headers
):
    game = await make_game(client, admin_headers, free_per_day=0, extra_per_day_cap=5)
    user_id, headers = await make_user()
    grant = {"user_id": user_id, "amount": 2, "ref": "task-7"}
    results = await asyncio.gather(
        *(client.post(f"{ADMIN}/{game['id']}/chances", json=grant, headers=admin_headers) for _ in range(5))
    )
    assert sorted(r.json()["granted"] for r in results) == [0, 0, 0, 0, 2]
    assert await db.fetchval("select bool_and(redis_done) from game_chance_grants")
    r = await client.get(f"/api/v1/games/{game['id']}", headers=headers)
    assert r.json()["free_left_today"] == 2
    await games_jobs(app)
    r = await client.get(f"/api/v1/games/{game['id']}", headers=headers)
    assert r.json()["free_left_today"] == 2
