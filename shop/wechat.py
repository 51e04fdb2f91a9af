"""WeChat mini-program `code2session`: exchange a wx.login code for the shopper's openid."""

from __future__ import annotations

import logging

import httpx
import msgspec

from shop.errors import Forbidden, ShopError, Unauthorized, Unavailable
from shop.settings import Settings

log = logging.getLogger("shop.wechat")

# Login waits on this call: fail fast rather than hold a worker while WeChat is slow.
TIMEOUT = httpx.Timeout(5.0, connect=2.0)

# https://developers.weixin.qq.com/miniprogram/dev/OpenApiDoc/user-login/code2Session.html
CODE_INVALID = {40029, 40163}  # invalid code / code already used
USER_BLOCKED = {40226}  # high-risk user blocked by WeChat
BUSY = {-1, 45011}  # system busy / rate limit: worth retrying


class BadGateway(ShopError):
    status, code = 502, "auth.wechat_upstream_error"


class WechatSession(msgspec.Struct, frozen=True):
    openid: str
    session_key: str
    unionid: str | None = None


class _Reply(msgspec.Struct):
    # WeChat adds fields over time: unknown fields are ignored here, unlike in our own API.
    openid: str | None = None
    session_key: str | None = None
    unionid: str | None = None
    errcode: int = 0
    errmsg: str = ""


_reply_decoder = msgspec.json.Decoder(_Reply)


async def code2session(settings: Settings, code: str) -> WechatSession:
    """Ask WeChat who the login code belongs to; upstream trouble becomes a 502/503 with a code."""
    if not settings.wechat_appid or not settings.wechat_secret:
        raise Unavailable("WeChat login is not configured", code="auth.wechat_not_configured")
    params = {
        "appid": settings.wechat_appid,
        "secret": settings.wechat_secret,
        "js_code": code,
        "grant_type": "authorization_code",
    }
    url = settings.wechat_api_base.rstrip("/") + "/sns/jscode2session"
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            response = await client.get(url, params=params)
    except httpx.TransportError as exc:  # connect error, timeout, reset
        log.warning("code2session unreachable: %s", type(exc).__name__)
        raise _unavailable() from exc
    if response.status_code != 200:
        log.warning("code2session answered HTTP %s", response.status_code)
        raise BadGateway("WeChat login failed upstream")
    try:
        reply = _reply_decoder.decode(response.content)
    except msgspec.DecodeError as exc:
        log.warning("code2session answered a body that is not the expected JSON")
        raise BadGateway("WeChat login failed upstream") from exc
    if reply.errcode in CODE_INVALID:
        raise Unauthorized("The login code is invalid or already used", code="auth.wechat_code_invalid")
    if reply.errcode in USER_BLOCKED:
        raise Forbidden("WeChat refused this account", code="auth.wechat_user_blocked")
    if reply.errcode in BUSY:
        raise _unavailable()
    if reply.errcode != 0 or not reply.openid or not reply.session_key:
        # 40013 (bad appid), 40125 (bad secret) and the like: our configuration, not the shopper.
        log.error("code2session refused: errcode=%s errmsg=%s", reply.errcode, reply.errmsg)
        raise BadGateway("WeChat login failed upstream")
    return WechatSession(openid=reply.openid, session_key=reply.session_key, unionid=reply.unionid or None)


def _unavailable() -> Unavailable:
    return Unavailable(
        "WeChat login is temporarily unavailable",
        code="auth.wechat_unavailable",
        headers={"Retry-After": "1"},
    )
