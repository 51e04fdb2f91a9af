"""The flash-sale hot path under real concurrency: the crowd, bursts, dead API processes, timeouts, settlement, Redis loss."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from shop.flash_sale import service
from shop.flash_sale.jobs import restore_flash_returns, settle_flash_sales
from shop.flash_sale.queries import SOLD
from shop.hotpath import encode_payload, new_reservation_id
from shop.hotpath.jobs import persist_all_streams
from shop.keys import Keys
from shop.orders.service import cancel_expired_orders
from shop.reconcile import reconcile
from tests.factories import stock_of
from tests.shop.test_coupons import code_of
from tests.shop.test_flash_sale import ADMIN, buy, buyers, db_item, make_sale, redis_item
from tests.shop.test_hotpath import ctx_of
from tests.shop.test_payments import notify, open_payment, signed
from tests.shop.test_serve import free_port


async def assert_consistent(app, db, sale: dict) -> None:
    """Redis = PostgreSQL for the item, and PostgreSQL's own counts agree with its order rows."""
    assert await redis_item(app, sale) == await db_item(db, sale)
    item_id = sale["items"][0]["id"]
    live_units = await db.fetchval(
        """select coalesce(sum(l.qty), 0) from flash_sale_orders f join order_lines l on l.order_id = f.order_id
           join orders o on o.id = f.order_id where f.item_id = $1 and o.status <> 'cancelled'""",
        item_id,
    )
    assert live_units == await db.fetchval(f"select {SOLD} from flash_sale_items i where id = $1", item_id)


async def test_ten_thousand_shoppers_for_a_hundred_units(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=100, ip_rate_limit=1_000_000)
    crowd = await buyers(db, settings, 10_000, sale["id"])
    gate = asyncio.Semaphore(300)  # a few hundred in flight at once
    statuses: dict[int, int] = {}
    codes: dict[str, int] = {}

    async def attempt(shopper):
        async with gate:
            r = await buy(client, shopper, sale)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code != 201:
            codes[code_of(r)] = codes.get(code_of(r), 0) + 1

    await asyncio.gather(*(attempt(s) for s in crowd))
    assert statuses == {201: 100, 409: 9_900}
    assert codes == {"flash_sale.sold_out": 9_900}
    assert await db.fetchval("select count(*) from orders where kind = 'flash_sale'") == 100
    assert await db.fetchval("select count(distinct user_id) from orders") == 100
    assert await redis_item(app, sale) == await db_item(db, sale)
    assert (await redis_item(app, sale))[0] == 0
    await assert_consistent(app, db, sale)


async def test_one_shoppers_burst_of_thirty_gets_at_most_the_limit(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=50, per_user_limit=2, user_rate_limit=1000)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    results = await asyncio.gather(*(buy(client, shopper, sale) for _ in range(30)))
    assert sorted(r.status_code for r in results) == [201, 201] + [409] * 28
    assert {code_of(r) for r in results if r.status_code == 409} == {"flash_sale.limit_exceeded"}
    assert await db.fetchval("select sum(qty) from flash_sale_orders where user_id = $1", shopper["id"]) == 2
    assert await redis_item(app, sale) == await db_item(db, sale) == (48, {shopper["id"]: 2})


async def reserve_without_persisting(app, sale: dict, shopper: dict, qty: int = 1) -> str:
    """What an API process that died right after the script leaves behind: an entry, no order."""
    keys = Keys(app.state.settings.redis_prefix)
    sale_id, item_id = sale["id"], sale["items"][0]["id"]
    rid = new_reservation_id()
    now = int(time.time() * 1000)
    payload = {"e": sale_id, "i": item_id, "q": qty, "a": shopper["address_id"], "at": now}
    reply = await app.state.scripts.flash_buy(
        keys=keys.flash_buy(sale_id, item_id, shopper["id"], None, "10.0.0.1"),
        args=[now, shopper["id"], qty, rid, encode_payload(payload), "0", 60, f"{item_id}:{qty}", item_id],
    )
    assert reply[0] == "ok"
    return rid


async def test_worker_persists_a_reservation_the_api_died_on_once(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=5, per_user_limit=2)
    shoppers = await buyers(db, settings, 2, sale["id"])
    rid = await reserve_without_persisting(app, sale, shoppers[0], qty=2)
    assert (await buy(client, shoppers[1], sale)).status_code == 201
    assert await db.fetchval("select count(*) from flash_sale_orders where reservation_id = $1", rid) == 0
    ctx = ctx_of(app)
    assert await persist_all_streams(ctx) >= 1
    await persist_all_streams(ctx)
    order_id = await db.fetchval("select order_id from flash_sale_orders where reservation_id = $1", rid)
    order = await db.fetchrow(
        "select user_id, kind, items_amount, address from orders where id = $1", order_id
    )
    assert (order["user_id"], order["kind"], order["items_amount"]) == (shoppers[0]["id"], "flash_sale", 1980)
    assert order["address"]["receiver"] == "张三"
    assert await db.fetchval("select count(*) from orders") == 2
    await assert_consistent(app, db, sale)


def assert_retry_only_when_keyed(keyed_answer, unkeyed_answer, code: str) -> None:
    """503 `code` for both; Retry-After only on the keyed one (an unkeyed retry could buy twice)."""
    for r in (keyed_answer, unkeyed_answer):
        assert (r.status_code, code_of(r)) == (503, code), r.text
    assert keyed_answer.headers["retry-after"] == "1"
    assert "retry-after" not in unkeyed_answer.headers


async def test_a_winner_whose_order_cannot_be_written_is_told_it_is_pending(
    client, app, db, settings, admin_headers
):
    """PostgreSQL unreachable after the script accepted: 503 `flash_sale.order_pending`, not a 500.
    The unit is the shopper's (the reservation is in the stream) and the worker writes the order.
    A keyed request is invited to retry (Retry-After) and gets that order; an unkeyed one is not
    (a retry would be a second purchase)."""
    import asyncpg

    sale = await make_sale(client, admin_headers, db, quota=5, per_user_limit=2)
    keyed, unkeyed = await buyers(db, settings, 2, sale["id"])
    hot_pool = getattr(app.state, "hot_pool", None)
    app.state.hot_pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/gone", min_size=0)
    try:
        first = await buy(client, keyed, sale, key="press-1")
        second = await buy(client, unkeyed, sale)
    finally:
        dead, app.state.hot_pool = app.state.hot_pool, hot_pool
        await dead.close()
    assert_retry_only_when_keyed(first, second, "flash_sale.order_pending")
    assert await db.fetchval("select count(*) from orders") == 0
    await persist_all_streams(ctx_of(app))
    assert await db.fetchval("select count(*) from orders") == 2
    order_id = await db.fetchval("select order_id from flash_sale_orders where user_id = $1", keyed["id"])
    r = await buy(client, keyed, sale, key="press-1")
    assert r.status_code == 201 and r.json()["id"] == order_id, r.text
    assert await redis_item(app, sale) == await db_item(db, sale) == (3, {keyed["id"]: 1, unkeyed["id"]: 1})


async def test_a_purchase_whose_reply_was_lost_is_unconfirmed(
    client, app, db, settings, admin_headers, caplog, monkeypatch
):
    """The purchase scripts ran but their replies were lost (the connection dropped after the
    send): whether they accepted cannot be known, so 503 `flash_sale.unconfirmed`, Retry-After
    only for a keyed request (its retry is answered with the first outcome; an unkeyed retry could
    be a second purchase). Both won: the worker writes their orders."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from shop.hotpath.commit import ScriptPipeliner

    sale = await make_sale(client, admin_headers, db, quota=5)
    keyed, unkeyed = await buyers(db, settings, 2, sale["id"])
    roundtrip = ScriptPipeliner._roundtrip

    async def replies_lost(self, batch):
        await roundtrip(self, batch)
        raise RedisConnectionError("Connection reset by peer")

    monkeypatch.setattr(ScriptPipeliner, "_roundtrip", replies_lost)
    first = await buy(client, keyed, sale, key="press-1")
    second = await buy(client, unkeyed, sale)
    monkeypatch.setattr(ScriptPipeliner, "_roundtrip", roundtrip)
    assert_retry_only_when_keyed(first, second, "flash_sale.unconfirmed")
    logged = [r for r in caplog.records if r.name == "shop.flash_sale" and r.levelname == "WARNING"]
    assert len(logged) == 2 and all(r.exc_info for r in logged)  # the outage is on record
    await persist_all_streams(ctx_of(app))
    assert await db.fetchval("select count(*) from orders") == 2
    r = await buy(client, keyed, sale, key="press-1")  # the keyed retry: its order, not a second one
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true", r.text
    assert await redis_item(app, sale) == await db_item(db, sale) == (3, {keyed["id"]: 1, unkeyed["id"]: 1})


async def test_a_purchase_redis_never_got_is_a_plain_outage(client, app, db, settings, admin_headers):
    """No connection to Redis at all: no script ran, so a retry is a first try, keyed or not: 503
    `service_unavailable` with Retry-After."""
    from shop.hotpath import HotPath
    from shop.redis import create_redis

    sale = await make_sale(client, admin_headers, db, quota=5)
    keyed, unkeyed = await buyers(db, settings, 2, sale["id"])
    kept = getattr(app.state, "hotpath", None)
    dead = create_redis("redis://127.0.0.1:1/0")
    app.state.hotpath = HotPath(app.state.pool, dead, write_pool=getattr(app.state, "hot_pool", None))
    try:
        answers = [await buy(client, keyed, sale, key="press-1"), await buy(client, unkeyed, sale)]
    finally:
        await app.state.hotpath.aclose()
        app.state.hotpath = kept
        await dead.aclose()
    for r in answers:
        assert (r.status_code, code_of(r), r.headers.get("retry-after")) == (503, "service_unavailable", "1")
    r = await buy(client, keyed, sale, key="press-1")  # Redis back: the keyed retry buys once
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers, r.text
    assert await redis_item(app, sale) == await db_item(db, sale) == (4, {keyed["id"]: 1})


async def test_an_address_deleted_before_the_write_falls_back_to_the_default(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=5)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    other = await db.fetchval(
        """insert into addresses (user_id, receiver, phone, province, city, district, detail, is_default)
           values ($1, '李四', '13900139000', '浙江省', '杭州市', '西湖区', '文三路 2 号', false) returning id""",
        shopper["id"],
    )
    rid = await reserve_without_persisting(app, sale, {**shopper, "address_id": other})
    await db.execute("delete from addresses where id = $1", other)
    await persist_all_streams(ctx_of(app))
    address = await db.fetchval(
        "select o.address from orders o join flash_sale_orders f on f.order_id = o.id where f.reservation_id = $1",
        rid,
    )
    assert address["receiver"] == "张三"  # the default one, whole
    assert set(address) == {"receiver", "phone", "province", "city", "district", "detail", "postal_code"}


@pytest.mark.slow
async def test_api_process_killed_between_reservation_and_write(client, app, db, settings, admin_headers):
    """A real `shop serve` pauses after the Lua reservation (fault injection), is killed -9; the worker persists."""
    sale = await make_sale(client, admin_headers, db, quota=3)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    port = free_port()
    env = {
        **os.environ,
        "SHOP_ENV": "test",
        "SHOP_DATABASE_URL": settings.database_url,
        "SHOP_REDIS_URL": settings.redis_url,
        "SHOP_REDIS_PREFIX": settings.redis_prefix,
        "SHOP_LOG_REQUESTS": "false",
        "SHOP_FLASH_FAULT_PAUSE_SECONDS": "120",
        "PROMETHEUS_MULTIPROC_DIR": "",
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - a real server process is the point
        [
            sys.executable,
            "-m",
            "shop.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: kill -9 takes the server and its worker
    )
    base = f"http://127.0.0.1:{port}"
    stream = Keys(settings.redis_prefix).flash_stream(sale["id"])
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as probe:
            deadline = time.monotonic() + 60
            last: object = "no answer"
            while True:
                try:
                    ready = await probe.get("/readyz")
                    if ready.status_code == 200:
                        break
                    last = ready.text
                except httpx.TransportError as exc:
                    last = repr(exc)
                assert time.monotonic() < deadline, f"shop serve did not become ready: {last}"
                await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=base, timeout=30) as remote:
            pending = asyncio.create_task(buy(remote, shopper, sale, key="order-once"))
            deadline = time.monotonic() + 15
            while await app.state.redis.xlen(stream) == 0:
                assert time.monotonic() < deadline, "the reservation never reached Redis"
                await asyncio.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            with pytest.raises(httpx.TransportError):
                await pending
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert await db.fetchval("select count(*) from orders") == 0
    # A real `shop worker` finds the reservation the dead process left and writes its order.
    worker = subprocess.Popen(  # noqa: ASYNC220 - the real worker process is the point
        [sys.executable, "-m", "shop.cli", "worker"],
        env={
            k: v
            for k, v in env.items()
            if k not in ("SHOP_FLASH_FAULT_PAUSE_SECONDS", "PROMETHEUS_MULTIPROC_DIR")
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30  # start-up included; it persists streams every second
        while await db.fetchval("select count(*) from orders") == 0:
            assert time.monotonic() < deadline, "the worker did not persist the reservation"
            assert worker.poll() is None, "shop worker exited"
            await asyncio.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert await db.fetchval("select count(*) from orders") == 1
    # The shopper retries with the same key: the same order, no duplicate.
    r = await buy(client, shopper, sale, key="order-once")
    assert r.status_code == 201 and r.headers["Idempotent-Replayed"] == "true"
    assert r.json()["id"] == await db.fetchval("select id from orders")
    await persist_all_streams(ctx_of(app))
    assert await db.fetchval("select count(*) from orders") == 1
    await assert_consistent(app, db, sale)


async def test_unpaid_timeout_returns_units_once_and_they_sell_again(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=3)
    shoppers = await buyers(db, settings, 6, sale["id"])
    results = await asyncio.gather(*(buy(client, s, sale) for s in shoppers[:4]))
    assert sorted(r.status_code for r in results) == [201, 201, 201, 409]
    await db.execute("update orders set pay_deadline = now() - interval '1 second'")
    # Several workers cancel at once: each order is cancelled (and its unit returned) once.
    counts = await asyncio.gather(*(cancel_expired_orders(app.state.pool) for _ in range(4)))
    assert sum(counts) == 3
    assert await db.fetchval("select count(*) from flash_sale_returns") == 3
    assert await db_item(db, sale) == (3, {})
    # Redis got them back after commit (the callback), or gets them from the worker's job: once either way.
    await restore_flash_returns(ctx_of(app))
    await restore_flash_returns(ctx_of(app))
    assert await redis_item(app, sale) == (3, {})
    app.state.flash_sold_out.clear()  # a second later in production
    again = await asyncio.gather(*(buy(client, s, sale) for s in shoppers[3:]))
    assert [r.status_code for r in again] == [201, 201, 201]
    await assert_consistent(app, db, sale)
    assert await stock_of(db, sale["items"][0]["sku_id"]) == 97


async def test_returns_without_a_bound_process_are_applied_by_the_worker(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=2)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    assert (await buy(client, shopper, sale)).status_code == 201
    await db.execute("update orders set pay_deadline = now() - interval '1 second'")
    service._runtime.clear()  # a worker process whose flash-sale jobs have not run yet
    assert await cancel_expired_orders(app.state.pool) == 1
    assert (await redis_item(app, sale))[0] == 1
    assert (await reconcile(settings)).found == []  # a pending return is expected, not a difference
    await asyncio.sleep(0.25)
    assert await restore_flash_returns(ctx_of(app)) == 1
    assert await redis_item(app, sale) == await db_item(db, sale) == (2, {})
    assert await restore_flash_returns(ctx_of(app)) == 0


async def test_payment_racing_the_timeout_ends_in_exactly_one_outcome(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=40)
    shoppers = await buyers(db, settings, 40, sale["id"])
    orders = [(await buy(client, s, sale)).json() for s in shoppers]
    payments = [await open_payment(client, s["headers"], o) for s, o in zip(shoppers, orders, strict=True)]
    # The first 15 time out before any notification (so both outcomes surely occur: their payment
    # arrives after the cancel); the other 25 expire too, and their notifications race the cancellers.
    await db.execute(
        "update orders set pay_deadline = now() - interval '1 second' where id = any($1::bigint[])",
        [o["id"] for o in orders[:15]],
    )
    assert await cancel_expired_orders(app.state.pool) == 15
    await db.execute(
        "update orders set pay_deadline = now() - interval '1 second' where status = 'pending_payment'"
    )
    notices = [signed(settings, p, transaction_id=f"TX{i}") for i, p in enumerate(payments)]
    results = await asyncio.gather(
        *(notify(client, h, body) for h, body in notices),
        *(cancel_expired_orders(app.state.pool, batch=5) for _ in range(10)),
    )
    assert all(r.status_code == 200 for r in results[:40])
    while await cancel_expired_orders(app.state.pool):
        pass
    await restore_flash_returns(ctx_of(app))
    rows = await db.fetch("select id, status from orders")
    assert {r["status"] for r in rows} <= {"paid", "cancelled"}
    cancelled = {r["id"] for r in rows if r["status"] == "cancelled"}
    assert len(cancelled) >= 15
    # A payment that came after its order's cancel is refunded by the system, and only those; the
    # unit the cancel gave back is not given back a second time.
    refunds = await db.fetch("select order_id, amount, origin from refunds")
    assert {r["order_id"] for r in refunds} == cancelled
    assert [(r["origin"], r["amount"]) for r in refunds] == [("system", orders[0]["payable_amount"])] * len(
        cancelled
    )
    cancelled = len(cancelled)
    # Each cancelled order gave its unit back once; paid ones kept theirs.
    assert await db.fetchval("select coalesce(sum(qty), 0) from flash_sale_returns") == cancelled
    assert await redis_item(app, sale) == await db_item(db, sale)
    assert (await redis_item(app, sale))[0] == cancelled
    await assert_consistent(app, db, sale)


async def test_settlement_returns_unsold_units_to_stock_exactly_once(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=10, stock=50)
    shoppers = await buyers(db, settings, 3, sale["id"])
    for s in shoppers:
        assert (await buy(client, s, sale)).status_code == 201
    sku_id = sale["items"][0]["sku_id"]
    assert await stock_of(db, sku_id) == 40
    sales = "select s.sales, p.sales from skus s join products p on p.id = s.product_id where s.id = $1"
    # One order cancelled before the end: its unit goes back to the event, not to SKU stock.
    r = await client.post(
        f"/api/v1/orders/{(await db.fetchval('select min(order_id) from flash_sale_orders'))}/cancel",
        headers=shoppers[0]["headers"],
    )
    assert r.status_code == 200, r.text
    assert tuple(await db.fetchrow(sales, sku_id)) == (0, 0)  # counted at settlement, not per batch
    ctx = ctx_of(app)
    assert await settle_flash_sales(ctx) == 0  # not over yet
    await db.execute(
        "update flash_sales set starts_at = now() - interval '2 hours', ends_at = now() - interval '1 minute'"
    )
    done = await asyncio.gather(*(settle_flash_sales(ctx) for _ in range(4)))
    assert sum(done) == 1
    assert await stock_of(db, sku_id) == 48
    row = await db.fetchrow("select status, settled_at from flash_sales")
    assert row["status"] == "settled" and row["settled_at"] is not None
    assert await db.fetchval("select returned_to_stock from flash_sale_items") == 8
    assert tuple(await db.fetchrow(sales, sku_id)) == (2, 2)  # the two units still in orders
    r = await buy(client, shoppers[0], sale)
    assert r.status_code == 409 and code_of(r) == "flash_sale.ended"
    # An order that times out after settlement gives its unit to SKU stock, not to the closed event.
    await db.execute("update orders set pay_deadline = now() - interval '1 second'")
    assert await cancel_expired_orders(app.state.pool) == 2
    assert await stock_of(db, sku_id) == 50
    assert tuple(await db.fetchrow(sales, sku_id)) == (0, 0)
    assert await db.fetchval("select count(*) from flash_sale_returns") == 1  # the one before the end
    r = await client.get(f"{ADMIN}/{sale['id']}/stats", headers=admin_headers)
    assert r.json()["status"] == "settled" and r.json()["items"][0]["returned_to_stock"] == 8


async def test_a_settled_event_leaves_the_workers_streams_and_its_keys_expire(
    client, app, db, settings, admin_headers
):
    """The worker reads every registered stream every second: a settled event's must not stay
    registered forever, nor its keys fill a `noeviction` Redis. A live event keeps both."""
    ended = await make_sale(client, admin_headers, db, quota=5)
    live = await make_sale(client, admin_headers, db, quota=5)
    shoppers = await buyers(db, settings, 2, ended["id"])
    assert (await buy(client, shoppers[0], ended, key="press-1")).status_code == 201
    keys, redis = Keys(settings.redis_prefix), app.state.redis

    def keys_of(sale):
        item_id = sale["items"][0]["id"]
        return [
            keys.flash_state(sale["id"]),
            keys.flash_stream(sale["id"]),
            keys.flash_item(sale["id"], item_id),
            keys.flash_bought(sale["id"], item_id),
            keys.flash_keyed(sale["id"]),
        ]

    async def registered():
        return set(await service.registered_streams(redis, keys, service.KIND))

    assert {keys.flash_stream(ended["id"]), keys.flash_stream(live["id"])} <= await registered()
    r = await client.post(f"{ADMIN}/{ended['id']}/stop", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "settled"
    assert keys.flash_stream(ended["id"]) not in await registered()
    ttls = [await redis.ttl(key) for key in keys_of(ended)]
    assert all(0 < ttl <= service.SETTLED_KEYS_TTL_SECONDS for ttl in ttls), ttls
    r = await buy(client, shoppers[1], ended)
    assert r.status_code == 409 and code_of(r) == "flash_sale.ended"
    assert (await client.get(f"{ADMIN}/{ended['id']}", headers=admin_headers)).status_code == 200
    # One settled before events were retired (or while Redis failed): the worker's settle pass
    # retires it; the live event is left alone.
    await service.register_stream(redis, keys, service.KIND, keys.flash_stream(ended["id"]))
    for key in keys_of(ended):
        await redis.persist(key)
    assert await settle_flash_sales(ctx_of(app)) == 0
    assert keys.flash_stream(ended["id"]) not in await registered()
    assert keys.flash_stream(live["id"]) in await registered()
    ttls = [await redis.ttl(key) for key in keys_of(ended)]
    assert all(0 < ttl <= service.SETTLED_KEYS_TTL_SECONDS for ttl in ttls), ttls
    assert [await redis.ttl(key) for key in keys_of(live)[:1] + keys_of(live)[2:3]] == [-1, -1]
    assert (
        await db.fetchval("select count(*) from flash_sale_orders where flash_sale_id = $1", ended["id"]) == 1
    )


async def test_a_return_applied_after_the_retire_leaves_no_key_without_expiry(
    client, app, db, settings, admin_headers
):
    """A return's after-commit Redis step can run after settlement retired the event (the order was
    cancelled just before the end): the item's `returned` hash it creates expires with the rest."""
    sale = await make_sale(client, admin_headers, db, quota=5)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    assert (await buy(client, shopper, sale)).status_code == 201
    r = await client.post(f"{ADMIN}/{sale['id']}/stop", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "settled"
    keys, redis = Keys(settings.redis_prefix), app.state.redis
    item_id = sale["items"][0]["id"]
    returned = keys.flash_returned(sale["id"], item_id)
    assert await redis.exists(returned) == 0
    service.bind_app(app.state)
    assert (
        await service.apply_returns(
            service._runtime["current"], [(987654, sale["id"], item_id, shopper["id"], 1)]
        )
        == 1
    )
    item_ttl = await redis.pttl(keys.flash_item(sale["id"], item_id))
    assert 0 < await redis.pttl(returned) <= item_ttl, (await redis.pttl(returned), item_ttl)
    # A live event's keys have no expiry, and its `returned` hash gets none.
    live = await make_sale(client, admin_headers, db, quota=5)
    live_item = live["items"][0]["id"]
    await service.apply_returns(
        service._runtime["current"], [(987655, live["id"], live_item, shopper["id"], 1)]
    )
    assert await redis.ttl(keys.flash_returned(live["id"], live_item)) == -1


async def test_a_retire_cut_short_is_finished_by_the_settle_pass(
    client, app, db, settings, admin_headers, monkeypatch
):
    """Redis fails after a settled event's keys got their expiry and before its stream left the
    worker's list: the stop still answers (settling is committed), and the event, still listed,
    is retired by the worker's next settle pass."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    sale = await make_sale(client, admin_headers, db, quota=5)
    [shopper] = await buyers(db, settings, 1, sale["id"])
    assert (await buy(client, shopper, sale, key="press-1")).status_code == 201
    keys, redis = Keys(settings.redis_prefix), app.state.redis
    unregister = service.unregister_stream
    failures = []

    async def fail_once(*args):
        if not failures:
            failures.append(1)
            raise RedisConnectionError("Connection reset by peer")
        await unregister(*args)

    monkeypatch.setattr(service, "unregister_stream", fail_once)
    r = await client.post(f"{ADMIN}/{sale['id']}/stop", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "settled", r.text
    stream = keys.flash_stream(sale["id"])
    assert stream in await service.registered_streams(redis, keys, service.KIND)
    assert 0 < await redis.ttl(keys.flash_state(sale["id"])) <= service.SETTLED_KEYS_TTL_SECONDS
    assert await settle_flash_sales(ctx_of(app)) == 0
    assert stream not in await service.registered_streams(redis, keys, service.KIND)


async def test_redis_flushed_mid_sale_is_rebuilt_by_reconcile_with_no_oversell(
    client, app, db, settings, admin_headers
):
    sale = await make_sale(client, admin_headers, db, quota=30, per_user_limit=2)
    shoppers = await buyers(db, settings, 60, sale["id"])
    first = await asyncio.gather(*(buy(client, s, sale) for s in shoppers[:10]))
    assert all(r.status_code == 201 for r in first)
    # Redis loses everything of the event (a restart without persistence).
    keys = [k async for k in app.state.redis.scan_iter(match=f"{settings.redis_prefix}:*", count=1000)]
    await app.state.redis.delete(*keys)
    app.state.flash_sold_out.clear()
    r = await buy(client, shoppers[11], sale)
    assert r.status_code == 503 and code_of(r) == "flash_sale.not_ready"
    report = await reconcile(settings)
    assert report.found and report.remaining == report.found
    report = await reconcile(settings, fix=True)
    assert report.remaining == []
    assert (await reconcile(settings)).found == []
    # The shoppers who bought before the loss still cannot go over their limit.
    again = await buy(client, shoppers[0], sale, qty=2)
    assert again.status_code == 409 and code_of(again) == "flash_sale.limit_exceeded"
    rest = await asyncio.gather(*(buy(client, s, sale) for s in shoppers[11:]))
    assert [r.status_code for r in rest].count(201) == 30 - 10
    assert {code_of(r) for r in rest if r.status_code != 201} == {"flash_sale.sold_out"}
    assert await db.fetchval("select sum(qty) from flash_sale_orders") == 30
    await assert_consistent(app, db, sale)


async def test_reconcile_reports_and_fixes_corrupted_counters(client, app, db, settings, admin_headers):
    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=3)
    shoppers = await buyers(db, settings, 3, sale["id"])
    for s in shoppers:
        assert (await buy(client, s, sale, qty=2)).status_code == 201
    assert (await reconcile(settings)).found == []
    keys = Keys(settings.redis_prefix)
    item_id = sale["items"][0]["id"]
    await app.state.redis.hset(keys.flash_item(sale["id"], item_id), "remaining", 9)
    await app.state.redis.hdel(keys.flash_bought(sale["id"], item_id), str(shoppers[0]["id"]))
    report = await reconcile(settings)
    fields = sorted(d.field for d in report.found)
    assert fields == sorted(
        [f"item {item_id} remaining", f"item {item_id} units of user {shoppers[0]['id']}"]
    )
    remaining = next(d for d in report.found if d.field.endswith("remaining"))
    assert (remaining.expected, remaining.actual) == ("4", "9")
    report = await reconcile(settings, fix=True)
    assert report.remaining == []
    assert (
        await redis_item(app, sale)
        == await db_item(db, sale)
        == (
            4,
            {s["id"]: 2 for s in shoppers},
        )
    )
    r = await buy(client, shoppers[0], sale, qty=2)
    assert r.status_code == 409 and code_of(r) == "flash_sale.limit_exceeded"
    assert json.loads(r.text)["error"]["code"] == "flash_sale.limit_exceeded"


async def test_a_rebuild_counts_an_order_written_during_it_once(
    client, app, db, settings, admin_headers, monkeypatch
):
    """Orders an API process commits after the rebuild persisted the stream's backlog are both in
    its PostgreSQL snapshot and in the stream's tail: counted once."""
    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=3)
    shoppers = await buyers(db, settings, 3, sale["id"])
    for s in shoppers:
        assert (await buy(client, s, sale)).status_code == 201

    async def nothing_persisted_yet(redis, conn, kind, stream):
        return "0-0"  # as if every entry arrived after the backlog was written

    monkeypatch.setattr(service, "persist_backlog", nothing_persisted_yet)
    keys = Keys(settings.redis_prefix)
    await service.rebuild_sale(db, app.state.redis, app.state.scripts, keys, sale["id"])
    assert await redis_item(app, sale) == await db_item(db, sale) == (7, {s["id"]: 1 for s in shoppers})
    # An entry the snapshot does not have (its order not yet written) is still taken on top.
    rid = await reserve_without_persisting(app, sale, shoppers[0])
    await service.rebuild_sale(db, app.state.redis, app.state.scripts, keys, sale["id"])
    assert (await redis_item(app, sale))[0] == 6
    monkeypatch.undo()
    await persist_all_streams(ctx_of(app))
    assert await db.fetchval("select count(*) from flash_sale_orders where reservation_id = $1", rid) == 1
    await assert_consistent(app, db, sale)


async def test_a_return_committed_during_a_rebuild_is_counted_once(
    client, app, db, settings, admin_headers, monkeypatch
):
    """A cancel that commits after the rebuild's snapshot and reaches Redis before the rebuild
    writes the counters: the rebuild applies it again on the counters it wrote, once."""
    from contextlib import asynccontextmanager

    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=3)
    shoppers = await buyers(db, settings, 3, sale["id"])
    orders = [(await buy(client, s, sale)).json()["id"] for s in shoppers]
    real_snapshot = service.snapshot

    @asynccontextmanager
    async def snapshot_then_cancel(conn):
        async with real_snapshot(conn) as c:
            yield c
        r = await client.post(f"/api/v1/orders/{orders[0]}/cancel", headers=shoppers[0]["headers"])
        assert r.status_code == 200, r.text

    monkeypatch.setattr(service, "snapshot", snapshot_then_cancel)
    await service.rebuild_sale(
        db, app.state.redis, app.state.scripts, Keys(settings.redis_prefix), sale["id"]
    )
    monkeypatch.undo()
    assert await redis_item(app, sale) == await db_item(db, sale) == (8, {s["id"]: 1 for s in shoppers[1:]})
    # Applying it again (the worker's retry) changes nothing.
    await restore_flash_returns(ctx_of(app))
    assert await redis_item(app, sale) == (8, {s["id"]: 1 for s in shoppers[1:]})
    assert await db.fetchval("select bool_and(redis_done) from flash_sale_returns")
