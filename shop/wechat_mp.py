"""Mini-program server API: the shared access token (stable_token) and shipping-info upload.

Every API process shares one access token through Redis. One process refreshes it under a short
lock while the others wait for the cached value, so a crowd of processes calls stable_token once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import redis.asyncio as aioredis

from shop.keys import Keys
from shop.payments.wechatpay import china_time
from shop.settings import Settings

# Errcodes that mean "this access token is no longer good": refresh once and retry.
TOKEN_REJECTED = frozenset({40001, 40014, 42001})
REFRESH_LOCK_MS = 10_000  # longer than one stable_token call can take (timeout below)
WAIT_FOR_REFRESH_S = 12.0
POLL_S = 0.05
TOKEN_EARLY_EXPIRY_S = 300
HTTP_TIMEOUT = httpx.Timeout(5.0, connect=3.0)


class MiniProgramError(Exception):
    """The mini-program API refused (`errcode`, `errmsg` as WeChat sent them; -1 for no usable answer)."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"{errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


class MiniProgramClient:
    """Calls to {wechat_api_base} with a Redis-cached access token."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        keys: Keys,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not settings.wechat_appid or not settings.wechat_secret:
            raise ValueError("SHOP_WECHAT_APPID and SHOP_WECHAT_SECRET must be set for the mini-program API")
        self.appid = settings.wechat_appid
        self._secret = settings.wechat_secret
        self.api_base = settings.wechat_api_base.rstrip("/")
        self.redis = redis
        self._token_key = keys.wechat_access_token(self.appid)
        self._lock_key = keys.wechat_access_token_lock(self.appid)
        self._http = http
        self._owns_http = http is None

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> MiniProgramClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT)
        return self._http

    async def _post(
        self, url: str, payload: Mapping[str, Any], params: Mapping[str, str] | None = None
    ) -> dict:
        try:
            response = await self._client().post(url, json=payload, params=params)
        except httpx.HTTPError as exc:
            raise MiniProgramError(-1, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise MiniProgramError(-1, f"HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError as exc:
            raise MiniProgramError(-1, "answer is not JSON") from exc
        if not isinstance(data, dict):
            raise MiniProgramError(-1, "answer is not a JSON object")
        return data

    async def _fetch_stable_token(self, force_refresh: bool) -> tuple[str, int]:
        data = await self._post(
            f"{self.api_base}/cgi-bin/stable_token",
            {
                "grant_type": "client_credential",
                "appid": self.appid,
                "secret": self._secret,
                "force_refresh": force_refresh,
            },
        )
        if data.get("errcode"):
            raise MiniProgramError(int(data["errcode"]), str(data.get("errmsg", "")))
        token, expires_in = data.get("access_token"), data.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(expires_in, int):
            raise MiniProgramError(-1, "stable_token answer has no access_token/expires_in")
        return token, expires_in

    async def _cached(self) -> str | None:
        value = await self.redis.get(self._token_key)
        return value.decode() if isinstance(value, bytes) else value

    async def access_token(self, force_refresh: bool = False) -> str:
        """The shared access token; force_refresh replaces the cached one (the API just rejected it)."""
        rejected = await self._cached() if force_refresh else None
        return await self._obtain(rejected)

    async def _obtain(self, rejected: str | None) -> str:
        deadline = time.monotonic() + WAIT_FOR_REFRESH_S
        while True:
            cached = await self._cached()
            if cached and cached != rejected:
                return cached
            owner = secrets.token_hex(8)
            if await self.redis.set(self._lock_key, owner, nx=True, px=REFRESH_LOCK_MS):
                try:
                    return await self._refresh(rejected)
                finally:
                    # The lock outlives any refresh (HTTP timeout < lock TTL), so it is still ours;
                    # the check guards a process that stalled past the TTL.
                    held = await self.redis.get(self._lock_key)
                    if (held.decode() if isinstance(held, bytes) else held) == owner:
                        await self.redis.delete(self._lock_key)
            if time.monotonic() > deadline:
                raise MiniProgramError(
                    -1, "timed out waiting for another process to refresh the access token"
                )
            await asyncio.sleep(POLL_S)

    async def _refresh(self, rejected: str | None) -> str:
        # Another process may have refreshed between our read and taking the lock.
        cached = await self._cached()
        if cached and cached != rejected:
            return cached
        token, expires_in = await self._fetch_stable_token(force_refresh=False)
        if rejected is not None and token == rejected:
            # stable_token still hands out the token the API refused: force a new one
            # (WeChat rate-limits force_refresh, so it is only used when really needed).
            token, expires_in = await self._fetch_stable_token(force_refresh=True)
        await self.redis.set(self._token_key, token, ex=max(60, expires_in - TOKEN_EARLY_EXPIRY_S))
        return token

    async def call(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST a server API with the access token; a rejected token is refreshed once and the call retried."""
        token = await self.access_token()
        for attempt in range(2):
            data = await self._post(f"{self.api_base}{path}", payload, params={"access_token": token})
            errcode = int(data.get("errcode") or 0)
            if errcode == 0:
                return data
            if errcode in TOKEN_REJECTED and attempt == 0:
                token = await self._obtain(rejected=token)
                continue
            raise MiniProgramError(errcode, str(data.get("errmsg", "")))
        raise AssertionError("unreachable")

    async def upload_shipping_info(
        self,
        transaction_id: str,
        payer_openid: str,
        shipments: Sequence[Mapping[str, Any]],
        logistics_type: int = 1,
        delivery_mode: int = 1,
        is_all_delivered: bool | None = None,
        upload_time: datetime | None = None,
    ) -> None:
        """Report a shipment of a WeChat Pay transaction (发货信息录入); raises MiniProgramError on errcode != 0.

        shipments: [{"express_company" (or "carrier"), "tracking_no", "item_desc", optional "contact"}].
        logistics_type: 1 express, 2 same-city, 3 virtual goods, 4 pick-up. delivery_mode: 1 one
        parcel (exactly one shipment), 2 split into several parcels (is_all_delivered required).
        """
        if logistics_type not in (1, 2, 3, 4):
            raise ValueError("logistics_type must be 1, 2, 3 or 4")
        if delivery_mode == 1 and len(shipments) != 1:
            raise ValueError("delivery_mode 1 (unified) takes exactly one shipment")
        if delivery_mode == 2:
            if not 1 <= len(shipments) <= 10 or is_all_delivered is None:
                raise ValueError("delivery_mode 2 (split) takes 1-10 shipments and is_all_delivered")
        elif delivery_mode != 1:
            raise ValueError("delivery_mode must be 1 or 2")
        shipping_list = []
        for shipment in shipments:
            item_desc = str(shipment.get("item_desc") or "").strip()[:120]
            if not item_desc:
                raise ValueError("every shipment needs item_desc")
            entry: dict[str, Any] = {"item_desc": item_desc}
            company = shipment.get("express_company") or shipment.get("carrier")
            tracking_no = shipment.get("tracking_no")
            if logistics_type == 1 and not (company and tracking_no):
                raise ValueError("express shipments need express_company and tracking_no")
            if company:
                entry["express_company"] = str(company)
            if tracking_no:
                entry["tracking_no"] = str(tracking_no)
            if shipment.get("contact"):
                entry["contact"] = dict(shipment["contact"])
            shipping_list.append(entry)
        payload: dict[str, Any] = {
            "order_key": {"order_number_type": 2, "transaction_id": transaction_id},
            "logistics_type": logistics_type,
            "delivery_mode": delivery_mode,
            "shipping_list": shipping_list,
            "upload_time": china_time(upload_time or datetime.now(UTC), timespec="milliseconds"),
            "payer": {"openid": payer_openid},
        }
        if delivery_mode == 2:
            payload["is_all_delivered"] = bool(is_all_delivered)
        await self.call("/wxa/sec/order/upload_shipping_info", payload)
