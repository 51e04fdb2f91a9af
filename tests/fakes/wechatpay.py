"""A fake WeChat Pay API v3 + mini-program server on 127.0.0.1, speaking the real cryptography.

It verifies the merchant's request signatures with the merchant public key, signs its answers
with its own platform key, and builds notifications encrypted with the APIv3 key exactly as
WeChat does. It runs under uvicorn in a thread, so tests (and the app under test) reach it over
real HTTP. Use the `fake_wechatpay` fixture (one server per session, state reset per test) and
`wechatpay_settings(settings, fake)`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import msgspec
import pytest
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shop.payments.wechatpay import AUTH_SCHEMA, china_time
from shop.settings import Settings

MCHID = "1900000109"
APPID = "wxfakeminiprogram01"
MP_SECRET = "fake-mini-program-secret"
NOTIFY_URL = "https://shop.test/api/v1/payments/wechatpay/notify"
TIME_EXPIRE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+08:00$")


@dataclass(frozen=True)
class FakeKeys:
    merchant_key: rsa.RSAPrivateKey
    merchant_serial: str
    platform_key: rsa.RSAPrivateKey
    platform_serial: str
    other_key: rsa.RSAPrivateKey  # belongs to nobody: a wrong merchant key or a forged platform key
    apiv3_key: str

    @staticmethod
    def pem(key: rsa.RSAPrivateKey) -> str:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    @staticmethod
    def public_pem(key: rsa.RSAPrivateKey) -> str:
        return (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )


@functools.cache
def session_keys() -> FakeKeys:
    """RSA-2048 generation is slow-ish: once per test session."""
    return FakeKeys(
        merchant_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        merchant_serial=secrets.token_hex(20).upper(),
        platform_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        platform_serial="PUB_KEY_ID_0119000001092025" + secrets.token_hex(6).upper(),
        other_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        apiv3_key=secrets.token_hex(16),
    )


def _sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def _verify(key: rsa.RSAPublicKey, message: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature), message, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


def _now_china() -> str:
    return china_time(datetime.now(UTC))


class Reply(Exception):
    """Raised inside a handler to answer with an error."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body


def wechat_error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"code": code, "message": message})


class FakeWeChat:
    """The fake's state and ASGI app; every public method is safe to call from the test thread."""

    def __init__(self, keys: FakeKeys | None = None) -> None:
        self.keys = keys or session_keys()
        self.mchid, self.appid, self.mp_secret = MCHID, APPID, MP_SECRET
        self.base_url = ""
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # --- test controls ---------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.orders: dict[str, dict[str, Any]] = {}
            self.refunds: dict[str, dict[str, Any]] = {}
            self.verified: list[tuple[str, str]] = []  # (method, path) whose signature verified
            self.sign_failures: list[tuple[str, str, str]] = []  # (method, path, reason)
            self.refund_attempts = 0
            self.refund_failures = 0  # answer the next N refund calls with 500 SYSTEM_ERROR
            self.refund_status = "PROCESSING"  # what new refunds answer: also SUCCESS, ABNORMAL, CLOSED
            self.corrupt_signatures = 0  # sign the next N answers with a key WeChat does not own
            self.stable_token_calls: list[dict[str, Any]] = []
            self.stable_token_delay = 0.0
            self.access_token: str | None = None
            self.revoked_tokens: set[str] = set()
            self.shipping_uploads: list[dict[str, Any]] = []

    def mark_paid(self, out_trade_no: str, *, payer_total: int | None = None) -> dict[str, Any]:
        """The shopper pays: returns the transaction resource a TRANSACTION.SUCCESS notification carries."""
        with self._lock:
            order = self.orders[out_trade_no]
            order["trade_state"] = "SUCCESS"
            order["transaction_id"] = "4200" + "".join(secrets.choice("0123456789") for _ in range(24))
            order["success_time"] = _now_china()
            order["payer_total"] = order["amount_total"] if payer_total is None else payer_total
            return self._transaction(order)

    def complete_refund(self, out_refund_no: str, status: str = "SUCCESS") -> dict[str, Any]:
        """The refund finishes: returns the resource a REFUND.SUCCESS notification carries."""
        with self._lock:
            refund = self.refunds[out_refund_no]
            if status == "CLOSED" and refund["status"] != "CLOSED":  # closed unpaid: refundable again
                self.orders[refund["out_trade_no"]]["refunded"] -= refund["refund"]
            refund["status"] = status
            refund["success_time"] = _now_china()
            return {
                "mchid": self.mchid,
                "out_trade_no": refund["out_trade_no"],
                "transaction_id": refund["transaction_id"],
                "out_refund_no": out_refund_no,
                "refund_id": refund["refund_id"],
                "refund_status": status,
                "success_time": refund["success_time"],
                "user_received_account": "支付用户零钱",
                "amount": {
                    "total": refund["total"],
                    "refund": refund["refund"],
                    "payer_total": refund["total"],
                    "payer_refund": refund["refund"],
                },
            }

    def revoke_access_token(self) -> None:
        """The current token stops working for API calls while stable_token keeps handing it out."""
        with self._lock:
            if self.access_token:
                self.revoked_tokens.add(self.access_token)

    def make_notification(
        self,
        event_type: str,
        resource: dict[str, Any],
        *,
        tamper: bool = False,
        stale: bool = False,
        serial: str | None = None,
        signtest: bool = False,
        sign_key: rsa.RSAPrivateKey | None = None,
        apiv3_key: str | None = None,
    ) -> tuple[dict[str, str], bytes]:
        """A notification as WeChat sends it: resource AES-256-GCM encrypted, envelope RSA signed."""
        key = (apiv3_key or self.keys.apiv3_key).encode()
        associated = "refund" if event_type.startswith("REFUND.") else "transaction"
        resource_nonce = secrets.token_hex(6)
        ciphertext = AESGCM(key).encrypt(
            resource_nonce.encode(), json.dumps(resource, ensure_ascii=False).encode(), associated.encode()
        )
        envelope = {
            "id": str(uuid.uuid4()),
            "create_time": _now_china(),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": "支付成功" if associated == "transaction" else "退款成功",
            "resource": {
                "original_type": associated,
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": base64.b64encode(ciphertext).decode(),
                "associated_data": associated,
                "nonce": resource_nonce,
            },
        }
        body = json.dumps(envelope, ensure_ascii=False).encode()
        timestamp = str(int(time.time()) - (3600 if stale else 0))
        nonce = secrets.token_hex(16)
        signature = _sign(
            sign_key or self.keys.platform_key, f"{timestamp}\n{nonce}\n".encode() + body + b"\n"
        )
        if signtest:
            signature = "WECHATPAY/SIGNTEST/" + signature
        if tamper:  # changed after signing, as an attacker replaying with another amount would
            body = body.replace(b'"event_type"', b'"summary2": "x", "event_type"', 1)
        headers = {
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": signature,
            "Wechatpay-Serial": serial or self.keys.platform_serial,
            "Wechatpay-Signature-Type": AUTH_SCHEMA,
            "Content-Type": "application/json",
        }
        return headers, body

    # --- server ----------------------------------------------------------------------------

    def start(self) -> FakeWeChat:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self, log_level="warning", lifespan="off", access_log=False, loop="asyncio")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-wechatpay", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake WeChat Pay server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/cgi-bin/stable_token" and self.stable_token_delay:
            await asyncio.sleep(self.stable_token_delay)  # a slow WeChat: lets concurrent callers pile up
        status, payload, headers = self.handle(scope, body)
        content = b"" if payload is None else json.dumps(payload, ensure_ascii=False).encode()
        if scope["path"].startswith("/v3/"):
            headers.update(self._response_signature(content))
        raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if content:
            raw_headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content})

    def _response_signature(self, content: bytes) -> dict[str, str]:
        with self._lock:
            corrupt = self.corrupt_signatures > 0
            self.corrupt_signatures -= 1 if corrupt else 0
        timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
        key = self.keys.other_key if corrupt else self.keys.platform_key
        return {
            "Request-ID": str(uuid.uuid4()),
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Serial": self.keys.platform_serial,
            "Wechatpay-Signature": _sign(key, f"{timestamp}\n{nonce}\n".encode() + content + b"\n"),
        }

    def handle(self, scope: dict, body: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").decode()
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            with self._lock:
                if path.startswith("/v3/"):
                    raw_path = (scope.get("raw_path") or path.encode()).decode()
                    self._check_merchant_signature(
                        method, raw_path + (f"?{query}" if query else ""), headers, body
                    )
                    return self._route_pay(method, path, parse_qs(query), body)
                return 200, self._route_mini_program(method, path, parse_qs(query), body), {}
        except Reply as reply:
            return reply.status, reply.body, {}

    # --- WeChat Pay ------------------------------------------------------------------------

    def _check_merchant_signature(self, method: str, url: str, headers: dict[str, str], body: bytes) -> None:
        def refuse(reason: str) -> Reply:
            self.sign_failures.append((method, url, reason))
            return wechat_error(401, "SIGN_ERROR", f"签名错误: {reason}")

        auth = headers.get("authorization", "")
        if not auth.startswith(AUTH_SCHEMA + " "):
            raise refuse("no WECHATPAY2-SHA256-RSA2048 Authorization")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', auth[len(AUTH_SCHEMA) + 1 :]))
        if fields.get("mchid") != self.mchid:
            raise refuse("wrong mchid")
        if fields.get("serial_no") != self.keys.merchant_serial:
            raise refuse("unknown merchant certificate serial")
        if abs(time.time() - int(fields.get("timestamp") or 0)) > 300:
            raise refuse("timestamp out of range")
        message = (
            f"{method}\n{url}\n{fields['timestamp']}\n{fields.get('nonce_str', '')}\n".encode() + body + b"\n"
        )
        if not _verify(self.keys.merchant_key.public_key(), message, fields.get("signature", "")):
            raise refuse("signature does not verify")
        self.verified.append((method, url))

    def _route_pay(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        data = json.loads(body) if body else {}
        if method == "POST" and path == "/v3/pay/transactions/jsapi":
            return 200, self._jsapi(data), {}
        if match := re.fullmatch(r"/v3/pay/transactions/out-trade-no/([^/]+)/close", path):
            if method == "POST":
                if data.get("mchid") != self.mchid:
                    raise wechat_error(400, "PARAM_ERROR", "mchid mismatch")
                self._close(match.group(1))
                return 204, None, {}
        if match := re.fullmatch(r"/v3/pay/transactions/out-trade-no/([^/]+)", path):
            if method == "GET":
                if query.get("mchid") != [self.mchid]:
                    raise wechat_error(400, "PARAM_ERROR", "mchid is required")
                order = self.orders.get(match.group(1))
                if order is None:
                    raise wechat_error(404, "ORDER_NOT_EXIST", "订单不存在")
                return 200, self._transaction(order), {}
        if method == "POST" and path == "/v3/refund/domestic/refunds":
            return 200, self._refund(data), {}
        if match := re.fullmatch(r"/v3/refund/domestic/refunds/([^/]+)", path):
            refund = self.refunds.get(match.group(1))
            if method == "GET" and refund is not None:
                return 200, self._refund_view(refund), {}
            raise wechat_error(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
        raise wechat_error(404, "NOT_FOUND", f"no fake for {method} {path}")

    def _jsapi(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("appid") != self.appid or data.get("mchid") != self.mchid:
            raise wechat_error(400, "APPID_MCHID_NOT_MATCH", "appid和mch_id不匹配")
        amount, payer = data.get("amount") or {}, data.get("payer") or {}
        problems = [
            name
            for name, ok in (
                (
                    "description",
                    isinstance(data.get("description"), str) and 0 < len(data["description"]) <= 127,
                ),
                ("out_trade_no", isinstance(data.get("out_trade_no"), str)),
                ("notify_url", str(data.get("notify_url", "")).startswith(("https://", "http://"))),
                ("time_expire", bool(TIME_EXPIRE.match(str(data.get("time_expire", ""))))),
                ("amount.total", isinstance(amount.get("total"), int) and amount["total"] >= 1),
                ("amount.currency", amount.get("currency") == "CNY"),
                ("payer.openid", bool(payer.get("openid"))),
            )
            if not ok
        ]
        if problems:
            raise wechat_error(400, "PARAM_ERROR", f"参数错误: {', '.join(problems)}")
        existing = self.orders.get(data["out_trade_no"])
        if existing is not None:
            if existing["trade_state"] == "SUCCESS":
                raise wechat_error(400, "ORDERPAID", "该订单已支付")
            if existing["trade_state"] == "CLOSED":
                raise wechat_error(400, "ORDER_CLOSED", "订单已关闭")
            if existing["amount_total"] != amount["total"]:
                raise wechat_error(400, "INVALID_REQUEST", "201 商户订单号重复")
            return {"prepay_id": existing["prepay_id"]}
        order = {
            "out_trade_no": data["out_trade_no"],
            "description": data["description"],
            "amount_total": amount["total"],
            "openid": payer["openid"],
            "time_expire": data["time_expire"],
            "notify_url": data["notify_url"],
            "attach": data.get("attach"),
            "prepay_id": "wx" + secrets.token_hex(15),
            "trade_state": "NOTPAY",
            "transaction_id": None,
            "success_time": None,
            "payer_total": None,
            "refunded": 0,
        }
        self.orders[order["out_trade_no"]] = order
        return {"prepay_id": order["prepay_id"]}

    def _close(self, out_trade_no: str) -> None:
        order = self.orders.get(out_trade_no)
        if order is None:
            raise wechat_error(404, "ORDER_NOT_EXIST", "订单不存在")
        if order["trade_state"] in ("SUCCESS", "REFUND"):
            raise wechat_error(400, "ORDERPAID", "订单已支付")
        if order["trade_state"] == "CLOSED":
            raise wechat_error(400, "ORDER_CLOSED", "订单已关闭")
        order["trade_state"] = "CLOSED"

    def _transaction(self, order: dict[str, Any]) -> dict[str, Any]:
        view: dict[str, Any] = {
            "appid": self.appid,
            "mchid": self.mchid,
            "out_trade_no": order["out_trade_no"],
            "trade_type": "JSAPI",
            "trade_state": order["trade_state"],
            "trade_state_desc": {"NOTPAY": "未支付", "CLOSED": "已关闭", "SUCCESS": "支付成功"}.get(
                order["trade_state"], "转入退款"
            ),
            "attach": order["attach"] or "",
            "payer": {"openid": order["openid"]},
            "amount": {"total": order["amount_total"], "currency": "CNY"},
        }
        if order["transaction_id"]:
            view["transaction_id"] = order["transaction_id"]
            view["bank_type"] = "OTHERS"
            view["success_time"] = order["success_time"]
            view["amount"].update(payer_total=order["payer_total"], payer_currency="CNY")
        return view

    def _refund(self, data: dict[str, Any]) -> dict[str, Any]:
        self.refund_attempts += 1
        if self.refund_failures > 0:
            self.refund_failures -= 1
            raise wechat_error(500, "SYSTEM_ERROR", "系统错误")
        amount = data.get("amount") or {}
        existing = self.refunds.get(str(data.get("out_refund_no")))
        if existing is not None:  # WeChat's idempotency: the same out_refund_no is the same refund
            if existing["out_trade_no"] != data.get("out_trade_no") or existing["refund"] != amount.get(
                "refund"
            ):
                raise wechat_error(400, "INVALID_REQUEST", "退款单号已存在但参数不一致")
            return self._refund_view(existing)
        order = self.orders.get(str(data.get("out_trade_no")))
        if order is None or order["trade_state"] not in ("SUCCESS", "REFUND"):
            raise wechat_error(404, "RESOURCE_NOT_EXISTS", "订单不存在或未支付")
        if amount.get("total") != order["amount_total"] or amount.get("currency") != "CNY":
            raise wechat_error(400, "PARAM_ERROR", "订单金额或币种信息不一致")
        refund_fen = amount.get("refund")
        if not isinstance(refund_fen, int) or refund_fen < 1:
            raise wechat_error(400, "PARAM_ERROR", "退款金额错误")
        if order["refunded"] + refund_fen > order["amount_total"]:
            raise wechat_error(400, "INVALID_REQUEST", "申请退款金额超过订单可退金额")
        if self.refund_status != "CLOSED":  # a refund closed at once paid nothing
            order["refunded"] += refund_fen
        order["trade_state"] = "REFUND"
        refund = {
            "out_refund_no": data["out_refund_no"],
            "refund_id": "50" + "".join(secrets.choice("0123456789") for _ in range(27)),
            "out_trade_no": order["out_trade_no"],
            "transaction_id": order["transaction_id"],
            "refund": refund_fen,
            "total": order["amount_total"],
            "reason": data.get("reason"),
            "notify_url": data.get("notify_url"),
            "status": self.refund_status,
            "create_time": _now_china(),
            "success_time": _now_china() if self.refund_status == "SUCCESS" else None,
        }
        self.refunds[refund["out_refund_no"]] = refund
        return self._refund_view(refund)

    def _refund_view(self, refund: dict[str, Any]) -> dict[str, Any]:
        view = {
            "refund_id": refund["refund_id"],
            "out_refund_no": refund["out_refund_no"],
            "transaction_id": refund["transaction_id"],
            "out_trade_no": refund["out_trade_no"],
            "channel": "ORIGINAL",
            "user_received_account": "支付用户零钱",
            "create_time": refund["create_time"],
            "status": refund["status"],
            "funds_account": "AVAILABLE",
            "amount": {
                "total": refund["total"],
                "refund": refund["refund"],
                "payer_total": refund["total"],
                "payer_refund": refund["refund"],
                "settlement_refund": refund["refund"],
                "settlement_total": refund["total"],
                "discount_refund": 0,
                "currency": "CNY",
            },
        }
        if refund["success_time"]:
            view["success_time"] = refund["success_time"]
        return view

    @property
    def refunded_total(self) -> int:
        with self._lock:
            return sum(order["refunded"] for order in self.orders.values())

    # --- mini-program server API -----------------------------------------------------------

    def _route_mini_program(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> dict[str, Any]:
        data = json.loads(body) if body else {}
        if method == "POST" and path == "/cgi-bin/stable_token":
            return self._stable_token(data)
        if method == "POST" and path == "/wxa/sec/order/upload_shipping_info":
            token = (query.get("access_token") or [""])[0]
            if token != self.access_token or token in self.revoked_tokens:
                return {
                    "errcode": 40001,
                    "errmsg": "invalid credential, access_token is invalid or not latest",
                }
            return self._upload_shipping_info(data)
        raise Reply(404, {"errcode": 404, "errmsg": "no such API"})

    def _stable_token(self, data: dict[str, Any]) -> dict[str, Any]:
        self.stable_token_calls.append(data)
        if data.get("grant_type") != "client_credential" or data.get("appid") != self.appid:
            return {"errcode": 40013, "errmsg": "invalid appid"}
        if data.get("secret") != self.mp_secret:
            return {"errcode": 40125, "errmsg": "invalid appsecret"}
        if data.get("force_refresh") or self.access_token is None:
            self.access_token = "AT_" + secrets.token_hex(24)
        return {"access_token": self.access_token, "expires_in": 7200}

    def _upload_shipping_info(self, data: dict[str, Any]) -> dict[str, Any]:
        key, shipping = data.get("order_key") or {}, data.get("shipping_list")
        paid = {o["transaction_id"] for o in self.orders.values() if o["transaction_id"]}
        if key.get("order_number_type") != 2 or not key.get("transaction_id"):
            return {"errcode": 47001, "errmsg": "data format error: order_key"}
        if key["transaction_id"] not in paid:
            return {"errcode": 10060001, "errmsg": "支付单不存在"}
        if data.get("logistics_type") not in (1, 2, 3, 4) or data.get("delivery_mode") not in (1, 2):
            return {"errcode": 47001, "errmsg": "data format error: logistics_type/delivery_mode"}
        if not isinstance(shipping, list) or not shipping or not all(s.get("item_desc") for s in shipping):
            return {"errcode": 47001, "errmsg": "data format error: shipping_list"}
        if data["logistics_type"] == 1 and not all(
            s.get("tracking_no") and s.get("express_company") for s in shipping
        ):
            return {"errcode": 47001, "errmsg": "data format error: tracking_no/express_company"}
        try:
            datetime.fromisoformat(str(data.get("upload_time")))
        except ValueError:
            return {"errcode": 47001, "errmsg": "data format error: upload_time"}
        if not (data.get("payer") or {}).get("openid"):
            return {"errcode": 47001, "errmsg": "data format error: payer"}
        self.shipping_uploads.append(data)
        return {"errcode": 0, "errmsg": "ok"}


def wechatpay_settings(base_settings: Settings, fake: FakeWeChat) -> Settings:
    """base_settings pointed at the fake for WeChat Pay and the mini-program API (keys inline)."""
    keys = fake.keys
    return msgspec.structs.replace(
        base_settings,
        payment_provider="wechatpay",
        wechat_appid=fake.appid,
        wechat_secret=fake.mp_secret,
        wechat_api_base=fake.base_url,
        wechatpay_mchid=fake.mchid,
        wechatpay_appid=fake.appid,
        wechatpay_serial_no=keys.merchant_serial,
        wechatpay_private_key=keys.pem(keys.merchant_key),
        wechatpay_apiv3_key=keys.apiv3_key,
        wechatpay_public_keys=f"{keys.platform_serial}={keys.public_pem(keys.platform_key)}",
        wechatpay_base_url=fake.base_url,
        wechatpay_notify_url=NOTIFY_URL,
    )


@pytest.fixture(scope="session")
def fake_wechatpay_server() -> Iterator[FakeWeChat]:
    fake = FakeWeChat().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_wechatpay(fake_wechatpay_server: FakeWeChat) -> FakeWeChat:
    """The session's fake server with empty state."""
    fake_wechatpay_server.reset()
    return fake_wechatpay_server
