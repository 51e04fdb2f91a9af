"""The wechat login provider against a small fake code2session server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import httpx
import msgspec
import pytest

from shop import wechat
from tests.shop.test_auth import client_for

APP_A, APP_B, SECRET = "wx-shop-a", "wx-shop-b", "fake-secret"


class FakeCode2Session(BaseHTTPRequestHandler):
    """js_code decides the answer: code-<name>, nounion-<name>, or one of the failure codes below."""

    requests: list[dict[str, str]] = []

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        FakeCode2Session.requests.append({"path": url.path, **query})
        code, appid = query.get("js_code", ""), query.get("appid", "")
        status, reply = 200, {"errcode": 40029, "errmsg": "invalid code"}
        if url.path != "/sns/jscode2session" or query.get("grant_type") != "authorization_code":
            status, reply = 404, {}
        elif query.get("secret") != SECRET:
            reply = {"errcode": 40125, "errmsg": "invalid appsecret"}
        elif code.startswith("code-"):
            name = code.removeprefix("code-")
            reply = {"openid": f"o-{appid}-{name}", "session_key": "sk==", "unionid": f"u-{name}"}
        elif code.startswith("nounion-"):
            reply = {"openid": f"o-{appid}-{code.removeprefix('nounion-')}", "session_key": "sk=="}
        elif code == "used":
            reply = {"errcode": 40163, "errmsg": "code been used"}
        elif code == "busy":
            reply = {"errcode": -1, "errmsg": "system error"}
        elif code == "blocked":
            reply = {"errcode": 40226, "errmsg": "risky user"}
        elif code == "http500":
            status = 500
        elif code == "slow":
            time.sleep(1.0)
        body = b"<html>oops</html>" if code in ("garbage", "http500") else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")  # as WeChat really labels it
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_wechat() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCode2Session)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def wechat_settings(settings, fake_wechat):
    return msgspec.structs.replace(
        settings, wechat_appid=APP_A, wechat_secret=SECRET, wechat_api_base=fake_wechat
    )


async def wechat_login(client: httpx.AsyncClient, code: str, **extra: object) -> httpx.Response:
    return await client.post("/api/v1/auth/login", json={"provider": "wechat", "code": code, **extra})


async def test_wechat_login_stores_the_identity(wechat_settings, db):
    FakeCode2Session.requests.clear()
    async with client_for(wechat_settings) as client:
        r = await wechat_login(client, "code-alice", appid=APP_A, channel="qr")
        assert r.status_code == 200, r.text
        assert "session_key" not in r.text and "sk==" not in r.text
        user = r.json()["user"]
        assert user["is_new"] is True
        me = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"})
        assert me.json()["id"] == user["id"]
    assert FakeCode2Session.requests[-1] == {
        "path": "/sns/jscode2session",
        "appid": APP_A,
        "secret": SECRET,
        "js_code": "code-alice",
        "grant_type": "authorization_code",
    }
    row = await db.fetchrow("select * from user_identities")
    assert (row["user_id"], row["provider"], row["appid"], row["openid"], row["unionid"]) == (
        user["id"],
        "wechat",
        APP_A,
        "o-wx-shop-a-alice",
        "u-alice",
    )


async def test_one_unionid_is_one_shopper_across_mini_programs(wechat_settings, db):
    async with client_for(wechat_settings) as client:
        first = (await wechat_login(client, "code-alice")).json()["user"]
    other_app = msgspec.structs.replace(wechat_settings, wechat_appid=APP_B)
    async with client_for(other_app) as client:
        second = (await wechat_login(client, "code-alice")).json()["user"]
        stranger = (await wechat_login(client, "code-bob")).json()["user"]
    assert second == {**first, "is_new": False}
    assert stranger["id"] != first["id"]
    rows = await db.fetch(
        "select appid, openid from user_identities where user_id = $1 order by id", first["id"]
    )
    assert [(r["appid"], r["openid"]) for r in rows] == [
        (APP_A, "o-wx-shop-a-alice"),
        (APP_B, "o-wx-shop-b-alice"),
    ]
    assert await db.fetchval("select count(*) from users") == 2


async def test_unionid_is_filled_in_once_wechat_sends_it(wechat_settings, db):
    async with client_for(wechat_settings) as client:
        first = (await wechat_login(client, "nounion-carol")).json()["user"]
        assert await db.fetchval("select unionid from user_identities") is None
        again = (await wechat_login(client, "code-carol")).json()["user"]
    assert again["id"] == first["id"]
    assert await db.fetchval("select unionid from user_identities") == "u-carol"


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("bad", 401, "auth.wechat_code_invalid"),
        ("used", 401, "auth.wechat_code_invalid"),
        ("blocked", 403, "auth.wechat_user_blocked"),
        ("busy", 503, "auth.wechat_unavailable"),
        ("http500", 502, "auth.wechat_upstream_error"),
        ("garbage", 502, "auth.wechat_upstream_error"),
    ],
)
async def test_wechat_refusals_and_failures(wechat_settings, db, code, status, error):
    async with client_for(wechat_settings) as client:
        r = await wechat_login(client, code)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == error
    assert await db.fetchval("select count(*) from users") == 0


async def test_wrong_secret_is_an_upstream_error_not_the_shoppers(wechat_settings, db):
    async with client_for(msgspec.structs.replace(wechat_settings, wechat_secret="rotated")) as client:
        r = await wechat_login(client, "code-alice")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "auth.wechat_upstream_error"


async def test_unreachable_or_slow_wechat_is_unavailable(wechat_settings, db, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with client_for(msgspec.structs.replace(wechat_settings, wechat_api_base=closed)) as client:
        r = await wechat_login(client, "code-alice")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "auth.wechat_unavailable"
    assert r.headers["retry-after"] == "1"

    monkeypatch.setattr(wechat, "TIMEOUT", httpx.Timeout(0.2))
    async with client_for(wechat_settings) as client:
        r = await wechat_login(client, "slow")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "auth.wechat_unavailable"


async def test_unconfigured_or_foreign_appid_is_refused(wechat_settings, settings, db):
    async with client_for(wechat_settings) as client:
        r = await wechat_login(client, "code-alice", appid=APP_B)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "auth.unknown_appid"
    async with client_for(msgspec.structs.replace(settings, wechat_appid="", wechat_secret="")) as client:
        r = await wechat_login(client, "code-alice")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "auth.wechat_not_configured"
    assert await db.fetchval("select count(*) from users") == 0


async def test_concurrent_first_logins_from_two_mini_programs_make_one_shopper(wechat_settings, db):
    other_app = msgspec.structs.replace(wechat_settings, wechat_appid=APP_B)
    async with client_for(wechat_settings) as a, client_for(other_app) as b:
        responses = await asyncio.gather(*(wechat_login(c, "code-dave") for c in (a, b, a, b, a, b)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["user"]["id"] for r in responses}) == 1
    assert sum(r.json()["user"]["is_new"] for r in responses) == 1
    assert await db.fetchval("select count(*) from users") == 1
    assert await db.fetchval("select count(*) from user_identities") == 2
