"""WeChat Pay API v3 (JSAPI for mini-programs): signed requests, verified answers and notifications.

The protocol layer only: the payment service decides what a paid, closed or refunded order means.
Every request is signed with the merchant key (WECHATPAY2-SHA256-RSA2048); every answer and every
notification must carry a valid WeChat Pay signature (a public key `PUB_KEY_ID_…` or a platform
certificate, chosen by the Wechatpay-Serial header) before its content is trusted.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shop.settings import Settings

AUTH_SCHEMA = "WECHATPAY2-SHA256-RSA2048"
SIGNTEST_PREFIX = "WECHATPAY/SIGNTEST/"
CHINA_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")
# WeChat's rule for out_trade_no / out_refund_no: 6-32 of digits, letters and _-|*@.
MERCHANT_NO = re.compile(r"^[0-9A-Za-z_\-|*@]{6,32}$")
USER_AGENT = "shop-wechatpay/1.0"

CloseOutcome = Literal["closed", "already_closed", "paid", "not_found"]


class WeChatPayConfigError(ValueError):
    """A SHOP_WECHATPAY_* setting is missing or unusable; the message names it."""


class WeChatPayError(Exception):
    """WeChat Pay refused or could not be reached: `code`/`message` are WeChat's, `status` the HTTP status (0: no answer)."""

    def __init__(self, code: str, message: str, status: int = 0, detail: Any = None) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail


class NotificationError(Exception):
    """A notification that must not be trusted; `code` is one of stale, unknown_serial, bad_signature,
    missing_headers, bad_body, decrypt_failed, mchid_mismatch, appid_mismatch, bad_resource."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --- keys -------------------------------------------------------------------------------------


def read_pem(value: str, setting: str) -> bytes:
    """PEM text given inline or as @/path/to/file (escaped \\n from an env file is accepted)."""
    value = value.strip()
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise WeChatPayConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    if "\\n" in value and "\n" not in value:
        value = value.replace("\\n", "\n")
    return value.encode()


def load_private_key(value: str, setting: str = "SHOP_WECHATPAY_PRIVATE_KEY") -> rsa.RSAPrivateKey:
    """The merchant API key (apiclient_key.pem): an unencrypted RSA key of 2048+ bits."""
    data = read_pem(value, setting)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise WeChatPayConfigError(
            f"{setting}: not an unencrypted PEM private key (apiclient_key.pem)"
        ) from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise WeChatPayConfigError(f"{setting}: must be an RSA key, got {type(key).__name__}")
    if key.key_size < 2048:
        raise WeChatPayConfigError(f"{setting}: RSA key of {key.key_size} bits, WeChat Pay requires 2048")
    return key


def load_public_key(serial: str, value: str, setting: str = "SHOP_WECHATPAY_PUBLIC_KEYS") -> rsa.RSAPublicKey:
    """A WeChat Pay public key (PEM) or platform certificate (X.509 PEM) named by `serial`."""
    data = read_pem(value, setting)
    try:
        if b"BEGIN CERTIFICATE" in data:
            cert = x509.load_pem_x509_certificate(data)
            key = cert.public_key()
            # A platform certificate is announced by its own serial: a mismatch could never verify.
            try:
                same = int(serial, 16) == cert.serial_number
            except ValueError:
                same = False
            if not same:
                raise WeChatPayConfigError(
                    f"{setting}: certificate {serial!r} has serial {cert.serial_number:X}"
                )
        else:
            key = serialization.load_pem_public_key(data)
    except WeChatPayConfigError:
        raise
    except ValueError as exc:
        raise WeChatPayConfigError(f"{setting}: {serial}: not a PEM public key or certificate") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise WeChatPayConfigError(f"{setting}: {serial}: must be an RSA key")
    return key


def parse_public_keys(raw: str, setting: str = "SHOP_WECHATPAY_PUBLIC_KEYS") -> dict[str, rsa.RSAPublicKey]:
    """'SERIAL=@/path.pem;SERIAL2=-----BEGIN …' -> {SERIAL: key}; serials compare case-insensitively."""
    keys: dict[str, rsa.RSAPublicKey] = {}
    for part in raw.split(";"):
        if not part.strip():
            continue
        serial, sep, value = part.partition("=")
        serial = serial.strip()
        if not sep or not serial or not value.strip():
            raise WeChatPayConfigError(
                f"{setting}: expected 'SERIAL=@/path.pem[;SERIAL=…]', got {part[:40]!r}"
            )
        keys[serial.upper()] = load_public_key(serial, value, setting)
    if not keys:
        raise WeChatPayConfigError(
            f"{setting}: at least one WeChat Pay public key or certificate is required"
        )
    return keys


@dataclass(frozen=True, slots=True)
class WeChatPayConfig:
    mchid: str
    appid: str
    serial_no: str
    private_key: rsa.RSAPrivateKey
    apiv3_key: bytes
    public_keys: Mapping[str, rsa.RSAPublicKey]
    base_url: str = "https://api.mch.weixin.qq.com"
    notify_url: str = ""
    notify_tolerance: int = 300
    timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WeChatPayConfig:
        """Load and check every SHOP_WECHATPAY_* value; raises WeChatPayConfigError naming the bad one."""
        appid = settings.wechatpay_appid or settings.wechat_appid
        required = {
            "SHOP_WECHATPAY_MCHID": settings.wechatpay_mchid,
            "SHOP_WECHATPAY_APPID (or SHOP_WECHAT_APPID)": appid,
            "SHOP_WECHATPAY_SERIAL_NO": settings.wechatpay_serial_no,
            "SHOP_WECHATPAY_PRIVATE_KEY": settings.wechatpay_private_key,
            "SHOP_WECHATPAY_APIV3_KEY": settings.wechatpay_apiv3_key,
            "SHOP_WECHATPAY_PUBLIC_KEYS": settings.wechatpay_public_keys,
            "SHOP_WECHATPAY_NOTIFY_URL": settings.wechatpay_notify_url,
        }
        missing = [name for name, value in required.items() if not value.strip()]
        if missing:
            raise WeChatPayConfigError(f"WeChat Pay is not configured: set {', '.join(missing)}")
        apiv3_key = settings.wechatpay_apiv3_key.encode()
        if len(apiv3_key) != 32:
            raise WeChatPayConfigError(
                f"SHOP_WECHATPAY_APIV3_KEY must be exactly 32 bytes (AES-256), got {len(apiv3_key)}"
            )
        notify = urlsplit(settings.wechatpay_notify_url)
        allowed = ("https",) if settings.env == "production" else ("https", "http")
        if notify.scheme not in allowed or not notify.netloc or notify.query:
            raise WeChatPayConfigError(
                "SHOP_WECHATPAY_NOTIFY_URL must be an absolute https URL without a query string"
            )
        return cls(
            mchid=settings.wechatpay_mchid.strip(),
            appid=appid.strip(),
            serial_no=settings.wechatpay_serial_no.strip().upper(),
            private_key=load_private_key(settings.wechatpay_private_key),
            apiv3_key=apiv3_key,
            public_keys=parse_public_keys(settings.wechatpay_public_keys),
            base_url=settings.wechatpay_base_url.rstrip("/"),
            notify_url=settings.wechatpay_notify_url,
            notify_tolerance=settings.wechatpay_notify_tolerance,
        )


# --- signatures and encryption ----------------------------------------------------------------


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    """base64(RSA-SHA256 PKCS#1 v1.5): WeChat Pay's signature for requests, answers and pay params."""
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa_verify(key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        key.verify(
            base64.b64decode(signature_b64, validate=True), message, padding.PKCS1v15(), hashes.SHA256()
        )
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def decrypt_resource(apiv3_key: bytes, resource: Mapping[str, Any]) -> dict[str, Any]:
    """Decrypt a notification's AEAD_AES_256_GCM resource into its JSON object."""
    if resource.get("algorithm") != "AEAD_AES_256_GCM":
        raise NotificationError("decrypt_failed", f"unsupported algorithm {resource.get('algorithm')!r}")
    try:
        nonce = str(resource["nonce"]).encode()
        ciphertext = base64.b64decode(str(resource["ciphertext"]), validate=True)
        associated = str(resource.get("associated_data") or "").encode()
        plaintext = AESGCM(apiv3_key).decrypt(nonce, ciphertext, associated or None)
        data = json.loads(plaintext)
    except (KeyError, binascii.Error, InvalidTag, ValueError) as exc:
        raise NotificationError("decrypt_failed", "resource does not decrypt with the APIv3 key") from exc
    if not isinstance(data, dict):
        raise NotificationError("decrypt_failed", "decrypted resource is not a JSON object")
    return data


def verify_wechatpay_signature(
    config: WeChatPayConfig, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> None:
    """Check Wechatpay-Timestamp/Nonce/Signature/Serial over body; raises NotificationError."""
    h = {k.lower(): v for k, v in headers.items()}
    timestamp, nonce = h.get("wechatpay-timestamp"), h.get("wechatpay-nonce")
    signature, serial = h.get("wechatpay-signature"), h.get("wechatpay-serial")
    if not (timestamp and nonce and signature and serial):
        raise NotificationError("missing_headers", "Wechatpay-Timestamp/Nonce/Signature/Serial are required")
    # WeChat probes a merchant's verification with deliberately wrong signatures: never accept them.
    if signature.startswith(SIGNTEST_PREFIX):
        raise NotificationError("bad_signature", "signature probe (WECHATPAY/SIGNTEST) rejected")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise NotificationError("stale", f"bad Wechatpay-Timestamp {timestamp!r}") from None
    now = time.time() if now is None else now
    if abs(now - sent_at) > config.notify_tolerance:
        raise NotificationError("stale", f"timestamp {sent_at} is {int(now - sent_at)}s away from now")
    key = config.public_keys.get(serial.strip().upper())
    if key is None:
        raise NotificationError("unknown_serial", f"no WeChat Pay key with serial {serial!r}")
    message = f"{timestamp}\n{nonce}\n".encode() + body + b"\n"
    if not rsa_verify(key, message, signature):
        raise NotificationError("bad_signature", "Wechatpay-Signature does not verify")


def china_time(moment: datetime, timespec: str = "seconds") -> str:
    """RFC 3339 in +08:00, the form WeChat expects (time_expire, upload_time)."""
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    return moment.astimezone(CHINA_TZ).isoformat(timespec=timespec)


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).astimezone(UTC)
    except ValueError:
        raise NotificationError("bad_resource", f"bad time {value!r}") from None


def _merchant_no(value: str, name: str) -> str:
    if not MERCHANT_NO.fullmatch(value):
        raise ValueError(f"{name} must be 6-32 characters of 0-9 A-Z a-z _-|*@, got {value!r}")
    return value


# --- the client -------------------------------------------------------------------------------


class WeChatPayClient:
    """Signed calls to WeChat Pay API v3; pass `http` to share a connection pool, else one is made lazily."""

    def __init__(self, config: WeChatPayConfig, http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._http = http
        self._owns_http = http is None
        self._path_prefix = urlsplit(config.base_url).path.rstrip("/")

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> WeChatPayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout, connect=min(5.0, self.config.timeout))
            )
        return self._http

    def sign(self, message: str) -> str:
        return rsa_sign(self.config.private_key, message.encode())

    def authorization(
        self, method: str, url_path: str, body: str, *, timestamp: int | None = None, nonce: str | None = None
    ) -> str:
        """The Authorization header for one request; url_path includes the query string."""
        timestamp = int(time.time()) if timestamp is None else timestamp
        nonce = nonce or secrets.token_hex(16).upper()
        signature = self.sign(f"{method}\n{url_path}\n{timestamp}\n{nonce}\n{body}\n")
        return (
            f'{AUTH_SCHEMA} mchid="{self.config.mchid}",nonce_str="{nonce}",signature="{signature}",'
            f'timestamp="{timestamp}",serial_no="{self.config.serial_no}"'
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        url_path = self._path_prefix + path + (f"?{urlencode(query)}" if query else "")
        # The exact bytes sent are the bytes signed.
        body = "" if payload is None else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        headers = {
            "Authorization": self.authorization(method, url_path, body),
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if payload is not None:
            headers["Content-Type"] = "application/json"
        parts = urlsplit(self.config.base_url)
        try:
            response = await self._client().request(
                method, f"{parts.scheme}://{parts.netloc}{url_path}", content=body.encode(), headers=headers
            )
        except httpx.HTTPError as exc:
            # No answer: the outcome is unknown, so callers retry with the same business number.
            raise WeChatPayError("NETWORK_ERROR", f"{type(exc).__name__}: {exc}", 0) from exc
        content = response.content
        if not 200 <= response.status_code < 300:
            raise _error_from(response)
        if content or "wechatpay-signature" in response.headers:
            try:
                verify_wechatpay_signature(self.config, response.headers, content)
            except NotificationError as exc:
                raise WeChatPayError(
                    "SIGN_ERROR", f"answer signature rejected: {exc.message}", response.status_code
                ) from exc
        if not content:
            return response.status_code, None
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise WeChatPayError("BAD_RESPONSE", "answer is not JSON", response.status_code) from exc
        if not isinstance(data, dict):
            raise WeChatPayError("BAD_RESPONSE", "answer is not a JSON object", response.status_code)
        return response.status_code, data

    async def jsapi_prepay(
        self,
        out_trade_no: str,
        description: str,
        amount_fen: int,
        payer_openid: str,
        time_expire: datetime,
        attach: str | None = None,
    ) -> str:
        """Create a JSAPI (mini-program) transaction and return its prepay_id (valid two hours)."""
        _merchant_no(out_trade_no, "out_trade_no")
        if amount_fen < 1:
            raise ValueError("amount_fen must be at least 1")
        description = description.strip()[:127]  # WeChat's limit; a long product name is cut, not refused
        if not description:
            raise ValueError("description must not be empty")
        if not payer_openid:
            raise ValueError("payer_openid must not be empty")
        if attach is not None and len(attach) > 128:
            raise ValueError("attach is limited to 128 characters")
        payload: dict[str, Any] = {
            "appid": self.config.appid,
            "mchid": self.config.mchid,
            "description": description,
            "out_trade_no": out_trade_no,
            "time_expire": china_time(time_expire),
            "notify_url": self.config.notify_url,
            "amount": {"total": amount_fen, "currency": "CNY"},
            "payer": {"openid": payer_openid},
        }
        if attach:
            payload["attach"] = attach
        status, data = await self._request("POST", "/v3/pay/transactions/jsapi", payload=payload)
        prepay_id = (data or {}).get("prepay_id")
        if not isinstance(prepay_id, str) or not prepay_id:
            raise WeChatPayError("BAD_RESPONSE", "answer has no prepay_id", status)
        return prepay_id

    def mini_program_pay_params(self, prepay_id: str) -> dict[str, str]:
        """Exactly the fields wx.requestPayment takes: timeStamp, nonceStr, package, signType, paySign."""
        timestamp = str(int(time.time()))
        nonce = secrets.token_hex(16)
        package = f"prepay_id={prepay_id}"
        pay_sign = self.sign(f"{self.config.appid}\n{timestamp}\n{nonce}\n{package}\n")
        return {
            "timeStamp": timestamp,
            "nonceStr": nonce,
            "package": package,
            "signType": "RSA",
            "paySign": pay_sign,
        }

    async def close_order(self, out_trade_no: str) -> CloseOutcome:
        """Close an unpaid transaction so it can no longer be paid.

        Returns "closed" (204), "already_closed" (ORDER_CLOSED: closing again is a success),
        "paid" (ORDERPAID: the shopper paid first — do not cancel; query and treat as paid) or
        "not_found" (WeChat never saw this out_trade_no, so nothing can be paid). Any other
        refusal raises WeChatPayError so the caller retries later.
        """
        _merchant_no(out_trade_no, "out_trade_no")
        try:
            await self._request(
                "POST",
                f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='')}/close",
                payload={"mchid": self.config.mchid},
            )
        except WeChatPayError as exc:
            if exc.code in ("ORDER_CLOSED", "ORDERCLOSED"):
                return "already_closed"
            if exc.code == "ORDERPAID":
                return "paid"
            if exc.code in ("ORDER_NOT_EXIST", "ORDERNOTEXIST"):
                return "not_found"
            raise
        return "closed"

    async def query_order(self, out_trade_no: str) -> dict[str, Any]:
        """The transaction as WeChat sees it (trade_state SUCCESS/NOTPAY/CLOSED/REFUND/…)."""
        _merchant_no(out_trade_no, "out_trade_no")
        status, data = await self._request(
            "GET",
            f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='')}",
            query={"mchid": self.config.mchid},
        )
        if not data or "trade_state" not in data:
            raise WeChatPayError("BAD_RESPONSE", "answer has no trade_state", status)
        return data

    async def refund(
        self,
        out_refund_no: str,
        out_trade_no: str,
        refund_fen: int,
        total_fen: int,
        reason: str | None = None,
        notify_url: str | None = None,
    ) -> dict[str, Any]:
        """Request a refund; returns WeChat's refund (status SUCCESS/PROCESSING/ABNORMAL/CLOSED).

        WeChat dedupes on out_refund_no, so retrying after any WeChatPayError (including
        NETWORK_ERROR, whose outcome is unknown) with the same numbers never refunds twice.
        """
        _merchant_no(out_refund_no, "out_refund_no")
        _merchant_no(out_trade_no, "out_trade_no")
        if not 1 <= refund_fen <= total_fen:
            raise ValueError("refund_fen must be between 1 and total_fen")
        payload: dict[str, Any] = {
            "out_trade_no": out_trade_no,
            "out_refund_no": out_refund_no,
            "amount": {"refund": refund_fen, "total": total_fen, "currency": "CNY"},
        }
        if reason:
            payload["reason"] = reason[:80]
        if notify_url:
            payload["notify_url"] = notify_url
        status, data = await self._request("POST", "/v3/refund/domestic/refunds", payload=payload)
        if not data or "status" not in data:
            raise WeChatPayError("BAD_RESPONSE", "answer has no refund status", status)
        return data

    async def query_refund(self, out_refund_no: str) -> dict[str, Any]:
        """A refund as WeChat sees it, by the merchant's refund number."""
        _merchant_no(out_refund_no, "out_refund_no")
        status, data = await self._request(
            "GET", f"/v3/refund/domestic/refunds/{quote(out_refund_no, safe='')}"
        )
        if not data or "status" not in data:
            raise WeChatPayError("BAD_RESPONSE", "answer has no refund status", status)
        return data

    def verify_notification(
        self, headers: Mapping[str, str], body: bytes, now: float | None = None
    ) -> dict[str, Any]:
        """Verify and decrypt a notification: {"event_type", "id", "resource": decrypted dict}."""
        verify_wechatpay_signature(self.config, headers, body, now)
        try:
            envelope = json.loads(body)
        except ValueError as exc:
            raise NotificationError("bad_body", "notification body is not JSON") from exc
        if not isinstance(envelope, dict) or not isinstance(envelope.get("resource"), dict):
            raise NotificationError("bad_body", "notification has no resource")
        return {
            "event_type": envelope.get("event_type"),
            "id": envelope.get("id"),
            "resource": decrypt_resource(self.config.apiv3_key, envelope["resource"]),
        }


def _error_from(response: httpx.Response) -> WeChatPayError:
    code, message, detail = f"HTTP_{response.status_code}", response.reason_phrase or "error", None
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        code = str(data.get("code") or code)
        message = str(data.get("message") or message)
        detail = data.get("detail")
    return WeChatPayError(code, message, response.status_code, detail)


# --- notification replies and resources -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotifyReply:
    """What the notify endpoint answers: WeChat retries anything but 2xx."""

    status: int
    body: dict[str, str] | None


def notify_ack() -> NotifyReply:
    """Accepted: 204 with no body."""
    return NotifyReply(204, None)


def notify_nack(message: str, status: int = 500) -> NotifyReply:
    """Refused (WeChat will retry): 4xx/5xx with {"code": "FAIL", "message": …}."""
    if not 400 <= status < 600:
        raise ValueError("a refusal must be a 4xx or 5xx status")
    return NotifyReply(status, {"code": "FAIL", "message": message})


@dataclass(frozen=True, slots=True)
class PaidNotice:
    out_trade_no: str
    transaction_id: str
    amount_total: int
    payer_total: int
    trade_state: str
    success_time: datetime | None
    payer_openid: str | None = None
    attach: str | None = None
    currency: str = "CNY"

    @property
    def paid(self) -> bool:
        return self.trade_state == "SUCCESS"


@dataclass(frozen=True, slots=True)
class RefundNotice:
    out_refund_no: str
    refund_id: str
    refund_status: str
    amount: int
    out_trade_no: str | None = None
    transaction_id: str | None = None
    success_time: datetime | None = None
    user_received_account: str | None = None


def _field(data: Mapping[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or value == "":
        raise NotificationError(
            "bad_resource", f"resource field {name!r} is missing or not a {kind.__name__}"
        )
    return value


def check_paid_resource(resource: Mapping[str, Any], mchid: str, appid: str) -> PaidNotice:
    """A decrypted TRANSACTION.* resource for this merchant and app; the caller checks the amount."""
    if resource.get("mchid") != mchid:
        raise NotificationError("mchid_mismatch", f"resource is for merchant {resource.get('mchid')!r}")
    if resource.get("appid") != appid:
        raise NotificationError("appid_mismatch", f"resource is for app {resource.get('appid')!r}")
    amount = resource.get("amount")
    if not isinstance(amount, dict):
        raise NotificationError("bad_resource", "resource has no amount")
    total = _field(amount, "total", int)
    payer = resource.get("payer") if isinstance(resource.get("payer"), dict) else {}
    return PaidNotice(
        out_trade_no=_field(resource, "out_trade_no", str),
        transaction_id=_field(resource, "transaction_id", str),
        amount_total=total,
        payer_total=amount["payer_total"] if isinstance(amount.get("payer_total"), int) else total,
        trade_state=_field(resource, "trade_state", str),
        success_time=_parse_time(resource.get("success_time")),
        payer_openid=payer.get("openid"),
        attach=resource.get("attach") or None,
        currency=str(amount.get("currency") or "CNY"),
    )


def parse_refund_resource(resource: Mapping[str, Any], mchid: str | None = None) -> RefundNotice:
    """A decrypted REFUND.* resource (amount is the refunded fen); mchid is checked when given."""
    if mchid is not None and resource.get("mchid") != mchid:
        raise NotificationError("mchid_mismatch", f"resource is for merchant {resource.get('mchid')!r}")
    amount = resource.get("amount")
    if not isinstance(amount, dict):
        raise NotificationError("bad_resource", "resource has no amount")
    return RefundNotice(
        out_refund_no=_field(resource, "out_refund_no", str),
        refund_id=_field(resource, "refund_id", str),
        refund_status=_field(resource, "refund_status", str),
        amount=_field(amount, "refund", int),
        out_trade_no=resource.get("out_trade_no"),
        transaction_id=resource.get("transaction_id"),
        success_time=_parse_time(resource.get("success_time")),
        user_received_account=user_received_account(resource),
    )


def user_received_account(refund: Mapping[str, Any]) -> str | None:
    """Where a refund's money went, as WeChat words it (a refund's answer or notice resource)."""
    value = refund.get("user_received_account")
    return value[:200] if isinstance(value, str) and value else None
