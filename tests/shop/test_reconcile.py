"""`shop reconcile [--fix]`: Redis counters checked against PostgreSQL and rebuilt from it."""

from __future__ import annotations

import asyncio

from shop import cli
from shop.keys import Keys
from shop.reconcile import reconcile
from tests.shop.test_coupons import claim, code_of, db_counters, make_template, many_users, redis_counters
from tests.shop.test_hotpath import reserve_without_persisting


def run_cli(monkeypatch, settings, *args: str) -> int:
    monkeypatch.setenv("SHOP_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SHOP_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("SHOP_REDIS_PREFIX", settings.redis_prefix)
    try:
        cli.main(["reconcile", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


async def test_corrupted_counter_is_reported_then_fixed_with_no_oversell(
    client, app, db, settings, admin_headers, monkeypatch, capsys
):
    template = await make_template(client, admin_headers, total_quantity=10)
    users = await many_users(db, settings, 15)
    for _, h in users[:6]:
        assert (await claim(client, h, template["id"])).status_code == 201
    assert (await reconcile(settings)).found == []
    assert await asyncio.to_thread(run_cli, monkeypatch, settings) == 0
    assert "redis agrees" in capsys.readouterr().out

    # A counter goes wrong (a bad manual edit, a half-applied restore): 6 claims look like 2.
    keys = Keys(settings.redis_prefix)
    await app.state.redis.hset(keys.coupon_state(template["id"]), "claimed", 2)
    await app.state.redis.hdel(keys.coupon_users(template["id"]), str(users[0][0]))
    report = await reconcile(settings)
    fields = sorted(d.field for d in report.found)
    assert fields == sorted(["claimed", f"claims of user {users[0][0]}"])
    assert report.remaining == report.found
    claimed_diff = next(d for d in report.found if d.field == "claimed")
    assert (claimed_diff.expected, claimed_diff.actual) == ("6", "2")
    assert await asyncio.to_thread(run_cli, monkeypatch, settings) == 1
    out = capsys.readouterr().out
    assert "claimed" in out and "expected '6'" in out

    assert await asyncio.to_thread(run_cli, monkeypatch, settings, "--fix") == 0
    assert "fixed 2 differences" in capsys.readouterr().out
    assert (await reconcile(settings)).found == []
    assert await redis_counters(app, template["id"]) == await db_counters(db, template["id"])
    # The shopper whose count was lost still cannot claim twice, and the quota holds exactly.
    assert code_of(await claim(client, users[0][1], template["id"])) == "coupon.limit_exceeded"
    results = await asyncio.gather(*(claim(client, h, template["id"]) for _, h in users[6:]))
    assert [r.status_code for r in results].count(201) == 4
    assert await db.fetchval("select count(*) from coupons") == 10


async def test_redis_flushed_mid_campaign_reconcile_restores_and_nothing_extra_is_claimed(
    client, app, db, settings, admin_headers
):
    template = await make_template(client, admin_headers, total_quantity=20, per_user_limit=2)
    users = await many_users(db, settings, 40)
    first = await asyncio.gather(*(claim(client, h, template["id"]) for _, h in users[:12]))
    assert all(r.status_code == 201 for r in first)
    # One more reservation whose API process died: in the stream, not yet in PostgreSQL.
    await reserve_without_persisting(app, template["id"], users[12][0])
    assert await db.fetchval("select count(*) from coupons") == 12

    # Redis loses everything of this shop (FLUSHALL / a failover without persistence).
    redis = app.state.redis
    keys = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:*")]
    await redis.delete(*keys)
    r = await claim(client, users[13][1], template["id"])
    assert (r.status_code, code_of(r)) == (503, "coupon.not_ready")

    report = await reconcile(settings, fix=True)
    assert any(d.field == "claimed" and d.actual is None for d in report.found)
    assert report.remaining == []
    # The reservation lost with Redis was never answered with success, so only 12 rows count.
    assert await redis_counters(app, template["id"]) == await db_counters(db, template["id"])
    assert (await redis_counters(app, template["id"]))[0] == 12

    # A shopper who claimed before the loss is still held to the per-user limit of 2.
    assert (await claim(client, users[0][1], template["id"])).status_code == 201
    assert code_of(await claim(client, users[0][1], template["id"])) == "coupon.limit_exceeded"
    rest = await asyncio.gather(*(claim(client, h, template["id"]) for _, h in users[13:]))
    assert [r.status_code for r in rest].count(201) == 7
    assert {code_of(r) for r in rest if r.status_code != 201} == {"coupon.sold_out"}
    assert await db.fetchval("select count(*) from coupons") == 20
    assert await redis_counters(app, template["id"]) == await db_counters(db, template["id"])


async def test_fix_counts_the_unpersisted_stream_tail(client, app, db, settings, admin_headers):
    """A reservation still only in the stream is persisted by reconcile before it counts."""
    template = await make_template(client, admin_headers, total_quantity=5, per_user_limit=5)
    users = await many_users(db, settings, 1)

    await reserve_without_persisting(app, template["id"], users[0][0])
    await reserve_without_persisting(app, template["id"], users[0][0])
    report = await reconcile(settings)
    assert report.found == []
    assert await db.fetchval("select count(*) from coupons") == 2
    assert await redis_counters(app, template["id"]) == (2, {users[0][0]: 2})
