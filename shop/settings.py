"""Settings: one frozen Struct loaded from SHOP_* environment variables and checked at start."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

Env = Literal["development", "test", "production"]

# Development keys are public knowledge: production refuses to start with them.
DEV_JWT_KEYS = "dev1:dev-only-jwt-secret-change-me-0123456789abcdef"


class SettingsError(Exception):
    """A SHOP_* variable is missing or invalid; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    env: Env = "development"
    database_url: str = ""
    redis_url: str = ""
    redis_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,40}$")] = "shop"
    db_pool_min: Annotated[int, msgspec.Meta(ge=1, le=200)] = 2
    db_pool_max: Annotated[int, msgspec.Meta(ge=1, le=500)] = 20
    # "kid:secret,kid:secret"; the first key signs, every listed key verifies (rotation).
    jwt_keys: str = DEV_JWT_KEYS
    jwt_issuer: str = "shop"
    access_token_ttl: Annotated[int, msgspec.Meta(ge=30, le=86400)] = 900
    refresh_token_ttl: Annotated[int, msgspec.Meta(ge=300, le=180 * 86400)] = 30 * 86400
    timezone: str = "Asia/Shanghai"
    pay_deadline_minutes: Annotated[int, msgspec.Meta(ge=1, le=24 * 60)] = 15
    auto_confirm_days: Annotated[int, msgspec.Meta(ge=1, le=60)] = 10
    wechat_appid: str = ""
    wechat_secret: str = ""
    wechat_api_base: str = "https://api.weixin.qq.com"
    # Payments. The provider new payment attempts use: sandbox (demo, load tests) or wechatpay.
    payment_provider: Literal["sandbox", "wechatpay"] = "sandbox"
    sandbox_secret: str = "sandbox-notify-secret-0123456789"
    # WeChat Pay API v3 (JSAPI for mini-programs). PEM values may be given inline or as @/path/to/file.
    wechatpay_mchid: str = ""
    wechatpay_appid: str = ""
    wechatpay_serial_no: str = ""
    wechatpay_private_key: str = ""
    wechatpay_apiv3_key: str = ""
    # "SERIAL=@/path.pem;SERIAL2=@/other.pem": WeChat Pay public keys or platform certificates by serial.
    wechatpay_public_keys: str = ""
    wechatpay_base_url: str = "https://api.mch.weixin.qq.com"
    wechatpay_notify_url: str = ""
    wechatpay_notify_tolerance: Annotated[int, msgspec.Meta(ge=10, le=3600)] = 300
    trusted_proxies: str = "127.0.0.1,::1"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_requests: bool = True
    data_dir: str = ".data"
    # Flash sales. The purchase token's HMAC key (empty: derived from the JWT signing key).
    flash_token_secret: str = ""
    flash_token_ttl: Annotated[int, msgspec.Meta(ge=10, le=86400)] = 1800
    # The crowd routes (flash-sale buy, wheel draw) served straight from ASGI (shop/fastroute.py);
    # false: by their Litestar routes.
    fast_routes: bool = True
    # How long an API process answers "sold out" from memory before asking Redis again.
    flash_sold_out_seconds: Annotated[float, msgspec.Meta(ge=0, le=10)] = 1.0
    # Fault injection for tests: pause this long between the Lua reservation and the PostgreSQL
    # write. Ignored when env is production (shop/flash_sale/service.py).
    flash_fault_pause_seconds: Annotated[float, msgspec.Meta(ge=0, le=600)] = 0.0

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise SettingsError(f"SHOP_TIMEZONE: unknown time zone {self.timezone!r}") from exc
        if self.db_pool_min > self.db_pool_max:
            raise SettingsError("SHOP_DB_POOL_MIN must not exceed SHOP_DB_POOL_MAX")
        keys = parse_jwt_keys(self.jwt_keys)
        if self.payment_provider == "wechatpay" and not self.wechatpay_mchid:
            raise SettingsError(
                "SHOP_PAYMENT_PROVIDER=wechatpay needs SHOP_WECHATPAY_MCHID and the merchant's "
                "other SHOP_WECHATPAY_* credentials"
            )
        if self.env == "production":
            if self.flash_fault_pause_seconds:
                raise SettingsError(
                    "SHOP_FLASH_FAULT_PAUSE_SECONDS is a test-only fault injection, refused in production"
                )
            if self.payment_provider == "sandbox":
                raise SettingsError("SHOP_PAYMENT_PROVIDER=sandbox is refused in production")
            if self.jwt_keys == DEV_JWT_KEYS:
                raise SettingsError(
                    "SHOP_JWT_KEYS must be set in production (the default is a public dev key)"
                )
            if any(len(secret) < 32 for secret in keys.values()):
                raise SettingsError(
                    "SHOP_JWT_KEYS: every secret must be at least 32 characters in production"
                )

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def signing_kid(self) -> str:
        return next(iter(parse_jwt_keys(self.jwt_keys)))

    @property
    def jwt_key_map(self) -> Mapping[str, str]:
        return parse_jwt_keys(self.jwt_keys)


@functools.lru_cache(maxsize=16)
def parse_jwt_keys(raw: str) -> Mapping[str, str]:
    keys: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        kid, sep, secret = part.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", kid) or len(secret) < 16:
            raise SettingsError(
                "SHOP_JWT_KEYS must be 'kid:secret[,kid:secret…]' with kid of [A-Za-z0-9_-] and secrets of 16+ chars"
            )
        keys[kid] = secret
    if not keys:
        raise SettingsError("SHOP_JWT_KEYS must name at least one key")
    return MappingProxyType(keys)  # cached and shared: read-only


def load_settings(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Build Settings from SHOP_* variables (plus explicit overrides), with a clear error for a bad value."""
    environ = os.environ if environ is None else environ
    fields = set(Settings.__struct_fields__)
    raw: dict[str, object] = {}
    for name, value in environ.items():
        if name.startswith("SHOP_"):
            field = name[5:].lower()
            if field in fields:
                raw[field] = value
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = re.search(r"at `\$\.(\w+)`", text)
        var = f"SHOP_{match.group(1).upper()}" if match else "settings"
        raise SettingsError(f"{var}: {text.split(' - at')[0]}") from exc


DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/shop"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def with_default_urls(settings: Settings) -> Settings:
    """Fill in the local servers when no URL is configured (the embedded default is `shop dev`'s job)."""
    return msgspec.structs.replace(
        settings,
        database_url=settings.database_url or DEFAULT_DATABASE_URL,
        redis_url=settings.redis_url or DEFAULT_REDIS_URL,
    )
