"""One error envelope for everything: domain errors, validation, unknown routes, and crashes."""

from __future__ import annotations

import base64
import errno
import json
import logging
import re
import socket

from litestar import get


async def test_validation_errors_are_422_with_field_details(client, make_user):
    _, headers = await make_user()
    r = await client.post(
        "/api/v1/checkout/preview", json={"items": [{"sku_id": "x", "qty": 1}]}, headers=headers
    )
    assert r.status_code == 422
    body = r.json()["error"]
    assert body["code"] == "validation_failed"
    assert body["details"] == [{"field": "items[0].sku_id", "message": "Expected `int`, got `str`"}]
    r = await client.post(
        "/api/v1/checkout/preview", json={"items": [{"sku_id": 1, "qty": 1}], "coupon": 1}, headers=headers
    )
    assert r.status_code == 422 and "coupon" in r.json()["error"]["details"][0]["message"]
    r = await client.post("/api/v1/checkout/preview", content=b"{not json", headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed"
    r = await client.get("/api/v1/orders", params={"limit": 0}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "limit"


async def test_unexpected_errors_leak_nothing(app, client):
    @get("/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("select secret_column from internal_table")

    app.register(boom)
    r = await client.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "Internal server error"}}
    assert "secret_column" not in r.text and "Traceback" not in r.text


async def test_ids_beyond_bigint_name_nothing_on_every_route(app, client, admin_headers, make_user):
    """Every route with an integer path parameter: an id PostgreSQL cannot hold is answered like
    any unknown id (the route's own 404), never with a 500 from the driver."""
    from litestar.routes import HTTPRoute

    _, shopper = await make_user()
    paths = []
    for route in app.routes:
        if isinstance(route, HTTPRoute) and ":int}" in route.path:
            paths.extend((method, route.path) for method in route.methods - {"HEAD", "OPTIONS"})
    assert len(paths) > 40  # the walk found the API's routes
    for big in (2**63, -(2**63) - 1, 10**30):
        for method, template in sorted(paths):
            path = re.sub(r"\{\w+:int\}", str(big), re.sub(r"\{\w+:str\}", "x", template))
            headers = admin_headers if path.startswith("/api/v1/admin/") else shopper
            r = await client.request(method, path, headers=headers, json={})
            if method in ("GET", "DELETE"):
                assert r.status_code == 404, (method, path, r.status_code, r.text)
            else:  # a body the route refuses may be told so before the id is looked up
                assert r.status_code in (404, 422), (method, path, r.status_code, r.text)
            if r.status_code == 404 and ":str}" not in template:  # (an "x" action is unknown first)
                assert r.json()["error"]["code"].endswith("not_found"), (method, path, r.text)


async def test_an_unreachable_database_is_503_with_retry_after(app, client, make_user):
    """PostgreSQL down (or failing over): a retryable 503, not a 500; served again once it is back."""
    import asyncpg

    _, headers = await make_user()
    pool = app.state.pool
    app.state.pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/gone", min_size=0)
    try:
        r = await client.get("/api/v1/orders", headers=headers)
    finally:
        dead, app.state.pool = app.state.pool, pool
        await dead.close()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "service_unavailable" and r.headers["retry-after"] == "1"
    assert (await client.get("/api/v1/orders", headers=headers)).status_code == 200


async def test_only_outages_are_503(app, client):
    """Losing the connection to a store is retryable (503); what says something about the request
    or the code (a cancelled statement, a refused password, a file error) stays a 500."""
    import asyncpg
    from redis.exceptions import (
        AuthenticationError,
        ClusterDownError,
        ReadOnlyError,
        SlotNotCoveredError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError

    raised = {
        "redis-down": RedisConnectionError("Connection refused"),
        "failover": ReadOnlyError("You can't write against a read only replica."),
        "pg-reset": ConnectionResetError("reset by peer"),
        "pg-shutdown": asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        "dns": socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        "no-such-host": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        "no-route": OSError(errno.EHOSTUNREACH, "Connect call failed ('10.9.9.9', 5432)"),
        "every-address": OSError(
            "Multiple exceptions: [Errno 111] Connect call failed ('::1', 6379, 0, 0), ..."
        ),
        "cluster-down": ClusterDownError("CLUSTERDOWN The cluster is down"),
        "try-again": TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        "slot-not-covered": SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
        "cancelled": asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        "password": AuthenticationError("invalid password"),
        "file": FileNotFoundError("missing.txt"),
    }

    @get("/raise/{what:str}", sync_to_thread=False)
    def raise_it(what: str) -> None:
        raise raised[what]

    app.register(raise_it)
    statuses = {what: (await client.get(f"/raise/{what}")).status_code for what in raised}
    assert statuses == {
        "redis-down": 503,
        "failover": 503,
        "pg-reset": 503,
        "pg-shutdown": 503,
        "dns": 503,
        "no-such-host": 500,
        "no-route": 503,
        "every-address": 503,
        "cluster-down": 503,
        "try-again": 503,
        "slot-not-covered": 503,
        "cancelled": 500,
        "password": 500,
        "file": 500,
    }


async def test_one_structured_log_line_per_request(settings, db, caplog):
    import httpx
    import msgspec

    from shop.app import create_app
    from shop.observability import JsonFormatter
    from tests.conftest import running

    app = create_app(msgspec.structs.replace(settings, log_requests=True))
    caplog.set_level(logging.INFO, logger="shop.request")
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
            r = await client.get("/healthz", headers={"X-Request-Id": "req-42"})
            generated = await client.get("/api/v1/nothing-here")
    assert r.headers["x-request-id"] == "req-42"
    records = [rec for rec in caplog.records if rec.name == "shop.request"]
    assert len(records) == 2
    first = json.loads(JsonFormatter().format(records[0]))
    assert first["request_id"] == "req-42" and first["route"] == "/healthz" and first["status"] == 200
    assert first["method"] == "GET" and first["ms"] >= 0
    second = json.loads(JsonFormatter().format(records[1]))
    assert second["request_id"] == generated.headers["x-request-id"] and second["status"] == 404


async def test_bad_cursors_and_out_of_range_id_filters_are_422_on_every_list(
    client, make_user, admin_headers
):
    _, headers = await make_user()

    def cursor(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    lists = [
        ("/api/v1/orders", headers),
        ("/api/v1/coupons", headers),
        ("/api/v1/points", headers),
        ("/api/v1/games/draws", headers),
        ("/api/v1/games/prizes", headers),
        ("/api/v1/admin/orders", admin_headers),
        ("/api/v1/admin/refunds", admin_headers),
        ("/api/v1/admin/games", admin_headers),
        ("/api/v1/admin/flash-sales", admin_headers),
    ]
    for url, h in lists:
        assert (await client.get(url, headers=h)).status_code == 200, url
        for raw in (b'["a"]', b"[1.5]", b"[1e30]", b"[99999999999999999999]", b"[true]", b"[null]"):
            r = await client.get(url, params={"cursor": cursor(raw)}, headers=h)
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_cursor"), (url, raw, r.text)
    for url, name, h in [
        ("/api/v1/admin/orders", "user_id", admin_headers),
        ("/api/v1/admin/refunds", "order_id", admin_headers),
        ("/api/v1/admin/products", "category_id", admin_headers),
        ("/api/v1/products", "category_id", headers),
    ]:
        for value in ("99999999999999999999", "0"):
            r = await client.get(url, params={name: value}, headers=h)
            assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_failed"), (
                url,
                value,
                r.text,
            )
