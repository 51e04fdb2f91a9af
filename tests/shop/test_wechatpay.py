"""WeChat Pay v3 client and mini-program API client against the fake WeChat servers (real crypto, real HTTP)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from shop.keys import Keys
from shop.payments.wechatpay import (
    NotificationError,
    WeChatPayClient,
    WeChatPayConfig,
    WeChatPayConfigError,
    WeChatPayError,
    check_paid_resource,
    notify_ack,
    notify_nack,
    parse_refund_resource,
)
from shop.redis import create_redis
from shop.settings import Settings, load_settings
from shop.wechat_mp import MiniProgramClient, MiniProgramError
from tests.fakes import wechatpay as fakes
from tests.fakes.wechatpay import FakeKeys, FakeWeChat, wechatpay_settings

# The shared fixtures (one fake server per session, state reset per test).
fake_wechatpay_server = fakes.fake_wechatpay_server
fake_wechatpay = fakes.fake_wechatpay

OPENID = "o_fake_shopper_openid_0001"


def pay_settings(fake: FakeWeChat, **overrides: object) -> Settings:
    return msgspec.structs.replace(
        wechatpay_settings(load_settings(environ={}, env="test"), fake), **overrides
    )


@pytest.fixture
async def pay(fake_wechatpay: FakeWeChat) -> AsyncIterator[WeChatPayClient]:
    async with WeChatPayClient(WeChatPayConfig.from_settings(pay_settings(fake_wechatpay))) as client:
        yield client


async def paid_order(pay: WeChatPayClient, fake: FakeWeChat, no: str, total: int = 2990) -> dict:
    await pay.jsapi_prepay(no, "T恤 x1", total, OPENID, datetime.now(UTC) + timedelta(minutes=15))
    return fake.mark_paid(no)


# --- requests and answers ---------------------------------------------------------------------


async def test_jsapi_prepay_is_signed_and_returns_prepay_id(pay, fake_wechatpay):
    expire = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    prepay_id = await pay.jsapi_prepay(
        "SO20300102000001", "夏季T恤 白色 L", 2990, OPENID, expire, attach="o=1"
    )
    assert prepay_id.startswith("wx")
    assert fake_wechatpay.verified == [("POST", "/v3/pay/transactions/jsapi")]
    order = fake_wechatpay.orders["SO20300102000001"]
    assert order["prepay_id"] == prepay_id
    assert order["amount_total"] == 2990
    assert order["openid"] == OPENID
    assert order["time_expire"] == "2030-01-02T11:04:05+08:00"
    assert order["notify_url"] == "https://shop.test/api/v1/payments/wechatpay/notify"
    assert order["attach"] == "o=1"
    # Same out_trade_no again: WeChat hands back the same prepay_id.
    assert await pay.jsapi_prepay("SO20300102000001", "夏季T恤 白色 L", 2990, OPENID, expire) == prepay_id


async def test_wrong_merchant_key_is_refused_by_wechat(fake_wechatpay):
    keys = fake_wechatpay.keys
    settings = pay_settings(fake_wechatpay, wechatpay_private_key=FakeKeys.pem(keys.other_key))
    async with WeChatPayClient(WeChatPayConfig.from_settings(settings)) as client:
        with pytest.raises(WeChatPayError) as caught:
            await client.jsapi_prepay(
                "SO0000000002", "x", 1, OPENID, datetime.now(UTC) + timedelta(minutes=5)
            )
    assert (caught.value.code, caught.value.status) == ("SIGN_ERROR", 401)
    assert fake_wechatpay.sign_failures[0][2] == "signature does not verify"
    assert fake_wechatpay.orders == {}


async def test_answer_with_bad_platform_signature_is_rejected(pay, fake_wechatpay):
    fake_wechatpay.corrupt_signatures = 1
    with pytest.raises(WeChatPayError) as caught:
        await pay.jsapi_prepay("SO0000000003", "x", 1, OPENID, datetime.now(UTC) + timedelta(minutes=5))
    assert caught.value.code == "SIGN_ERROR"
    assert caught.value.status == 200
    # The next, correctly signed answer is accepted.
    assert (await pay.query_order("SO0000000003"))["trade_state"] == "NOTPAY"


async def test_answer_signed_by_unknown_serial_is_rejected(fake_wechatpay):
    # The client trusts only a key the fake does not sign with.
    other = FakeKeys.public_pem(fake_wechatpay.keys.other_key)
    settings = pay_settings(fake_wechatpay, wechatpay_public_keys=f"PUB_KEY_ID_OTHER={other}")
    async with WeChatPayClient(WeChatPayConfig.from_settings(settings)) as client:
        with pytest.raises(WeChatPayError) as caught:
            await client.jsapi_prepay(
                "SO0000000004", "x", 1, OPENID, datetime.now(UTC) + timedelta(minutes=5)
            )
    assert caught.value.code == "SIGN_ERROR"
    assert "serial" in caught.value.message


async def test_pay_params_sign_verifies_with_merchant_public_key(pay, fake_wechatpay):
    params = pay.mini_program_pay_params("wx201410272009395522657a690389285100")
    assert set(params) == {"timeStamp", "nonceStr", "package", "signType", "paySign"}
    assert params["package"] == "prepay_id=wx201410272009395522657a690389285100"
    assert params["signType"] == "RSA"
    assert abs(int(params["timeStamp"]) - time.time()) < 5
    message = f"{fake_wechatpay.appid}\n{params['timeStamp']}\n{params['nonceStr']}\n{params['package']}\n"
    fake_wechatpay.keys.merchant_key.public_key().verify(
        base64.b64decode(params["paySign"]), message.encode(), padding.PKCS1v15(), hashes.SHA256()
    )


async def test_query_and_close_order(pay, fake_wechatpay):
    expire = datetime.now(UTC) + timedelta(minutes=15)
    await pay.jsapi_prepay("SO0000000010", "x", 100, OPENID, expire)
    assert (await pay.query_order("SO0000000010"))["trade_state"] == "NOTPAY"
    assert await pay.close_order("SO0000000010") == "closed"
    assert (await pay.query_order("SO0000000010"))["trade_state"] == "CLOSED"
    assert await pay.close_order("SO0000000010") == "already_closed"
    assert await pay.close_order("SO0000000404") == "not_found"
    await paid_order(pay, fake_wechatpay, "SO0000000011")
    assert await pay.close_order("SO0000000011") == "paid"
    paid = await pay.query_order("SO0000000011")
    assert paid["trade_state"] == "SUCCESS"
    assert paid["transaction_id"].startswith("4200")
    with pytest.raises(WeChatPayError) as caught:
        await pay.query_order("SO0000000404")
    assert (caught.value.code, caught.value.status) == ("ORDER_NOT_EXIST", 404)
    assert (
        "GET",
        "/v3/pay/transactions/out-trade-no/SO0000000010?mchid=1900000109",
    ) in fake_wechatpay.verified


async def test_refund_retries_until_success_without_double_refund(pay, fake_wechatpay):
    await paid_order(pay, fake_wechatpay, "SO0000000020", total=5000)
    fake_wechatpay.refund_failures = 2
    result = None
    for _ in range(3):  # what the caller's retry loop does
        try:
            result = await pay.refund("RF0000000020", "SO0000000020", 2000, 5000, "不想要了", None)
            break
        except WeChatPayError as exc:
            assert (exc.code, exc.status) == ("SYSTEM_ERROR", 500)
    assert result is not None
    assert result["status"] == "PROCESSING"
    assert result["amount"]["refund"] == 2000
    # A retry after an unknown outcome (same out_refund_no) is the same refund, not a second one.
    again = await pay.refund("RF0000000020", "SO0000000020", 2000, 5000, "不想要了", None)
    assert again["refund_id"] == result["refund_id"]
    assert fake_wechatpay.refund_attempts == 4
    assert fake_wechatpay.refunded_total == 2000
    assert (await pay.query_refund("RF0000000020"))["refund_id"] == result["refund_id"]
    # More than what is left is refused with WeChat's code.
    with pytest.raises(WeChatPayError) as caught:
        await pay.refund("RF0000000021", "SO0000000020", 3001, 5000)
    assert caught.value.code == "INVALID_REQUEST"
    assert fake_wechatpay.refunded_total == 2000


async def test_unreachable_wechat_is_a_network_error(fake_wechatpay):
    settings = pay_settings(fake_wechatpay, wechatpay_base_url="http://127.0.0.1:1")
    async with WeChatPayClient(WeChatPayConfig.from_settings(settings)) as client:
        with pytest.raises(WeChatPayError) as caught:
            await client.query_order("SO0000000030")
    assert (caught.value.code, caught.value.status) == ("NETWORK_ERROR", 0)


async def test_bad_business_numbers_are_refused_before_sending(pay, fake_wechatpay):
    with pytest.raises(ValueError):
        await pay.query_order("no/slash")
    with pytest.raises(ValueError):
        await pay.jsapi_prepay("SO0000000031", "x", 0, OPENID, datetime.now(UTC))
    with pytest.raises(ValueError):
        await pay.jsapi_prepay("SO0000000031", "x", 1, OPENID, datetime(2030, 1, 1))
    assert fake_wechatpay.verified == []


# --- notifications ----------------------------------------------------------------------------


async def test_valid_payment_notification_decrypts(pay, fake_wechatpay):
    resource = await paid_order(pay, fake_wechatpay, "SO0000000040", total=2990)
    headers, body = fake_wechatpay.make_notification("TRANSACTION.SUCCESS", resource)
    event = pay.verify_notification(headers, body)
    assert event["event_type"] == "TRANSACTION.SUCCESS"
    assert event["id"]
    assert event["resource"] == resource
    notice = check_paid_resource(event["resource"], fake_wechatpay.mchid, fake_wechatpay.appid)
    assert notice.out_trade_no == "SO0000000040"
    assert notice.transaction_id == resource["transaction_id"]
    assert (notice.amount_total, notice.payer_total, notice.trade_state) == (2990, 2990, "SUCCESS")
    assert notice.paid and notice.payer_openid == OPENID
    assert notice.success_time is not None and notice.success_time.tzinfo is not None
    # Header names arrive in any case.
    lower = {k.lower(): v for k, v in headers.items()}
    assert pay.verify_notification(lower, body)["resource"] == resource


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("tamper", "bad_signature"),
        ("forged", "bad_signature"),
        ("signtest", "bad_signature"),
        ("serial", "unknown_serial"),
        ("stale", "stale"),
        ("apiv3", "decrypt_failed"),
        ("headers", "missing_headers"),
    ],
)
async def test_untrusted_notifications_are_rejected(pay, fake_wechatpay, case, code):
    resource = await paid_order(pay, fake_wechatpay, "SO0000000041")
    kwargs: dict = {
        "tamper": {"tamper": True},
        "forged": {"sign_key": fake_wechatpay.keys.other_key},
        "signtest": {"signtest": True},
        "serial": {"serial": "PUB_KEY_ID_0000000000000000000000000000"},
        "stale": {"stale": True},
        "apiv3": {"apiv3_key": "x" * 32},
    }.get(case, {})
    headers, body = fake_wechatpay.make_notification("TRANSACTION.SUCCESS", resource, **kwargs)
    if case == "headers":
        del headers["Wechatpay-Signature"]
    with pytest.raises(NotificationError) as caught:
        pay.verify_notification(headers, body)
    assert caught.value.code == code


async def test_stale_window_uses_tolerance(pay, fake_wechatpay):
    headers, body = fake_wechatpay.make_notification("TRANSACTION.SUCCESS", {"a": 1})
    sent = int(headers["Wechatpay-Timestamp"])
    assert pay.verify_notification(headers, body, now=sent + 299)["resource"] == {"a": 1}
    with pytest.raises(NotificationError) as caught:
        pay.verify_notification(headers, body, now=sent + 301)
    assert caught.value.code == "stale"
    with pytest.raises(NotificationError) as caught:
        pay.verify_notification(headers, body, now=sent - 301)  # from the future too
    assert caught.value.code == "stale"


async def test_resource_for_another_merchant_or_app_is_rejected(pay, fake_wechatpay):
    resource = await paid_order(pay, fake_wechatpay, "SO0000000042")
    with pytest.raises(NotificationError) as caught:
        check_paid_resource(resource, "1900000999", fake_wechatpay.appid)
    assert caught.value.code == "mchid_mismatch"
    with pytest.raises(NotificationError) as caught:
        check_paid_resource(resource, fake_wechatpay.mchid, "wxanotherapp")
    assert caught.value.code == "appid_mismatch"
    with pytest.raises(NotificationError) as caught:
        check_paid_resource({**resource, "amount": {}}, fake_wechatpay.mchid, fake_wechatpay.appid)
    assert caught.value.code == "bad_resource"


async def test_refund_notification(pay, fake_wechatpay):
    await paid_order(pay, fake_wechatpay, "SO0000000050", total=800)
    await pay.refund("RF0000000050", "SO0000000050", 800, 800, "缺货", "https://shop.test/refund-notify")
    assert fake_wechatpay.refunds["RF0000000050"]["notify_url"] == "https://shop.test/refund-notify"
    headers, body = fake_wechatpay.make_notification(
        "REFUND.SUCCESS", fake_wechatpay.complete_refund("RF0000000050")
    )
    event = pay.verify_notification(headers, body)
    notice = parse_refund_resource(event["resource"], mchid=fake_wechatpay.mchid)
    assert (notice.out_refund_no, notice.refund_status, notice.amount) == ("RF0000000050", "SUCCESS", 800)
    assert notice.refund_id.startswith("50") and notice.out_trade_no == "SO0000000050"
    with pytest.raises(NotificationError) as caught:
        parse_refund_resource(event["resource"], mchid="1900000999")
    assert caught.value.code == "mchid_mismatch"


def test_notify_replies():
    assert (notify_ack().status, notify_ack().body) == (204, None)
    nack = notify_nack("签名错误", 401)
    assert (nack.status, nack.body) == (401, {"code": "FAIL", "message": "签名错误"})
    assert notify_nack("db down").status == 500
    with pytest.raises(ValueError):
        notify_nack("no", 200)


# --- configuration ----------------------------------------------------------------------------


async def test_config_accepts_files_and_platform_certificates(fake_wechatpay, tmp_path, pay):
    keys = fake_wechatpay.keys
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.platform_key.public_key())
        .serial_number(0x5157F09EFDC096DE15EBE81A47057A7232F1B8E1)
        .not_valid_before(datetime.now(UTC) - timedelta(days=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=365))
        .sign(keys.platform_key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    (tmp_path / "key.pem").write_text(FakeKeys.pem(keys.merchant_key))
    settings = pay_settings(
        fake_wechatpay,
        wechatpay_private_key=f"@{tmp_path / 'key.pem'}",
        wechatpay_public_keys=f"5157F09EFDC096DE15EBE81A47057A7232F1B8E1=@{tmp_path / 'cert.pem'};"
        f"{keys.platform_serial}={FakeKeys.public_pem(keys.platform_key)}",
    )
    config = WeChatPayConfig.from_settings(settings)
    assert set(config.public_keys) == {"5157F09EFDC096DE15EBE81A47057A7232F1B8E1", keys.platform_serial}
    headers, body = fake_wechatpay.make_notification(
        "TRANSACTION.SUCCESS", {"ok": True}, serial="5157f09efdc096de15ebe81a47057a7232f1b8e1"
    )
    assert WeChatPayClient(config).verify_notification(headers, body)["resource"] == {"ok": True}
    # A certificate filed under another serial could never verify: refused at start.
    wrong = pay_settings(fake_wechatpay, wechatpay_public_keys=f"ABCDEF=@{tmp_path / 'cert.pem'}")
    with pytest.raises(WeChatPayConfigError, match="serial"):
        WeChatPayConfig.from_settings(wrong)


async def test_config_errors_are_clear(fake_wechatpay, tmp_path):
    cases = {
        "APIV3_KEY must be exactly 32 bytes": {"wechatpay_apiv3_key": "short"},
        "must be an RSA key": {
            "wechatpay_private_key": ec.generate_private_key(ec.SECP256R1())
            .private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            .decode()
        },
        "cannot read": {"wechatpay_private_key": f"@{tmp_path / 'missing.pem'}"},
        "not an unencrypted PEM private key": {"wechatpay_private_key": "garbage"},
        # (Settings refuse SHOP_PAYMENT_PROVIDER=wechatpay without it; the config says so too.)
        "set SHOP_WECHATPAY_MCHID": {"wechatpay_mchid": "", "payment_provider": "sandbox"},
        "SHOP_WECHATPAY_PUBLIC_KEYS": {"wechatpay_public_keys": "NOEQUALS"},
        "NOTIFY_URL": {"wechatpay_notify_url": "ftp://x/notify"},
    }
    for message, overrides in cases.items():
        with pytest.raises(WeChatPayConfigError, match=message):
            WeChatPayConfig.from_settings(pay_settings(fake_wechatpay, **overrides))
    # The app id falls back to the mini-program's.
    config = WeChatPayConfig.from_settings(pay_settings(fake_wechatpay, wechatpay_appid=""))
    assert config.appid == fake_wechatpay.appid


# --- mini-program server API ------------------------------------------------------------------


@pytest.fixture
async def mp_env(settings, fake_wechatpay) -> AsyncIterator[tuple[Settings, object, Keys]]:
    mp_settings = wechatpay_settings(settings, fake_wechatpay)
    redis = create_redis(mp_settings.redis_url)
    keys = Keys(mp_settings.redis_prefix)
    try:
        yield mp_settings, redis, keys
    finally:
        await redis.delete(keys.wechat_access_token(fake_wechatpay.appid))
        await redis.delete(keys.wechat_access_token_lock(fake_wechatpay.appid))
        await redis.aclose()


async def test_access_token_is_cached_in_redis(mp_env, fake_wechatpay):
    settings, redis, keys = mp_env
    async with MiniProgramClient(settings, redis, keys) as mp:
        first = await mp.access_token()
        assert await mp.access_token() == first
    async with MiniProgramClient(settings, redis, keys) as other_process:
        assert await other_process.access_token() == first
    assert len(fake_wechatpay.stable_token_calls) == 1
    call = fake_wechatpay.stable_token_calls[0]
    assert call == {
        "grant_type": "client_credential",
        "appid": fake_wechatpay.appid,
        "secret": fake_wechatpay.mp_secret,
        "force_refresh": False,
    }
    ttl = await redis.ttl(keys.wechat_access_token(fake_wechatpay.appid))
    assert 7200 - 300 - 5 <= ttl <= 7200 - 300


async def test_concurrent_callers_refresh_once(mp_env, fake_wechatpay):
    settings, redis, keys = mp_env
    fake_wechatpay.stable_token_delay = 0.2
    clients = [MiniProgramClient(settings, redis, keys) for _ in range(10)]
    try:
        tokens = await asyncio.gather(*(c.access_token() for c in clients))
    finally:
        for c in clients:
            await c.aclose()
    assert len(set(tokens)) == 1
    assert len(fake_wechatpay.stable_token_calls) == 1
    assert await redis.get(keys.wechat_access_token_lock(fake_wechatpay.appid)) is None


async def test_upload_shipping_info_sends_the_payload(mp_env, fake_wechatpay, pay):
    settings, redis, keys = mp_env
    resource = await paid_order(pay, fake_wechatpay, "SO0000000060")
    shipped_at = datetime(2030, 5, 1, 2, 3, 4, 567000, tzinfo=UTC)
    async with MiniProgramClient(settings, redis, keys) as mp:
        await mp.upload_shipping_info(
            resource["transaction_id"],
            OPENID,
            [
                {
                    "carrier": "SF",
                    "tracking_no": "SF1234567890",
                    "item_desc": "夏季T恤 x1",
                    "contact": {"receiver_contact": "189****1234"},
                }
            ],
            upload_time=shipped_at,
        )
    assert fake_wechatpay.shipping_uploads == [
        {
            "order_key": {"order_number_type": 2, "transaction_id": resource["transaction_id"]},
            "logistics_type": 1,
            "delivery_mode": 1,
            "shipping_list": [
                {
                    "item_desc": "夏季T恤 x1",
                    "express_company": "SF",
                    "tracking_no": "SF1234567890",
                    "contact": {"receiver_contact": "189****1234"},
                }
            ],
            "upload_time": "2030-05-01T10:03:04.567+08:00",
            "payer": {"openid": OPENID},
        }
    ]


async def test_split_delivery_and_errors(mp_env, fake_wechatpay, pay):
    settings, redis, keys = mp_env
    resource = await paid_order(pay, fake_wechatpay, "SO0000000061")
    parcels = [{"express_company": "YTO", "tracking_no": f"YT{i}", "item_desc": f"包裹{i}"} for i in range(2)]
    async with MiniProgramClient(settings, redis, keys) as mp:
        await mp.upload_shipping_info(
            resource["transaction_id"], OPENID, parcels, delivery_mode=2, is_all_delivered=True
        )
        upload = fake_wechatpay.shipping_uploads[-1]
        assert upload["delivery_mode"] == 2 and upload["is_all_delivered"] is True
        assert [s["tracking_no"] for s in upload["shipping_list"]] == ["YT0", "YT1"]
        with pytest.raises(MiniProgramError) as caught:
            await mp.upload_shipping_info("4200000000000000000000000000", OPENID, parcels[:1])
        assert caught.value.errcode == 10060001
        with pytest.raises(ValueError):
            await mp.upload_shipping_info(resource["transaction_id"], OPENID, parcels)  # mode 1: one parcel
    assert len(fake_wechatpay.shipping_uploads) == 1


async def test_rejected_token_is_refreshed_and_call_retried(mp_env, fake_wechatpay, pay):
    settings, redis, keys = mp_env
    resource = await paid_order(pay, fake_wechatpay, "SO0000000062")
    shipment = [{"express_company": "ZTO", "tracking_no": "ZT1", "item_desc": "x"}]
    token_key = keys.wechat_access_token(fake_wechatpay.appid)
    async with MiniProgramClient(settings, redis, keys) as mp:
        # A cached token WeChat no longer accepts (40001): one normal stable_token call fixes it.
        await redis.set(token_key, "AT_expired_elsewhere", ex=600)
        await mp.upload_shipping_info(resource["transaction_id"], OPENID, shipment)
        assert [c["force_refresh"] for c in fake_wechatpay.stable_token_calls] == [False]
        good = await redis.get(token_key)
        assert good == fake_wechatpay.access_token
        # stable_token still hands out the refused token: the client forces a new one.
        fake_wechatpay.revoke_access_token()
        await mp.upload_shipping_info(resource["transaction_id"], OPENID, shipment)
        assert [c["force_refresh"] for c in fake_wechatpay.stable_token_calls] == [False, False, True]
        assert await redis.get(token_key) == fake_wechatpay.access_token != good
        # force_refresh on demand replaces the cached token too.
        fresh = await mp.access_token(force_refresh=True)
        assert fresh == fake_wechatpay.access_token
    assert len(fake_wechatpay.shipping_uploads) == 2


async def test_stable_token_errors_are_raised(mp_env, fake_wechatpay):
    settings, redis, keys = mp_env
    bad = msgspec.structs.replace(settings, wechat_secret="wrong-secret")
    async with MiniProgramClient(bad, redis, keys) as mp:
        with pytest.raises(MiniProgramError) as caught:
            await mp.access_token()
    assert caught.value.errcode == 40125
    assert await redis.get(keys.wechat_access_token(fake_wechatpay.appid)) is None
    assert await redis.get(keys.wechat_access_token_lock(fake_wechatpay.appid)) is None
    with pytest.raises(ValueError):
        MiniProgramClient(msgspec.structs.replace(settings, wechat_secret=""), redis, keys)
