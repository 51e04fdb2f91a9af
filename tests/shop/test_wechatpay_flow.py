"""WeChat Pay in the order flow, through the HTTP API against the fake WeChat servers (real crypto)."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from shop.app import create_app
from shop.events import dispatch_order_events
from shop.orders.service import cancel_expired_orders
from shop.payments import shipping_info  # noqa: F401  registers the order.shipped handler
from shop.payments.service import build_providers, close_providers, sync_payment_closes
from shop.payments.wechatpay import WeChatPayConfigError, china_time
from shop.payments.wechatpay_provider import refund_notify_url
from shop.refunds import process_refunds, recheck_failed_refunds
from shop.worker import JobContext
from tests.factories import make_address, make_product
from tests.fakes import wechatpay as fakes
from tests.fakes.wechatpay import NOTIFY_URL, FakeWeChat, wechatpay_settings

fake_wechatpay_server = fakes.fake_wechatpay_server
fake_wechatpay = fakes.fake_wechatpay

OPENID = "o_flow_shopper_openid_0001"
NOTIFY = "/api/v1/payments/wechatpay/notify"
REFUND_NOTIFY = "/api/v1/payments/wechatpay/refund-notify"


@pytest.fixture
def settings(settings, fake_wechatpay):
    """The test settings pointed at the fake: new payments go through WeChat Pay."""
    return wechatpay_settings(settings, fake_wechatpay)


@pytest.fixture
async def app(settings, db):
    application = create_app(settings)
    yield application
    await close_providers(getattr(application.state, "providers", {}))


@pytest.fixture
async def shopper(db, make_user, fake_wechatpay):
    """A shopper who logged in through the mini-program (a WeChat identity for the pay appid)."""
    user_id, headers = await make_user("微信用户")
    await db.execute(
        "insert into user_identities (user_id, provider, appid, openid) values ($1, 'wechat', $2, $3)",
        user_id,
        fake_wechatpay.appid,
        OPENID,
    )
    return user_id, headers, await make_address(db, user_id)


async def new_order(client, headers, address_id, items):
    r = await client.post(
        "/api/v1/orders",
        json={"items": [{"sku_id": sku, "qty": qty} for sku, qty in items], "address_id": address_id},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    return r.json()


async def pay(client, headers, order):
    r = await client.post(f"/api/v1/orders/{order['id']}/pay", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def order_of(client, headers, order):
    return (await client.get(f"/api/v1/orders/{order['id']}", headers=headers)).json()


def ctx_of(app) -> JobContext:
    state = app.state
    return JobContext(
        state.settings, state.pool, state.redis, state.scripts, state.redis_keys, state.providers
    )


async def paid_order(client, fake: FakeWeChat, shopper, items):
    """An order paid through WeChat Pay: /pay, the shopper pays, WeChat's notification arrives."""
    _, headers, address_id = shopper
    order = await new_order(client, headers, address_id, items)
    payment = await pay(client, headers, order)
    h, body = fake.make_notification("TRANSACTION.SUCCESS", fake.mark_paid(payment["out_trade_no"]))
    r = await client.post(NOTIFY, content=body, headers=h)
    assert r.status_code == 204, r.text
    return order, payment


# --- paying -----------------------------------------------------------------------------------


async def test_pay_returns_signed_request_payment_fields(client, db, fake_wechatpay, shopper, make_user):
    _, headers, address_id = shopper
    _, (sku,) = await make_product(db, title="夏季T恤 白色 L", skus=[(2990, 5)])
    order = await new_order(client, headers, address_id, [(sku, 2)])
    out = await pay(client, headers, order)
    assert out["provider"] == "wechatpay" and out["amount"] == order["payable_amount"]
    params = out["params"]
    assert set(params) == {"timeStamp", "nonceStr", "package", "signType", "paySign"}
    assert params["signType"] == "RSA"
    message = f"{fake_wechatpay.appid}\n{params['timeStamp']}\n{params['nonceStr']}\n{params['package']}\n"
    fake_wechatpay.keys.merchant_key.public_key().verify(
        base64.b64decode(params["paySign"]), message.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    recorded = fake_wechatpay.orders[out["out_trade_no"]]
    assert recorded["openid"] == OPENID
    assert recorded["amount_total"] == order["payable_amount"]
    assert recorded["time_expire"] == china_time(datetime.fromisoformat(order["pay_deadline"]))
    assert recorded["description"] == "夏季T恤 白色 L"
    assert recorded["notify_url"] == NOTIFY_URL
    assert params["package"] == f"prepay_id={recorded['prepay_id']}"
    assert await db.fetchval("select prepay_id from payments") == recorded["prepay_id"]
    # A shopper without a mini-program identity cannot pay with WeChat Pay.
    stranger_id, stranger = await make_user("网页用户")
    other = await new_order(client, stranger, await make_address(db, stranger_id), [(sku, 1)])
    r = await client.post(f"/api/v1/orders/{other['id']}/pay", headers=stranger)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "payment.no_openid")
    assert len(fake_wechatpay.orders) == 1


async def test_prepay_refused_by_wechat_is_502_and_closes_the_attempt(client, db, fake_wechatpay, shopper):
    _, headers, address_id = shopper
    _, (sku,) = await make_product(db, skus=[(1000, 5)])
    order = await new_order(client, headers, address_id, [(sku, 1)])
    fake_wechatpay.corrupt_signatures = 1  # WeChat's answer does not verify: never trust its prepay_id
    r = await client.post(f"/api/v1/orders/{order['id']}/pay", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (502, "payment.provider_error")
    row = await db.fetchrow("select status, close_synced from payments")
    assert (row["status"], row["close_synced"]) == ("closed", True)
    assert (await pay(client, headers, order))["params"]["paySign"]


async def test_notification_replayed_ten_times_pays_once(client, db, fake_wechatpay, shopper):
    _, headers, address_id = shopper
    _, (sku,) = await make_product(db, skus=[(2500, 5)])
    order = await new_order(client, headers, address_id, [(sku, 1)])
    payment = await pay(client, headers, order)
    resource = fake_wechatpay.mark_paid(payment["out_trade_no"])
    h, body = fake_wechatpay.make_notification("TRANSACTION.SUCCESS", resource)
    first = await client.post(NOTIFY, content=body, headers=h)
    assert (first.status_code, first.content) == (204, b"")
    rest = await asyncio.gather(*(client.post(NOTIFY, content=body, headers=h) for _ in range(6)))
    rest += [await client.post(NOTIFY, content=body, headers=h) for _ in range(3)]
    assert [r.status_code for r in rest] == [204] * 9
    current = await order_of(client, headers, order)
    assert current["status"] == "paid" and current["paid_amount"] == payment["amount"]
    assert current["payment_provider"] == "wechatpay"
    assert await db.fetchval("select count(*) from order_events where type = 'order.paid'") == 1
    row = await db.fetchrow("select status, transaction_id from payments")
    assert (row["status"], row["transaction_id"]) == ("paid", resource["transaction_id"])
    assert await db.fetchval("select count(*) from refunds") == 0


async def test_untrusted_notifications_are_refused_and_change_nothing(client, db, fake_wechatpay, shopper):
    _, headers, address_id = shopper
    _, (sku,) = await make_product(db, skus=[(2500, 5)])
    order = await new_order(client, headers, address_id, [(sku, 1)])
    payment = await pay(client, headers, order)
    fake = fake_wechatpay
    resource = fake.mark_paid(payment["out_trade_no"])
    note = fake.make_notification
    genuine_h, genuine_body = note("TRANSACTION.SUCCESS", resource)
    cheaper = {**resource, "amount": {**resource["amount"], "total": payment["amount"] - 1}}
    cases = [
        (note("TRANSACTION.SUCCESS", resource, tamper=True), "bad_signature"),
        (({}, genuine_body), "missing_headers"),
        (note("TRANSACTION.SUCCESS", resource, stale=True), "stale"),
        (note("TRANSACTION.SUCCESS", resource, serial="PUB_KEY_ID_0000UNKNOWN"), "unknown_serial"),
        (note("TRANSACTION.SUCCESS", resource, signtest=True), "bad_signature"),
        (note("TRANSACTION.SUCCESS", resource, sign_key=fake.keys.other_key), "bad_signature"),
        (note("TRANSACTION.SUCCESS", resource, apiv3_key="0" * 32), "decrypt_failed"),
        (note("TRANSACTION.SUCCESS", cheaper), "amount_mismatch"),
        (note("TRANSACTION.SUCCESS", {**resource, "mchid": "1900000999"}), "mchid_mismatch"),
        (note("TRANSACTION.SUCCESS", {**resource, "appid": "wxsomeoneelse0001"}), "appid_mismatch"),
        (note("TRANSACTION.SUCCESS", {**resource, "trade_state": "NOTPAY"}), "not_paid"),
        (note("REFUND.SUCCESS", resource), "unexpected_event"),
        (note("TRANSACTION.SUCCESS", {**resource, "out_trade_no": "P000000000000"}), "unknown_payment"),
    ]
    for (case_headers, case_body), reason in cases:
        r = await client.post(NOTIFY, content=case_body, headers=case_headers)
        assert (r.status_code, r.json()) == (400, {"code": "FAIL", "message": reason}), reason
    assert (await order_of(client, headers, order))["status"] == "pending_payment"
    assert await db.fetchval("select count(*) from payments where status = 'paid'") == 0
    assert await db.fetchval("select count(*) from order_events where type = 'order.paid'") == 0
    # Then WeChat's genuine notification goes through.
    assert (await client.post(NOTIFY, content=genuine_body, headers=genuine_h)).status_code == 204
    assert (await order_of(client, headers, order))["status"] == "paid"


# --- timeouts -----------------------------------------------------------------------------------


async def test_timed_out_payment_is_closed_and_a_late_payment_refunded(
    client, app, db, fake_wechatpay, shopper
):
    _, headers, address_id = shopper
    _, (sku,) = await make_product(db, skus=[(1500, 5)])
    late = await new_order(client, headers, address_id, [(sku, 1)])
    late_payment = await pay(client, headers, late)
    # The shopper of this one paid just before the deadline; WeChat's notification is delayed.
    raced = await new_order(client, headers, address_id, [(sku, 1)])
    raced_payment = await pay(client, headers, raced)
    raced_resource = fake_wechatpay.mark_paid(raced_payment["out_trade_no"])
    await db.execute("update orders set pay_deadline = now() - interval '1 second'")
    pool, providers, settings = app.state.pool, app.state.providers, app.state.settings
    assert await cancel_expired_orders(pool) == 2
    # The unpaid one closes at WeChat; closing the paid one finds it paid and settles it from
    # WeChat's record at once (refund), without waiting for the delayed notification.
    assert await sync_payment_closes(pool, settings, providers) == 2
    assert fake_wechatpay.orders[late_payment["out_trade_no"]]["trade_state"] == "CLOSED"
    rows = {
        r["out_trade_no"]: (r["status"], r["close_synced"]) for r in await db.fetch("select * from payments")
    }
    assert rows == {
        late_payment["out_trade_no"]: ("closed", True),
        raced_payment["out_trade_no"]: ("paid", True),
    }
    assert await db.fetchval("select count(*) from refunds where origin = 'system'") == 1
    assert await sync_payment_closes(pool, settings, providers) == 0

    fake_wechatpay.refund_status = "SUCCESS"
    amount = late_payment["amount"]
    for resource in (
        raced_resource,
        # A payment WeChat reports after we closed it (its close raced the shopper's confirmation).
        fake_wechatpay.mark_paid(late_payment["out_trade_no"]),
    ):
        h, body = fake_wechatpay.make_notification("TRANSACTION.SUCCESS", resource)
        assert (await client.post(NOTIFY, content=body, headers=h)).status_code == 204
        assert (await client.post(NOTIFY, content=body, headers=h)).status_code == 204  # replay
    for order in (late, raced):
        current = await order_of(client, headers, order)
        assert current["status"] == "cancelled" and current["paid_amount"] == 0
    refunds = await db.fetch("select origin, amount, status from refunds order by id")
    assert [(r["origin"], r["amount"], r["status"]) for r in refunds] == [("system", amount, "approved")] * 2
    assert await sync_payment_closes(pool, settings, providers) == 0  # nothing left to close
    assert await process_refunds(pool, providers) == 2
    assert fake_wechatpay.refunded_total == 2 * amount
    assert await db.fetchval("select count(*) from refunds where status = 'succeeded'") == 2
    assert await process_refunds(pool, providers) == 0
    assert fake_wechatpay.refunded_total == 2 * amount


# --- refunds ------------------------------------------------------------------------------------


async def test_refund_retried_after_failures_and_finished_by_notification(
    client, app, db, fake_wechatpay, shopper
):
    _, headers, _ = shopper
    _, (sku,) = await make_product(db, skus=[(4000, 5)])
    order, payment = await paid_order(client, fake_wechatpay, shopper, [(sku, 1)])
    r = await client.post(
        f"/api/v1/orders/{order['id']}/refunds", json={"reason": "不想要了"}, headers=headers
    )
    assert r.status_code == 201 and r.json()["status"] == "approved"
    refund = r.json()
    assert refund["amount"] == payment["amount"]
    pool, providers = app.state.pool, app.state.providers
    fake_wechatpay.refund_failures = 2

    async def due_now():
        await db.execute("update refunds set next_attempt_at = now()")

    for attempt in (1, 2):
        assert await process_refunds(pool, providers) == 0
        row = await db.fetchrow(
            "select status, attempts, last_error, next_attempt_at > now() + interval '5 seconds' as later from refunds"
        )
        assert (row["status"], row["attempts"], row["later"]) == ("approved", attempt, True)
        assert "SYSTEM_ERROR" in row["last_error"]
        assert await process_refunds(pool, providers) == 0  # backing off: WeChat is not asked
        assert fake_wechatpay.refund_attempts == attempt
        await due_now()
    assert await process_refunds(pool, providers) == 0  # accepted, PROCESSING at WeChat
    row = await db.fetchrow("select status, attempts, provider_refund_id from refunds")
    sent = fake_wechatpay.refunds[refund["refund_no"]]
    assert (row["status"], row["attempts"], row["provider_refund_id"]) == ("processing", 3, sent["refund_id"])
    assert sent["notify_url"] == "https://shop.test/api/v1/payments/wechatpay/refund-notify"
    assert (sent["refund"], sent["total"]) == (payment["amount"], payment["amount"])
    await due_now()
    assert await process_refunds(pool, providers) == 0  # asking again refunds nothing twice
    assert fake_wechatpay.refunded_total == payment["amount"]
    assert (await order_of(client, headers, order))["status"] == "refunding"

    resource = fake_wechatpay.complete_refund(refund["refund_no"])
    r = await client.post(
        REFUND_NOTIFY, content=b"{}", headers=fake_wechatpay.make_notification("REFUND.SUCCESS", resource)[0]
    )
    assert (r.status_code, r.json()["code"]) == (400, "FAIL")
    h, body = fake_wechatpay.make_notification("REFUND.SUCCESS", resource)
    results = await asyncio.gather(*(client.post(REFUND_NOTIFY, content=body, headers=h) for _ in range(3)))
    assert [r.status_code for r in results] == [204] * 3
    final = await order_of(client, headers, order)
    assert final["status"] == "refunded" and final["refunded_amount"] == payment["amount"]
    assert await db.fetchval("select status from refunds") == "succeeded"
    assert await db.fetchval("select count(*) from order_events where type = 'order.refunded'") == 1
    assert fake_wechatpay.refunded_total == payment["amount"]
    detail = (await client.get(f"/api/v1/orders/{order['id']}/refunds", headers=headers)).json()[0]
    assert detail["received_account"] == "支付用户零钱"  # where WeChat's notice says the money went
    # A refund WeChat never heard of from us is refused.
    unknown = {**resource, "out_refund_no": "R0000000000000"}
    h, body = fake_wechatpay.make_notification("REFUND.SUCCESS", unknown)
    r = await client.post(REFUND_NOTIFY, content=body, headers=h)
    assert (r.status_code, r.json()) == (400, {"code": "FAIL", "message": "unknown_refund"})


async def notify_refund(client, fake: FakeWeChat, refund_no: str, status: str):
    resource = fake.complete_refund(refund_no, status)
    h, body = fake.make_notification(f"REFUND.{status}", resource)
    return await client.post(REFUND_NOTIFY, content=body, headers=h)


async def refunded_order(client, db, fake, shopper, amount_fen: int):
    """A paid order whose whole refund the shopper asked for (approved at once: nothing shipped)."""
    _, headers, _ = shopper
    _, (sku,) = await make_product(db, skus=[(amount_fen, 5)])
    order, payment = await paid_order(client, fake, shopper, [(sku, 1)])
    r = await client.post(
        f"/api/v1/orders/{order['id']}/refunds", json={"reason": "不想要了"}, headers=headers
    )
    assert r.status_code == 201 and r.json()["status"] == "approved", r.text
    return order, payment, r.json()


async def test_a_closed_refund_stops_being_sent_until_an_operator_retries_it_under_a_new_number(
    client, app, db, fake_wechatpay, shopper, admin_headers
):
    _, headers, _ = shopper
    order, payment, refund = await refunded_order(client, db, fake_wechatpay, shopper, 4200)
    pool, providers = app.state.pool, app.state.providers
    fake_wechatpay.refund_status = "CLOSED"
    assert await process_refunds(pool, providers) == 0
    row = await db.fetchrow("select status, provider_status, next_attempt_at, last_error from refunds")
    assert (row["status"], row["provider_status"], row["next_attempt_at"]) == ("failed", "CLOSED", None)
    assert "CLOSED" in row["last_error"]
    # WeChat is not asked again and again under a number that can only answer CLOSED.
    assert await process_refunds(pool, providers) == 0
    assert fake_wechatpay.refund_attempts == 1
    assert (await order_of(client, headers, order))["status"] == "refunding"
    listed = (await client.get("/api/v1/admin/refunds?status=failed", headers=admin_headers)).json()
    assert [(r["id"], r["provider_status"]) for r in listed["items"]] == [(refund["id"], "CLOSED")]

    # Operators pressing retry at once: one new number.
    results = await asyncio.gather(
        *(client.post(f"/api/v1/admin/refunds/{refund['id']}/retry", headers=admin_headers) for _ in range(8))
    )
    assert sorted(r.status_code for r in results) == [200] + [409] * 7
    retried = next(r.json() for r in results if r.status_code == 200)
    assert {r.json()["error"]["code"] for r in results if r.status_code == 409} == {
        "refund.illegal_transition"
    }
    assert retried["status"] == "approved" and retried["refund_no"] != refund["refund_no"]
    assert retried["provider_status"] is None and retried["last_error"] is None
    assert await db.fetchval("select count(*) from superseded_refund_nos") == 1
    actions = (
        await client.get(f"/api/v1/admin/refunds/{refund['id']}/actions", headers=admin_headers)
    ).json()
    assert [(a["action"], a["admin_username"], a["refund_no"]) for a in actions] == [
        ("retry", "boss", refund["refund_no"])  # the number it replaced
    ]

    fake_wechatpay.refund_status = "SUCCESS"
    assert await process_refunds(pool, providers) == 1
    final = await order_of(client, headers, order)
    assert final["status"] == "refunded" and final["refunded_amount"] == payment["amount"]
    assert fake_wechatpay.refunded_total == payment["amount"]  # paid back once
    # A late notification for the replaced number is acknowledged (not refused, which WeChat
    # would repeat) and changes nothing.
    r = await notify_refund(client, fake_wechatpay, refund["refund_no"], "CLOSED")
    assert r.status_code == 204
    assert await db.fetchval("select status from refunds") == "succeeded"
    assert await db.fetchval("select count(*) from order_events where type = 'order.refunded'") == 1
    r = await client.post(f"/api/v1/admin/refunds/{refund['id']}/retry", headers=admin_headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.illegal_transition")


async def test_an_abnormal_refund_is_settled_once_by_an_operator_or_by_wechat(
    client, app, db, fake_wechatpay, shopper, admin_headers
):
    _, headers, _ = shopper
    pool, providers = app.state.pool, app.state.providers
    # A: accepted (PROCESSING), then WeChat's notification says ABNORMAL.
    order_a, payment_a, refund_a = await refunded_order(client, db, fake_wechatpay, shopper, 3100)
    assert await process_refunds(pool, providers) == 0
    r = await notify_refund(client, fake_wechatpay, refund_a["refund_no"], "ABNORMAL")
    assert r.status_code == 204
    row = await db.fetchrow("select status, provider_status from refunds where id = $1", refund_a["id"])
    assert (row["status"], row["provider_status"]) == ("failed", "ABNORMAL")
    mine = (await client.get(f"/api/v1/orders/{order_a['id']}/refunds", headers=headers)).json()
    assert [x["status"] for x in mine] == ["failed"]
    # The money waits at WeChat Pay: a new number would pay it twice.
    r = await client.post(f"/api/v1/admin/refunds/{refund_a['id']}/retry", headers=admin_headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.not_retryable")
    r = await client.post(
        f"/api/v1/admin/refunds/{refund_a['id']}/settle", json={"note": ""}, headers=admin_headers
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_failed")
    r = await client.post("/api/v1/admin/refunds/999999/settle", json={"note": "x"}, headers=admin_headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "refund.not_found")
    r = await client.post("/api/v1/admin/refunds/999999/retry", headers=admin_headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "refund.not_found")
    for action, body in (("retry", None), ("settle", {"note": "x"})):
        for h in ({}, headers):  # no token; a shopper's token
            r = await client.post(f"/api/v1/admin/refunds/{refund_a['id']}/{action}", json=body, headers=h)
            assert r.status_code == 401, (action, r.text)
    # The operator records the settlement while WeChat reports its success: it ends once.
    note = "异常退款：商户平台退至用户银行卡"
    h, body = fake_wechatpay.make_notification(
        "REFUND.SUCCESS", fake_wechatpay.complete_refund(refund_a["refund_no"])
    )
    results = await asyncio.gather(
        *(
            client.post(
                f"/api/v1/admin/refunds/{refund_a['id']}/settle", json={"note": note}, headers=admin_headers
            )
            for _ in range(4)
        ),
        *(client.post(REFUND_NOTIFY, content=body, headers=h) for _ in range(4)),
    )
    settles, notifies = results[:4], results[4:]
    assert [r.status_code for r in notifies] == [204] * 4
    assert all(r.status_code in (200, 409) for r in settles)
    assert sum(r.status_code == 200 for r in settles) <= 1
    assert await db.fetchval(
        "select count(*) from refund_actions where refund_id = $1", refund_a["id"]
    ) == sum(r.status_code == 200 for r in settles)  # only the settlement that took effect is recorded
    row = await db.fetchrow("select status, settled_note from refunds where id = $1", refund_a["id"])
    assert row["status"] == "succeeded"
    assert row["settled_note"] == (note if any(r.status_code == 200 for r in settles) else None)
    final = await order_of(client, headers, order_a)
    assert final["status"] == "refunded" and final["refunded_amount"] == payment_a["amount"]
    assert (
        await db.fetchval(
            "select count(*) from order_events where type = 'order.refunded' and order_id = $1", order_a["id"]
        )
        == 1
    )

    # B: WeChat answers ABNORMAL at once; nobody at WeChat resolves it, the operator settles it.
    order_b, payment_b, refund_b = await refunded_order(client, db, fake_wechatpay, shopper, 2700)
    fake_wechatpay.refund_status = "ABNORMAL"
    assert await process_refunds(pool, providers) == 0
    assert await db.fetchval("select status from refunds where id = $1", refund_b["id"]) == "failed"
    r = await client.post(
        f"/api/v1/admin/refunds/{refund_b['id']}/settle", json={"note": note}, headers=admin_headers
    )
    assert r.status_code == 200, r.text
    settled = r.json()
    assert (settled["status"], settled["settled_note"], settled["provider_status"]) == (
        "succeeded",
        note,
        "ABNORMAL",
    )
    assert settled["succeeded_at"] is not None
    final = await order_of(client, headers, order_b)
    assert final["status"] == "refunded" and final["refunded_amount"] == payment_b["amount"]
    r = await client.post(
        f"/api/v1/admin/refunds/{refund_b['id']}/settle", json={"note": note}, headers=admin_headers
    )
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.illegal_transition")
    actions = (
        await client.get(f"/api/v1/admin/refunds/{refund_b['id']}/actions", headers=admin_headers)
    ).json()
    assert [(a["action"], a["admin_username"], a["note"]) for a in actions] == [("settle", "boss", note)]


async def test_an_abnormal_refund_the_merchant_settles_at_wechat_is_found_without_its_notification(
    client, app, db, fake_wechatpay, shopper
):
    _, headers, _ = shopper
    order, payment, refund = await refunded_order(client, db, fake_wechatpay, shopper, 3900)
    pool, providers = app.state.pool, app.state.providers
    fake_wechatpay.refund_status = "ABNORMAL"
    assert await process_refunds(pool, providers) == 0
    row = await db.fetchrow(
        "select status, next_attempt_at > now() + interval '25 minutes' as later from refunds"
    )
    assert (row["status"], row["later"]) == ("failed", True)  # asked about again, not hammered
    assert await recheck_failed_refunds(pool, providers) == 0  # not due yet
    await db.execute("update refunds set next_attempt_at = now()")
    assert await recheck_failed_refunds(pool, providers) == 0  # still ABNORMAL at WeChat
    assert await db.fetchval("select status from refunds") == "failed"
    # The merchant handles it at WeChat Pay's platform; the REFUND.SUCCESS notification is lost.
    fake_wechatpay.complete_refund(refund["refund_no"], "SUCCESS")
    await db.execute("update refunds set next_attempt_at = now()")
    assert await recheck_failed_refunds(pool, providers) == 1
    assert await db.fetchval("select received_account from refunds") == "支付用户零钱"  # from the query
    final = await order_of(client, headers, order)
    assert final["status"] == "refunded" and final["refunded_amount"] == payment["amount"]
    assert await db.fetchval("select status from refunds") == "succeeded"
    assert fake_wechatpay.refunded_total == payment["amount"]
    await db.execute("update refunds set next_attempt_at = now()")
    assert await recheck_failed_refunds(pool, providers) == 0  # over: not asked again
    # A CLOSED refund is never re-asked: only an operator moves it.
    _, _, refund_b = await refunded_order(client, db, fake_wechatpay, shopper, 2100)
    fake_wechatpay.refund_status = "CLOSED"
    assert await process_refunds(pool, providers) == 0
    assert await db.fetchval("select next_attempt_at from refunds where id = $1", refund_b["id"]) is None


async def test_an_answer_about_a_replaced_refund_number_changes_nothing(
    client, app, db, fake_wechatpay, shopper, admin_headers
):
    order, payment, refund = await refunded_order(client, db, fake_wechatpay, shopper, 5100)
    pool, providers = app.state.pool, app.state.providers
    assert await process_refunds(pool, providers) == 0  # PROCESSING at WeChat
    await db.execute("update refunds set next_attempt_at = now()")  # due to be asked again
    wechatpay = providers["wechatpay"]

    class SlowWorker:
        """The worker asks about the refund while it fails at WeChat and an operator retries it."""

        name = wechatpay.name

        async def refund(self, **kwargs):
            r = await notify_refund(client, fake_wechatpay, refund["refund_no"], "CLOSED")
            assert r.status_code == 204
            r = await client.post(f"/api/v1/admin/refunds/{refund['id']}/retry", headers=admin_headers)
            assert r.status_code == 200, r.text
            return await wechatpay.refund(**kwargs)  # WeChat's answer for the old number: CLOSED

    assert await process_refunds(pool, {"wechatpay": SlowWorker()}) == 0
    row = await db.fetchrow("select refund_no, status, provider_status, next_attempt_at from refunds")
    assert row["refund_no"] != refund["refund_no"]
    assert (row["status"], row["provider_status"]) == ("approved", None)  # not failed by the stale answer
    fake_wechatpay.refund_status = "SUCCESS"
    await db.execute("update refunds set next_attempt_at = now()")
    assert await process_refunds(pool, providers) == 1
    _, headers, _ = shopper
    assert (await order_of(client, headers, order))["status"] == "refunded"
    assert fake_wechatpay.refunded_total == payment["amount"]


async def test_two_failed_refunds_of_one_order_settled_at_once_leave_it_refunded(
    client, app, db, fake_wechatpay, shopper, admin_headers
):
    _, headers, _ = shopper
    _, (sku_a, sku_b) = await make_product(db, skus=[(1800, 5), (2300, 5)])
    order, payment = await paid_order(client, fake_wechatpay, shopper, [(sku_a, 1), (sku_b, 1)])
    lines = (await order_of(client, headers, order))["lines"]
    refunds = []
    for line in lines:
        r = await client.post(
            f"/api/v1/orders/{order['id']}/refunds",
            json={"reason": "坏了", "lines": [{"line_id": line["id"], "qty": 1}]},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        refunds.append(r.json())
    pool, providers = app.state.pool, app.state.providers
    assert await process_refunds(pool, providers) == 0  # both PROCESSING
    for refund, status in zip(refunds, ("CLOSED", "ABNORMAL"), strict=True):
        assert (await notify_refund(client, fake_wechatpay, refund["refund_no"], status)).status_code == 204
    assert (await order_of(client, headers, order))["status"] == "refunding"  # waits for the operator
    results = await asyncio.gather(
        *(
            client.post(
                f"/api/v1/admin/refunds/{refund['id']}/settle", json={"note": "转账"}, headers=admin_headers
            )
            for refund in refunds
        )
    )
    assert [r.status_code for r in results] == [200, 200]
    final = await order_of(client, headers, order)
    assert final["status"] == "refunded"
    assert final["refunded_amount"] == sum(refund["amount"] for refund in refunds) == payment["amount"]
    mine = (await client.get(f"/api/v1/orders/{order['id']}/refunds", headers=headers)).json()
    assert [(x["status"], x["settled_note"]) for x in mine] == [
        ("succeeded", None)
    ] * 2  # the note is internal
    detail = (await client.get(f"/api/v1/admin/refunds/{refunds[0]['id']}", headers=admin_headers)).json()
    assert detail["settled_note"] == "转账"


# --- shipping -----------------------------------------------------------------------------------


async def test_shipping_is_uploaded_to_wechat_once(client, app, db, fake_wechatpay, shopper, admin_headers):
    _, (sku,) = await make_product(db, title="无线蓝牙耳机", skus=[(9900, 5)])
    order, _ = await paid_order(client, fake_wechatpay, shopper, [(sku, 2)])
    ship = {"packages": [{"carrier": "顺丰速运", "tracking_no": "SF1234567890"}]}
    r = await client.post(f"/api/v1/admin/orders/{order['id']}/ship", json=ship, headers=admin_headers)
    assert r.status_code == 200, r.text
    ctx = ctx_of(app)
    await dispatch_order_events(app.state.pool, ctx)
    transaction_id = await db.fetchval("select transaction_id from payments where status = 'paid'")
    [upload] = fake_wechatpay.shipping_uploads
    assert upload["order_key"] == {"order_number_type": 2, "transaction_id": transaction_id}
    assert upload["payer"] == {"openid": OPENID}
    assert (upload["logistics_type"], upload["delivery_mode"]) == (1, 1)
    assert upload["shipping_list"] == [
        {"express_company": "SF", "tracking_no": "SF1234567890", "item_desc": "无线蓝牙耳机 ×2"}
    ]
    assert await db.fetchval("select count(*) from order_events where dispatched_at is null") == 0
    await db.execute("update order_events set dispatched_at = null")  # a crashed dispatcher's retry
    await dispatch_order_events(app.state.pool, ctx)
    assert len(fake_wechatpay.shipping_uploads) == 1


async def test_failed_upload_is_retried_and_sandbox_orders_are_skipped(
    client, app, db, fake_wechatpay, shopper, admin_headers
):
    _, headers, address_id = shopper
    _, (a, b) = await make_product(db, title="长" * 120, skus=[(1000, 5), (2000, 5)])
    order, _ = await paid_order(client, fake_wechatpay, shopper, [(a, 2), (b, 1)])
    lines = {ln["sku_id"]: ln["id"] for ln in order["lines"]}
    ship = {
        "packages": [
            {"carrier": "中通快递", "tracking_no": "ZTO100", "line_ids": [lines[a]]},
            {"carrier": "某某物流", "tracking_no": "XX200", "line_ids": [lines[b]]},
        ]
    }
    # WeChat does not know this transaction (yet): the upload fails and the event waits for a retry.
    await db.execute("update payments set transaction_id = '4200UNKNOWN' where status = 'paid'")
    sandbox_order = await new_order(client, headers, address_id, [(a, 1)])
    r = await client.post(f"/api/v1/payments/sandbox/{sandbox_order['order_no']}/simulate", headers=headers)
    assert r.json()["order_status"] == "paid"
    for target, body in (
        (order, ship),
        (sandbox_order, {"packages": [{"carrier": "顺丰速运", "tracking_no": "SF300"}]}),
    ):
        r = await client.post(f"/api/v1/admin/orders/{target['id']}/ship", json=body, headers=admin_headers)
        assert r.status_code == 200, r.text
    ctx = ctx_of(app)
    await dispatch_order_events(app.state.pool, ctx)
    assert fake_wechatpay.shipping_uploads == []
    failed = await db.fetch(
        "select order_id, attempts, last_error from order_events where dispatched_at is null"
    )
    assert [(f["order_id"], f["attempts"]) for f in failed] == [(order["id"], 1)]
    assert "wechat.upload_shipping_info: MiniProgramError: 10060001" in failed[0]["last_error"]
    delivered = "select count(*) from order_event_deliveries where handler = 'wechat.upload_shipping_info'"
    assert await db.fetchval(delivered) == 1  # the sandbox order's no-op

    real = fake_wechatpay.orders[
        await db.fetchval(
            "select out_trade_no from payments where status = 'paid' and provider = 'wechatpay'"
        )
    ]
    await db.execute(
        "update payments set transaction_id = $1 where status = 'paid' and provider = 'wechatpay'",
        real["transaction_id"],
    )
    await dispatch_order_events(app.state.pool, ctx)  # not due yet: backoff
    assert fake_wechatpay.shipping_uploads == []
    await db.execute("update order_events set next_attempt_at = now()")
    fake_wechatpay.revoke_access_token()  # a stale cached token is refreshed on the way
    await dispatch_order_events(app.state.pool, ctx)
    [upload] = fake_wechatpay.shipping_uploads
    assert upload["order_key"]["transaction_id"] == real["transaction_id"]
    assert (upload["delivery_mode"], upload["is_all_delivered"]) == (2, True)
    first, second = upload["shipping_list"]
    assert (first["express_company"], first["tracking_no"]) == ("ZTO", "ZTO100")
    assert (second["express_company"], second["tracking_no"]) == ("某某物流", "XX200")
    assert len(first["item_desc"]) == 120 and first["item_desc"].endswith("…")
    assert await db.fetchval("select count(*) from order_events where dispatched_at is null") == 0


# --- configuration ------------------------------------------------------------------------------


async def test_incomplete_wechatpay_config_fails_start_up(settings):
    broken = msgspec.structs.replace(settings, wechatpay_apiv3_key="")
    with pytest.raises(WeChatPayConfigError, match="SHOP_WECHATPAY_APIV3_KEY"):
        build_providers(broken)
    providers = build_providers(settings)
    assert set(providers) == {"sandbox", "wechatpay"}
    await close_providers(providers)
    assert providers["wechatpay"].http.is_closed


def test_refund_notify_url_is_next_to_the_notify_url():
    assert refund_notify_url(NOTIFY_URL) == "https://shop.test/api/v1/payments/wechatpay/refund-notify"
    assert (
        refund_notify_url("https://api.shop.cn/mall/api/v1/payments/wechatpay/notify/")
        == "https://api.shop.cn/mall/api/v1/payments/wechatpay/refund-notify"
    )
