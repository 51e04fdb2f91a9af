"""Flash sales through the HTTP API: merchant events, tokens, buying, refusals, stats (real PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from shop import events
from shop.errors import ShopError
from shop.flash_sale import service
from shop.flash_sale.service import make_token, verify_token
from shop.keys import Keys
from tests.factories import make_address, make_product, stock_of
from tests.shop.test_coupons import code_of, many_users

ADMIN = "/api/v1/admin/flash-sales"
SHOP = "/api/v1/flash-sales"
_keys = itertools.count()


def at(**delta) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


async def make_sale(
    client,
    admin_headers,
    db,
    *,
    quota: int = 20,
    per_user_limit: int = 1,
    stock: int = 100,
    publish: bool = True,
    starts: dict | None = None,
    ends: dict | None = None,
    **fields,
) -> dict:
    """A live event (started a second ago, ends in an hour) on one new SKU, unless overridden."""
    _, (sku_id,) = await make_product(db, skus=[(9900, stock)])
    body = {
        "name": "直播秒杀",
        "starts_at": at(**(starts if starts is not None else {"seconds": -1})),
        "ends_at": at(**(ends if ends is not None else {"hours": 1})),
        "items": [{"sku_id": sku_id, "flash_price": 990, "quota": quota, "per_user_limit": per_user_limit}],
        **fields,
    }
    r = await client.post(ADMIN, json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    sale = r.json()
    if publish:
        r = await client.post(f"{ADMIN}/{sale['id']}/publish", headers=admin_headers)
        assert r.status_code == 200, r.text
        sale = r.json()
    return sale


async def buyers(db, settings, n: int, sale_id: int) -> list[dict]:
    """n shoppers, each with an address and a purchase token (made directly: no n logins)."""
    users = await many_users(db, settings, n)
    ids = [u for u, _ in users]
    addresses = await db.fetch(
        """insert into addresses (user_id, receiver, phone, province, city, district, detail, is_default)
           select u, '张三', '13800138000', '广东省', '深圳市', '南山区', '科技园 1 号', true
           from unnest($1::bigint[]) u returning id, user_id""",
        ids,
    )
    by_user = {r["user_id"]: r["id"] for r in addresses}
    expires = int(datetime.now(UTC).timestamp()) + 600
    return [
        {
            "id": uid,
            "headers": h,
            "address_id": by_user[uid],
            "token": make_token(settings, uid, sale_id, expires),
        }
        for uid, h in users
    ]


async def buy(
    client, shopper: dict, sale: dict, *, qty: int = 1, key: str | None = None, item: int = 0, **over
):
    body = {"qty": qty, "address_id": shopper["address_id"], "token": shopper["token"], **over}
    headers = dict(shopper["headers"])
    if key:
        headers["Idempotency-Key"] = key
    item_id = sale["items"][item]["id"]
    return await client.post(f"{SHOP}/{sale['id']}/items/{item_id}/orders", json=body, headers=headers)


async def redis_item(app, sale: dict, item: int = 0) -> tuple[int, dict[int, int]]:
    keys = Keys(app.state.settings.redis_prefix)
    item_id = sale["items"][item]["id"]
    remaining = int(await app.state.redis.hget(keys.flash_item(sale["id"], item_id), "remaining"))
    bought = await app.state.redis.hgetall(keys.flash_bought(sale["id"], item_id))
    return remaining, {int(k): int(v) for k, v in bought.items()}


async def db_item(db, sale: dict, item: int = 0) -> tuple[int, dict[int, int]]:
    item_id = sale["items"][item]["id"]
    from shop.flash_sale.queries import SOLD, bought_counts

    row = await db.fetchrow(f"select quota, {SOLD} as sold from flash_sale_items i where id = $1", item_id)

    return row["quota"] - row["sold"], await bought_counts(db, item_id)


async def test_publish_sets_quota_aside_and_a_winner_gets_a_real_order(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=20, stock=100, pay_deadline_minutes=5)
    sku_id = sale["items"][0]["sku_id"]
    assert sale["status"] == "published"
    assert sale["items"][0]["remaining"] == 20
    assert await stock_of(db, sku_id) == 80  # ordinary checkout cannot sell the quota
    [shopper] = await buyers(db, settings, 1, sale["id"])

    r = await buy(client, shopper, sale, qty=1)
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["kind"] == "flash_sale"
    assert order["activity_id"] == sale["id"]
    assert order["status"] == "pending_payment"
    assert order["lines"][0]["unit_price"] == 990 and order["lines"][0]["sku_id"] == sku_id
    assert order["items_amount"] == 990
    assert order["address"]["receiver"] == "张三"
    deadline = datetime.fromisoformat(order["pay_deadline"])
    created = datetime.fromisoformat(order["created_at"])
    assert timedelta(minutes=4, seconds=50) < deadline - created <= timedelta(minutes=5, seconds=1)
    row = await db.fetchrow("select kind, activity_id, payable_amount from orders where id = $1", order["id"])
    assert (row["kind"], row["activity_id"]) == ("flash_sale", sale["id"])
    assert await db.fetchval("select count(*) from order_lines where order_id = $1", order["id"]) == 1
    # Nothing subscribes to order.created: the hot path writes no outbox row for it.
    assert await db.fetchval("select count(*) from order_events where order_id = $1", order["id"]) == 0
    assert await redis_item(app, sale) == await db_item(db, sale) == (19, {shopper["id"]: 1})
    # The order reads back like any order, exactly as the 201 gave it (built from the insert's rows).
    r = await client.get(f"/api/v1/orders/{order['id']}", headers=shopper["headers"])
    assert r.status_code == 200 and r.json() == order


async def test_a_subscribed_order_created_event_is_written_with_the_winners_order(
    client, app, db, settings, admin_headers
):
    saved = {k: list(v) for k, v in events.HANDLERS.items()}
    seen = []

    async def created(conn, event, ctx):
        seen.append((event.order_id, event.payload))

    try:
        events.on_order_event("order.created", "test.flash_created")(created)
        sale = await make_sale(client, admin_headers, db, quota=5)
        [shopper] = await buyers(db, settings, 1, sale["id"])
        r = await buy(client, shopper, sale)
        assert r.status_code == 201, r.text
        order = r.json()
        rows = await db.fetch("select type, payload from order_events where order_id = $1", order["id"])
        assert [(e["type"], e["payload"]) for e in rows] == [
            ("order.created", {"kind": "flash_sale", "payable_amount": order["payable_amount"]})
        ]
        while await events.dispatch_order_events(app.state.pool, None):
            pass
        assert (order["id"], {"kind": "flash_sale", "payable_amount": order["payable_amount"]}) in seen
    finally:
        events.HANDLERS.clear()
        events.HANDLERS.update(saved)


def test_every_order_event_handler_is_registered_by_the_worker_module_list():
    """`events.subscribed` relies on the worker's module list: importing every module of the
    project registers no handler that importing that list alone does not (a fresh interpreter)."""
    script = """
import importlib, pkgutil, sys
import shop, games
from shop import events
events.subscribed("order.paid")
listed = {(t, n) for t, hs in events.HANDLERS.items() for n, _ in hs}
for package in (shop, games):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
every = {(t, n) for t, hs in events.HANDLERS.items() for n, _ in hs}
print(sorted(every - listed), len(every))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    missing, count = out.rsplit(" ", 1)
    assert missing == "[]" and int(count) >= 4, out


def test_the_app_completes_the_order_event_registry_at_start_up(settings):
    """The first winner's batch must not pay for importing the handler modules (tens of ms with the
    event loop blocked): an API process imports them while it starts (a fresh interpreter)."""
    script = """
import asyncio, sys
from litestar.testing import AsyncTestClient
from shop import events
from shop.app import create_app

async def main():
    async with AsyncTestClient(create_app()) as client:
        assert (await client.get("/healthz")).status_code == 200
        print(bool(events._LOADED), "games.jobs" in sys.modules)

asyncio.run(main())
"""
    env = {
        **os.environ,
        "SHOP_DATABASE_URL": settings.database_url,
        "SHOP_REDIS_URL": settings.redis_url,
        "SHOP_REDIS_PREFIX": settings.redis_prefix,
        "SHOP_ENV": "test",
        "SHOP_LOG_REQUESTS": "false",
    }
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr[-2000:]


async def test_publishing_more_than_the_stock_is_409_and_nothing_moves(client, db, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=50, stock=10, publish=False)
    r = await client.post(f"{ADMIN}/{sale['id']}/publish", headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "flash_sale.insufficient_stock"
    assert await stock_of(db, sale["items"][0]["sku_id"]) == 10
    assert await db.fetchval("select status from flash_sales where id = $1", sale["id"]) == "draft"
    r = await client.post(f"{ADMIN}/404404/publish", headers=admin_headers)
    assert r.status_code == 404 and code_of(r) == "flash_sale.not_found"


async def test_merchant_validation_auth_and_lists(client, db, admin_headers, make_user):
    _, (sku_id,) = await make_product(db)
    base = {"name": "x", "starts_at": at(hours=1), "ends_at": at(hours=2)}
    item = {"sku_id": sku_id, "flash_price": 100, "quota": 5}
    r = await client.post(ADMIN, json={**base, "items": [item]})
    assert r.status_code == 401
    _, shopper_headers = await make_user()
    r = await client.post(ADMIN, json={**base, "items": [item]}, headers=shopper_headers)
    assert r.status_code == 401
    r = await client.post(
        ADMIN, json={**base, "ends_at": at(minutes=30), "items": [item]}, headers=admin_headers
    )
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "ends_at"
    r = await client.post(ADMIN, json={**base, "items": [item, item]}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.post(ADMIN, json={**base, "items": [{**item, "quota": 0}]}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.post(ADMIN, json={**base, "items": [{**item, "sku_id": 999999}]}, headers=admin_headers)
    assert r.status_code == 404 and code_of(r) == "catalog.sku_not_found"
    r = await client.post(ADMIN, json={**base, "items": [item], "surprise": 1}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.post(ADMIN, json={**base, "items": [item]}, headers=admin_headers)
    assert r.status_code == 201 and r.json()["pay_deadline_minutes"] == 5
    r = await client.get(ADMIN, params={"status": "draft"}, headers=admin_headers)
    assert r.status_code == 200 and [s["id"] for s in r.json()["items"]] == [r.json()["items"][0]["id"]]
    r = await client.get(f"{ADMIN}/999999", headers=admin_headers)
    assert r.status_code == 404


async def test_edit_until_start_moves_quota_in_postgresql_and_redis(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=20, stock=100, starts={"minutes": 10})
    sku_id = sale["items"][0]["sku_id"]
    body = {
        "name": "直播秒杀 改",
        "starts_at": sale["starts_at"],
        "ends_at": sale["ends_at"],
        "items": [{"sku_id": sku_id, "flash_price": 880, "quota": 30, "per_user_limit": 2}],
    }
    r = await client.put(f"{ADMIN}/{sale['id']}", json=body, headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["items"][0]["remaining"] == 30 and r.json()["items"][0]["flash_price"] == 880
    assert await stock_of(db, sku_id) == 70
    body["items"][0]["quota"] = 5
    r = await client.put(f"{ADMIN}/{sale['id']}", json=body, headers=admin_headers)
    assert r.status_code == 200 and r.json()["items"][0]["remaining"] == 5
    assert await stock_of(db, sku_id) == 95
    body["items"][0]["quota"] = 500
    r = await client.put(f"{ADMIN}/{sale['id']}", json=body, headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "flash_sale.insufficient_stock"
    assert await stock_of(db, sku_id) == 95
    assert (await redis_item(app, sale))[0] == 5
    # Once started, the rules are fixed.
    await db.execute(
        "update flash_sales set starts_at = now() - interval '1 second' where id = $1", sale["id"]
    )
    body["items"][0]["quota"] = 6
    r = await client.put(f"{ADMIN}/{sale['id']}", json=body, headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "flash_sale.started"


async def test_an_item_that_sold_during_an_edit_is_not_removed(client, app, db, admin_headers, make_user):
    """An edit that began just before the start and commits after it: Redis, which sells the
    item, refuses to let it go, so no order can be left without its item. The part of the edit
    Redis had already taken (another item's raised quota) does not outlive the refusal."""
    sale = await make_sale(client, admin_headers, db, quota=20, stock=100, starts={"minutes": 10})
    _, (second_sku,) = await make_product(db, skus=[(9900, 50)])
    first = {k: sale["items"][0][k] for k in ("sku_id", "flash_price", "quota", "per_user_limit")}
    body = {"name": sale["name"], "starts_at": sale["starts_at"], "ends_at": sale["ends_at"]}
    second = {"sku_id": second_sku, "flash_price": 500, "quota": 10, "per_user_limit": 1}
    r = await client.put(
        f"{ADMIN}/{sale['id']}", json={**body, "items": [first, second]}, headers=admin_headers
    )
    assert r.status_code == 200, r.text
    sale = r.json()
    item = next(i for i in sale["items"] if i["sku_id"] == second_sku)
    first_item = next(i for i in sale["items"] if i["sku_id"] == first["sku_id"])
    first_stock = await stock_of(db, first["sku_id"])
    # What a winner's script call does, racing the edit (PostgreSQL has no order yet): the unit
    # taken, the shopper counted, the reservation in the event's stream.
    keys = Keys(app.state.settings.redis_prefix)
    redis = app.state.redis
    user_id, _ = await make_user()
    address_id = await make_address(db, user_id)
    payload = {
        "e": sale["id"],
        "i": item["id"],
        "q": 1,
        "a": address_id,
        "at": int(datetime.now(UTC).timestamp() * 1000),
    }
    await redis.hincrby(keys.flash_item(sale["id"], item["id"]), "remaining", -1)
    await redis.hset(keys.flash_bought(sale["id"], item["id"]), str(user_id), 1)
    await redis.xadd(
        keys.flash_stream(sale["id"]),
        {
            "rid": "RACED-WINNER",
            "uid": user_id,
            "p": msgspec.json.encode(payload).decode(),
            "i": item["id"],
            "q": 1,
        },
    )
    raised = {**first, "quota": first["quota"] + 10}
    r = await client.put(f"{ADMIN}/{sale['id']}", json={**body, "items": [raised]}, headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "flash_sale.item_sold"
    assert await db.fetchval("select count(*) from flash_sale_items where id = $1", item["id"]) == 1
    assert await stock_of(db, second_sku) == 40  # its quota is still set aside
    assert int(await redis.hget(keys.flash_item(sale["id"], item["id"]), "remaining")) == 9
    # The raised quota was rolled back in PostgreSQL, and in Redis too.
    assert await stock_of(db, first["sku_id"]) == first_stock
    assert await db.fetchval("select quota from flash_sale_items where id = $1", first_item["id"]) == 20
    assert int(await redis.hget(keys.flash_item(sale["id"], first_item["id"]), "remaining")) == 20
    # The raced winner's order is in PostgreSQL (Redis was rewritten from it, stream first).
    assert (
        await db.fetchval(
            "select count(*) from flash_sale_orders where reservation_id = 'RACED-WINNER' and user_id = $1",
            user_id,
        )
        == 1
    )


async def test_an_edit_cancelled_after_its_redis_steps_leaves_redis_as_postgresql(
    client, app, db, admin_headers, monkeypatch
):
    """A live edit whose call is cancelled (the server shutting down, say) after Redis took the
    raised quota and before PostgreSQL committed it: the transaction rolls back, and Redis is
    rewritten from PostgreSQL, so it never sells units PostgreSQL did not set aside."""
    sale = await make_sale(client, admin_headers, db, quota=20, stock=100, starts={"minutes": 10})
    item = sale["items"][0]
    stock = await stock_of(db, item["sku_id"])
    keys = Keys(app.state.settings.redis_prefix)
    real, reached = service._apply_redis_edit, asyncio.Event()

    async def cancelled_after_redis(*args):
        await real(*args)
        reached.set()
        await asyncio.Event().wait()  # cancelled here, the transaction still open

    monkeypatch.setattr(service, "_apply_redis_edit", cancelled_after_redis)
    body = {
        "name": sale["name"],
        "starts_at": sale["starts_at"],
        "ends_at": sale["ends_at"],
        "items": [{**{k: item[k] for k in ("sku_id", "flash_price", "per_user_limit")}, "quota": 30}],
    }
    call = asyncio.create_task(client.put(f"{ADMIN}/{sale['id']}", json=body, headers=admin_headers))
    await asyncio.wait_for(reached.wait(), 10)
    assert int(await app.state.redis.hget(keys.flash_item(sale["id"], item["id"]), "remaining")) == 30
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await db.fetchval("select quota from flash_sale_items where id = $1", item["id"]) == 20
    assert await stock_of(db, item["sku_id"]) == stock
    assert int(await app.state.redis.hget(keys.flash_item(sale["id"], item["id"]), "remaining")) == 20


async def writers_of_two_events(client, admin_headers, db):
    """A live event and a draft, and the admin calls that write their Redis state: publishing the
    draft, editing the live one (quota 5), stopping it. Returns the live event and {name: (event
    id, call)}."""
    draft = await make_sale(client, admin_headers, db, publish=False, starts={"minutes": 10})
    live = await make_sale(client, admin_headers, db, starts={"minutes": 10})
    item = {k: live["items"][0][k] for k in ("sku_id", "flash_price", "per_user_limit")}
    edit = {
        "name": live["name"],
        "starts_at": live["starts_at"],
        "ends_at": live["ends_at"],
        "items": [{**item, "quota": 5}],
    }
    return live, {
        "publish": (
            draft["id"],
            lambda: client.post(f"{ADMIN}/{draft['id']}/publish", headers=admin_headers),
        ),
        "edit": (live["id"], lambda: client.put(f"{ADMIN}/{live['id']}", json=edit, headers=admin_headers)),
        "stop": (live["id"], lambda: client.post(f"{ADMIN}/{live['id']}/stop", headers=admin_headers)),
    }


# The lock service.sale_lock takes (shop.db.session_lock on "flash_sale:<id>"), as another writer
# (say, an older process) would take it.
SALE_LOCK = "hashtextextended('flash_sale:' || $1::bigint, 0)"


async def test_writers_of_an_events_redis_state_take_turns(client, app, db, admin_headers):
    """Publishing, editing (with its rebuild after a failure) and stopping each read PostgreSQL,
    then write Redis: one at a time per event, so none writes back what another just changed."""
    live, calls = await writers_of_two_events(client, admin_headers, db)
    lock = SALE_LOCK
    for name, (sale_id, call) in calls.items():
        await db.execute(f"select pg_advisory_lock({lock})", sale_id)  # another writer at work
        try:
            pending = asyncio.create_task(call())
            await asyncio.sleep(0.3)
            assert not pending.done(), name
        finally:
            await db.execute(f"select pg_advisory_unlock({lock})", sale_id)
        r = await asyncio.wait_for(pending, 10)
        assert r.status_code == 200, (name, r.text)
    keys = Keys(app.state.settings.redis_prefix)
    # The edit's lowered quota reached Redis, then the stop closed the event there.
    assert await app.state.redis.hget(keys.flash_state(live["id"]), "status") == "ended"


async def test_an_admin_call_behind_a_busy_writer_is_told_to_retry_and_changes_nothing(
    client, app, db, admin_headers, monkeypatch
):
    """A writer holding an event for long (a big `reconcile --fix`): publish, edit and stop give up
    after a bounded wait with 409 `flash_sale.busy`, leave the event as it was, and work once it is free."""
    monkeypatch.setattr(service, "ADMIN_LOCK_WAIT_SECONDS", 0.3)
    live, named = await writers_of_two_events(client, admin_headers, db)
    calls = list(named.values())  # publish, edit, stop: in that order
    keys = Keys(app.state.settings.redis_prefix)

    async def state():
        return (
            await db.fetch("select id, status, published_at, stopped_at from flash_sales order by id"),
            await db.fetch("select id, quota from flash_sale_items order by id"),
            await db.fetch("select id, stock from skus order by id"),
            await app.state.redis.hgetall(keys.flash_state(live["id"])),
            await app.state.redis.hgetall(keys.flash_item(live["id"], live["items"][0]["id"])),
        )

    before = await state()
    lock = SALE_LOCK
    for sale_id, _ in calls:
        await db.execute(f"select pg_advisory_lock({lock})", sale_id)  # another writer at work
    try:
        for _, call in calls:
            r = await call()
            assert r.status_code == 409 and r.json()["error"]["code"] == "flash_sale.busy", r.text
    finally:
        for sale_id, _ in calls:
            await db.execute(f"select pg_advisory_unlock({lock})", sale_id)
    assert await state() == before
    # The limit is the lock wait's alone: what runs under the lock has the session's usual one.
    async with app.state.pool.acquire() as conn, service.sale_lock(conn, live["id"], wait=5):
        assert await conn.fetchval("show lock_timeout") == "0"
    for _, call in calls:
        r = await call()
        assert r.status_code == 200, r.text


def test_a_remembered_purchase_token_still_expires_and_binds_shopper_event_and_key(settings):
    """Checked tokens are remembered per process (no HMAC per retry): the memory must not widen
    what a token is good for."""
    expires = int(datetime.now(UTC).timestamp()) + 60
    token = make_token(settings, 7, 3, expires)
    verify_token(settings, token, 7, 3)
    verify_token(settings, token, 7, 3)  # remembered
    for user_id, sale_id in ((8, 3), (7, 4)):
        with pytest.raises(ShopError) as refused:
            verify_token(settings, token, user_id, sale_id)
        assert refused.value.code == "flash_sale.token_invalid"
    with pytest.raises(ShopError) as refused:
        verify_token(settings, token, 7, 3, now=expires)
    assert refused.value.code == "flash_sale.token_expired"
    signature = token.partition(".")[2]
    respelled = [  # the same expiry and signature, spelled otherwise: refused, never remembered
        f"0{expires}.{signature}",
        f"{str(expires).translate(str.maketrans('0123456789', '٠١٢٣٤٥٦٧٨٩'))}.{signature}",
        f"{expires}².{signature}",
        f"{expires}.{signature[:-1]}é",
    ]
    remembered = len(service._VALID_TOKENS)
    for other in respelled:
        with pytest.raises(ShopError) as refused:
            verify_token(settings, other, 7, 3)
        assert refused.value.code == "flash_sale.token_invalid", other
    assert len(service._VALID_TOKENS) == remembered
    rotated = msgspec.structs.replace(
        settings, flash_token_secret="another-secret-of-enough-length-0123456789"
    )
    with pytest.raises(ShopError) as refused:
        verify_token(rotated, token, 7, 3)
    assert refused.value.code == "flash_sale.token_invalid"


async def test_asking_about_many_events_keeps_the_window_memory_bounded(
    client, app, db, admin_headers, make_user, monkeypatch
):
    """Any shopper can ask for a token for any id: what a process remembers of event windows stays
    bounded, and a live event's token is still issued after the memory was dropped."""
    monkeypatch.setattr(service, "MEMORY_SIZE", 5)
    sale = await make_sale(client, admin_headers, db, quota=5)
    _, headers = await make_user()
    for sale_id in range(10**9, 10**9 + 40):
        r = await client.get(f"{SHOP}/{sale_id}/token", headers=headers)
        assert r.status_code == 404 and code_of(r) == "flash_sale.not_found"
        assert len(app.state.flash_windows) <= 5
    r = await client.get(f"{SHOP}/{sale['id']}/token", headers=headers)
    assert r.status_code == 200 and r.json()["token"]


async def test_a_fetch_shared_by_a_crowd_survives_its_first_caller_going_away(app):
    """The per-process memories (event windows, key holders) fetch once for everyone asking at the
    same instant: the first caller's cancellation must not leave the others waiting forever."""
    release = asyncio.Event()
    fetched = []

    async def fetch():
        fetched.append(1)
        await release.wait()
        return "value"

    until = time.monotonic() + 60
    first = asyncio.create_task(service._remembered(app.state, "test_memory", 1, until, fetch))
    await asyncio.sleep(0)
    others = [
        asyncio.create_task(service._remembered(app.state, "test_memory", 1, until, fetch)) for _ in range(3)
    ]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*others), 5) == ["value"] * 3
    assert fetched == [1]
    assert first.cancelled()

    # A failed fetch reaches everyone waiting on it and is not remembered: the next ask fetches.
    async def failing():
        fetched.append(2)
        raise ConnectionError("redis went away")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await service._remembered(app.state, "test_memory", 2, until, failing)
    assert fetched == [1, 2, 2]


async def test_window_token_and_refusal_codes(client, app, db, settings, admin_headers, make_user):
    sale = await make_sale(client, admin_headers, db, quota=5, starts={"minutes": 10})
    user_id, headers = await make_user()
    address_id = await make_address(db, user_id)
    # No token before the start: scripts cannot pre-fire.
    r = await client.get(f"{SHOP}/{sale['id']}/token", headers=headers)
    assert r.status_code == 409 and code_of(r) == "flash_sale.not_started"
    r = await client.get(f"{SHOP}/{sale['id']}/token")
    assert r.status_code == 401
    r = await client.get(f"{SHOP}/999999/token", headers=headers)
    assert r.status_code == 404
    shopper = {"id": user_id, "headers": headers, "address_id": address_id}
    # A token forged for a later expiry, or made for another shopper, is refused without Redis.
    r = await buy(client, {**shopper, "token": "9999999999.forged"}, sale)
    assert r.status_code == 403 and code_of(r) == "flash_sale.token_invalid"
    other = make_token(settings, user_id + 1, sale["id"], int(datetime.now(UTC).timestamp()) + 60)
    r = await buy(client, {**shopper, "token": other}, sale)
    assert r.status_code == 403 and code_of(r) == "flash_sale.token_invalid"
    stale = make_token(settings, user_id, sale["id"], int(datetime.now(UTC).timestamp()) - 1)
    r = await buy(client, {**shopper, "token": stale}, sale)
    assert r.status_code == 403 and code_of(r) == "flash_sale.token_expired"
    good = make_token(settings, user_id, sale["id"], int(datetime.now(UTC).timestamp()) + 60)
    shopper["token"] = good
    r = await buy(client, shopper, sale)
    assert r.status_code == 409 and code_of(r) == "flash_sale.not_started"
    r = await client.post(
        f"{SHOP}/{sale['id']}/items/{sale['items'][0]['id']}/orders",
        json={"qty": 1, "address_id": address_id},
        headers=headers,
    )
    assert r.status_code == 422  # the token is required
    r = await client.post(
        f"{SHOP}/{sale['id']}/items/{sale['items'][0]['id']}/orders",
        json={"qty": 1, "address_id": address_id, "token": good},
    )
    assert r.status_code == 401
    r = await buy(client, shopper, sale, qty=0)
    assert r.status_code == 422

    # Live: the token endpoint answers, and the purchase goes through with it.
    await db.execute(
        "update flash_sales set starts_at = now() - interval '1 second' where id = $1", sale["id"]
    )
    await app.state.redis.hset(Keys(settings.redis_prefix).flash_state(sale["id"]), "starts_ms", 0)
    app.state.flash_windows.clear()  # the window is cached for half a second
    r = await client.get(f"{SHOP}/{sale['id']}/token", headers=headers)
    assert r.status_code == 200
    shopper["token"] = r.json()["token"]
    r = await buy(client, shopper, sale)
    assert r.status_code == 201
    r = await buy(client, shopper, sale)
    assert r.status_code == 409 and code_of(r) == "flash_sale.limit_exceeded"
    r = await client.post(
        f"{SHOP}/{sale['id']}/items/999999/orders",
        json={"qty": 1, "address_id": address_id, "token": shopper["token"]},
        headers=headers,
    )
    assert r.status_code == 404 and code_of(r) == "flash_sale.not_found"

    # Stopped early: ended, and the unsold units are back in SKU stock at once.
    r = await client.post(f"{ADMIN}/{sale['id']}/stop", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "settled"
    assert await stock_of(db, sale["items"][0]["sku_id"]) == 100 - 1
    other_user = (await buyers(db, settings, 1, sale["id"]))[0]
    r = await buy(client, other_user, sale)
    assert r.status_code == 409 and code_of(r) == "flash_sale.ended"
    r = await client.post(f"{ADMIN}/{sale['id']}/stop", headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "flash_sale.illegal_transition"


async def test_idempotency_key_replays_the_same_order(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=3)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    first, second = await asyncio.gather(
        buy(client, shopper, sale, key="k-1"), buy(client, shopper, sale, key="k-1")
    )
    assert {first.status_code, second.status_code} == {201}
    assert first.json()["id"] == second.json()["id"]
    third = await buy(client, shopper, sale, key="k-1")
    assert third.status_code == 201 and third.json()["id"] == first.json()["id"]
    assert third.headers["Idempotent-Replayed"] == "true"
    r = await buy(client, shopper, sale, key="k-1", qty=2)
    assert r.status_code == 422 and code_of(r) == "idempotency.mismatch"
    assert await db.fetchval("select count(*) from orders") == 1
    assert await redis_item(app, sale) == await db_item(db, sale) == (9, {shopper["id"]: 1})


async def test_a_key_redis_forgot_never_makes_a_second_order(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=5)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    first = await buy(client, shopper, sale, key="k-lost")
    assert first.status_code == 201, first.text
    keys = Keys(settings.redis_prefix)
    idem = keys.flash_idem(sale["id"], shopper["id"], "k-lost")
    # Kept for the sale's hour and a day after, not only a day.
    assert 24 * 3600 + 3500 < await app.state.redis.ttl(idem) <= 25 * 3600
    await app.state.redis.delete(idem)  # Redis forgot it (a flush, an expiry)
    retried = await asyncio.gather(*(buy(client, shopper, sale, key="k-lost") for _ in range(3)))
    assert [r.status_code for r in retried] == [201] * 3
    assert {r.json()["id"] for r in retried} == {first.json()["id"]}
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in retried)
    assert await db.fetchval("select count(*) from orders") == 1
    assert await db.fetchval("select idempotency_key from flash_sale_orders") == "k-lost"
    await app.state.redis.delete(idem)
    other = await buy(client, shopper, sale, key="k-lost", qty=2)  # the key, another request
    assert other.status_code == 422 and code_of(other) == "idempotency.mismatch"
    assert await db.fetchval("select count(*) from orders") == 1
    # Redis counted the retries' units: reconcile finds them and gives them back.
    assert await redis_item(app, sale) != await db_item(db, sale)
    from shop.reconcile import reconcile

    assert (await reconcile(settings, fix=True)).remaining == []
    assert await redis_item(app, sale) == await db_item(db, sale) == (9, {shopper["id"]: 1})


async def test_a_rebuild_puts_the_keys_back(client, app, db, settings, admin_headers):
    from shop.reconcile import reconcile

    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=3)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    first = await buy(client, shopper, sale, key="k-flush")
    assert first.status_code == 201, first.text
    await app.state.redis.delete(
        *[k async for k in app.state.redis.scan_iter(match=f"{settings.redis_prefix}:*", count=1000)]
    )
    assert (await reconcile(settings, fix=True)).remaining == []
    again = await buy(client, shopper, sale, key="k-flush")
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await buy(client, shopper, sale, key="k-flush", qty=2)
    assert other.status_code == 422 and code_of(other) == "idempotency.mismatch"
    assert await db.fetchval("select count(*) from orders") == 1
    assert await redis_item(app, sale) == await db_item(db, sale) == (9, {shopper["id"]: 1})


async def test_buying_with_another_shoppers_address_is_404(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=10)
    mine, theirs = await buyers(db, settings, 2, sale["id"])
    r = await buy(client, mine, sale, address_id=theirs["address_id"])
    assert r.status_code == 404 and code_of(r) == "address.not_found"
    r = await buy(client, mine, sale, address_id=10**12)
    assert r.status_code == 404 and code_of(r) == "address.not_found"
    assert await db.fetchval("select count(*) from orders") == 0
    assert await redis_item(app, sale) == (10, {})
    r = await buy(client, mine, sale)
    assert r.status_code == 201 and r.json()["address"]["receiver"] == "张三"


async def test_keyed_losers_of_a_sold_out_item_are_answered_without_redis(
    client, app, db, settings, admin_headers
):
    """A front end sends an Idempotency-Key with every press. Once this process saw the item sold
    out, a keyed request is a loser like the rest unless its shopper holds a key record (only they
    can be retrying a win, given back since or not): no script call for the others. The holders
    are read once for the whole crowd, and a winner's retry still gets its order."""
    from shop.reconcile import reconcile

    sale = await make_sale(client, admin_headers, db, quota=2)
    shoppers = await buyers(db, settings, 42, sale["id"])
    won = [await buy(client, s, sale, key=f"press-{i}") for i, s in enumerate(shoppers[:3])]
    assert [r.status_code for r in won] == [201, 201, 409]
    # The first winner cancels; the third shopper takes the unit back with a new press.
    r = await client.post(f"/api/v1/orders/{won[0].json()['id']}/cancel", headers=shoppers[0]["headers"])
    assert r.status_code == 200, r.text
    app.state.flash_sold_out.clear()
    retook = await buy(client, shoppers[2], sale, key="press-2b")
    assert retook.status_code == 201
    item = (sale["id"], sale["items"][0]["id"])
    assert service.sold_out_here(app.state, *item)
    app.state.flash_sold_out[item] = time.monotonic() + 60  # (1 s in production: the test needs longer)
    getattr(app.state, "flash_key_holders", {}).clear()  # a later flag: the holders are read afresh

    async def calls(command: str) -> int:
        return (await app.state.redis.info("commandstats")).get(f"cmdstat_{command}", {}).get("calls", 0)

    before = (await calls("evalsha"), await calls("smembers"))
    losers = await asyncio.gather(*(buy(client, s, sale, key="press-1") for s in shoppers[3:]))
    assert {(r.status_code, code_of(r)) for r in losers} == {(409, "flash_sale.sold_out")}
    assert await calls("evalsha") == before[0]
    assert await calls("smembers") == before[1] + 1  # one read for the whole crowd
    # The set lives as long as the key records: until a day after the sale's end.
    keyed_ttl = await app.state.redis.ttl(Keys(settings.redis_prefix).flash_keyed(sale["id"]))
    assert 3600 + 86_400 - 60 < keyed_ttl <= 3600 + service.IDEMPOTENCY_TTL, keyed_ttl
    # Retries of wins are answered from Redis with their orders: the cancelled one too.
    for shopper, key, first in ((shoppers[1], "press-1", won[1]), (shoppers[0], "press-0", won[0])):
        again = await buy(client, shopper, sale, key=key)
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true", again.text
        assert again.json()["id"] == first.json()["id"]
    assert await calls("evalsha") == before[0] + 2
    # The keyed set lost (say, keyed winners of processes older than the set): reconcile finds it
    # and the rebuild puts the holders back.
    keys = Keys(settings.redis_prefix)
    await app.state.redis.delete(keys.flash_keyed(sale["id"]))
    found = (await reconcile(settings, fix=True)).found
    assert [d.field for d in found] == ["shoppers with a key record"], found
    assert await app.state.redis.smembers(keys.flash_keyed(sale["id"])) == {
        str(s["id"]) for s in shoppers[:3]
    }
    assert (await reconcile(settings)).found == []
    assert await db.fetchval("select count(*) from orders") == 3


async def test_a_keyed_win_of_another_item_is_replayed_while_the_first_is_sold_out(
    client, app, db, settings, admin_headers
):
    """The holders read for one sold-out item are not reused for another's flag: the shopper who
    took the other item's last unit is in the read made for it."""
    _, (sku_a, sku_b) = await make_product(db, skus=[(9900, 10), (9900, 10)])
    items = [{"sku_id": sku, "flash_price": 990, "quota": 1, "per_user_limit": 1} for sku in (sku_a, sku_b)]
    sale = await make_sale(client, admin_headers, db, items=items)
    first, loser, x = await buyers(db, settings, 3, sale["id"])
    assert (await buy(client, first, sale, key="a-1", item=0)).status_code == 201
    r = await buy(client, loser, sale, key="a-2", item=0)  # item A sold out: the holders are read
    assert r.status_code == 409 and code_of(r) == "flash_sale.sold_out"
    won = await buy(client, x, sale, key="x-press", item=1)  # item B's last unit
    assert won.status_code == 201
    again = await buy(client, x, sale, key="x-press", item=1)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true", again.text
    assert again.json()["id"] == won.json()["id"]


async def test_sold_out_is_answered_from_memory_and_returned_units_sell_again(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=1)
    a, b = await buyers(db, settings, 2, sale["id"])
    first = await buy(client, a, sale)
    assert first.status_code == 201
    r = await buy(client, b, sale)
    assert r.status_code == 409 and code_of(r) == "flash_sale.sold_out"
    assert app.state.flash_sold_out  # this process now answers sold-out without Redis

    # The winner cancels: the unit goes back to the quota in PostgreSQL and (after commit) in Redis.
    r = await client.post(f"/api/v1/orders/{first.json()['id']}/cancel", headers=a["headers"])
    assert r.status_code == 200, r.text
    assert await redis_item(app, sale) == await db_item(db, sale) == (1, {})
    assert await db.fetchval("select redis_done from flash_sale_returns") is True
    r = await buy(client, b, sale)
    assert r.status_code == 409 and code_of(r) == "flash_sale.sold_out"  # the flag, for up to a second
    await asyncio.sleep(settings.flash_sold_out_seconds)
    r = await buy(client, b, sale)
    assert r.status_code == 201
    assert await redis_item(app, sale) == await db_item(db, sale) == (0, {b["id"]: 1})


async def test_rate_limits_are_429_with_retry_after(client, app, db, settings, admin_headers):
    sale = await make_sale(
        client, admin_headers, db, quota=100, per_user_limit=100, user_rate_limit=3, ip_rate_limit=1000
    )
    [shopper] = await buyers(db, settings, 1, sale["id"])
    results = [await buy(client, shopper, sale) for _ in range(5)]
    assert [r.status_code for r in results] == [201, 201, 201, 429, 429]
    assert code_of(results[3]) == "rate_limited" and int(results[3].headers["Retry-After"]) >= 1

    ip_sale = await make_sale(client, admin_headers, db, quota=100, user_rate_limit=10, ip_rate_limit=3)
    shoppers = await buyers(db, settings, 5, ip_sale["id"])
    results = [await buy(client, s, ip_sale) for s in shoppers]
    assert [r.status_code for r in results] == [201, 201, 201, 429, 429]
    # Behind a trusted proxy (127.0.0.1 here), X-Forwarded-For names the client: another IP, another bucket.
    s = shoppers[4]
    r = await buy(client, {**s, "headers": {**s["headers"], "X-Forwarded-For": "203.0.113.9"}}, ip_sale)
    assert r.status_code == 201
    # From a peer that is not a trusted proxy the header is not believed: eight "different" clients
    # share the peer's bucket of 3 a second (the burst spans at most one new second: 6 at most pass).
    others = await buyers(db, settings, 8, ip_sale["id"])
    settings_before = app.state.settings
    app.state.settings = msgspec.structs.replace(settings_before, trusted_proxies="10.0.0.0/8")
    try:
        results = [
            await buy(
                client, {**o, "headers": {**o["headers"], "X-Forwarded-For": f"203.0.113.{20 + i}"}}, ip_sale
            )
            for i, o in enumerate(others)
        ]
    finally:
        app.state.settings = settings_before
    assert [r.status_code for r in results].count(429) >= 2, [r.status_code for r in results]


async def test_shopper_list_and_merchant_stats(client, app, db, settings, admin_headers):
    live = await make_sale(client, admin_headers, db, quota=10, per_user_limit=2)
    upcoming = await make_sale(client, admin_headers, db, quota=3, starts={"hours": 1}, ends={"hours": 2})
    draft = await make_sale(client, admin_headers, db, publish=False)
    shoppers = await buyers(db, settings, 2, live["id"])
    await buy(client, shoppers[0], live, qty=2)
    r = await buy(client, shoppers[1], live, qty=1)
    assert r.status_code == 201
    r = await client.get(SHOP)
    assert r.status_code == 200
    listed = {s["id"]: s for s in r.json()["items"]}
    assert draft["id"] not in listed
    assert listed[live["id"]]["phase"] == "live" and listed[live["id"]]["items"][0]["remaining"] == 7
    assert (
        listed[upcoming["id"]]["phase"] == "upcoming" and listed[upcoming["id"]]["items"][0]["remaining"] == 3
    )
    # Served from the process cache: a new sale shows up only after it expires.
    await buy(client, shoppers[1], live, qty=1)
    assert (await client.get(SHOP)).json() == r.json()
    app.state.flash_showcase.expires = 0
    listed = {s["id"]: s for s in (await client.get(SHOP)).json()["items"]}
    assert listed[live["id"]]["items"][0]["remaining"] == 6

    # One order paid: stats count it in paid orders and GMV.
    order_id = await db.fetchval(
        "select order_id from flash_sale_orders where user_id = $1", shoppers[0]["id"]
    )
    payable = await db.fetchval("select payable_amount from orders where id = $1", order_id)
    await db.execute(
        "update orders set status = 'paid', paid_amount = payable_amount, paid_at = now() where id = $1",
        order_id,
    )
    r = await client.get(f"{ADMIN}/{live['id']}/stats", headers=admin_headers)
    assert r.status_code == 200
    stats = r.json()
    assert (stats["sold"], stats["remaining"], stats["orders"], stats["paid_orders"], stats["buyers"]) == (
        4,
        6,
        3,
        1,
        2,
    )
    assert stats["gmv"] == payable
    assert stats["items"][0]["paid_units"] == 2
    r = await client.get(f"{ADMIN}/999999/stats", headers=admin_headers)
    assert r.status_code == 404


async def test_fast_path_and_the_litestar_route_answer_alike(client, app, db, settings, admin_headers):
    """The buy call served from ASGI (default) and by Litestar (SHOP_FLASH_FAST_PATH=false): same
    statuses, codes, detail fields and headers for every kind of request."""
    import msgspec

    async def scenarios(fast: bool) -> list:
        app.state.settings = msgspec.structs.replace(settings, fast_routes=fast)
        sale = await make_sale(client, admin_headers, db, quota=5, per_user_limit=1, user_rate_limit=2)
        shopper, other = await buyers(db, settings, 2, sale["id"])
        path = f"{SHOP}/{sale['id']}/items/{sale['items'][0]['id']}/orders"
        good = {"qty": 1, "address_id": shopper["address_id"], "token": shopper["token"]}
        auth = shopper["headers"]
        requests = [
            ({"json": good}, {}),  # no bearer token
            ({"content": b"{not json", "headers": {**auth, "content-type": "application/json"}}, {}),
            ({"json": {**good, "coupon_id": 1}, "headers": auth}, {}),
            ({"json": {**good, "qty": 0}, "headers": auth}, {}),
            ({"json": {"qty": 1, "token": shopper["token"]}, "headers": auth}, {}),
            ({"json": {**good, "token": other["token"]}, "headers": auth}, {}),
            ({"json": good, "headers": {**auth, "Idempotency-Key": "bad key"}}, {}),
            ({"json": good, "headers": {**auth, "Idempotency-Key": "same"}}, {"order": True}),
            ({"json": good, "headers": {**auth, "Idempotency-Key": "same"}}, {"order": True}),
            ({"json": good, "headers": auth}, {}),  # over the per-shopper limit
            ({"json": good, "headers": auth}, {}),  # the 3rd attempt this second: rate limited
            ({"content": b"{bad", "headers": {"content-type": "application/json"}}, {}),  # no token, bad body
        ]
        seen = []
        for kwargs, expect in requests:
            r = await client.post(path, **kwargs)
            body = r.json()
            seen.append(
                (
                    r.status_code,
                    body["error"]["code"] if "error" in body else body["kind"],
                    [d["field"] for d in body["error"].get("details", [])] if "error" in body else [],
                    "retry-after" in r.headers,
                    r.headers.get("idempotent-replayed"),
                    r.headers["content-type"].startswith("application/json"),
                    bool(r.headers.get("x-request-id")),
                )
            )
            if expect.get("order"):
                assert await db.fetchval("select count(*) from orders where id = $1", body["id"]) == 1
        return seen

    fast, routed = await scenarios(True), await scenarios(False)
    assert fast == routed
    assert [s[0] for s in fast] == [401, 422, 422, 422, 422, 403, 422, 201, 201, 409, 429, 422]
    assert fast[3][2] == ["qty"] and fast[4][2] == ["address_id"]
    assert fast[8][4] == "true" and fast[10][3] is True
    assert all(s[5] and s[6] for s in fast)
    app.state.settings = settings
    sale = await make_sale(client, admin_headers, db, quota=5)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    r = await buy(client, shopper, sale, padding="x" * 5000)
    assert r.status_code == 413 and code_of(r) == "payload_too_large"
