from __future__ import annotations

import re

import asyncpg
import pytest

from shop.app import create_app
from shop.embedded import replace_dbname
from shop.migrate import NotMigrated


async def test_healthz(client):
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert len(r.headers["x-request-id"]) >= 8


async def test_readyz_reports_every_check(client):
    r = await client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"postgres": "ok", "migrations": "ok", "redis": "ok", "redis_eviction": "ok"}


async def test_readyz_not_ready_when_redis_evicts(client, app):
    redis = app.state.redis
    old = (await redis.config_get("maxmemory-policy"))["maxmemory-policy"]
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        r = await client.get("/readyz")
    finally:
        await redis.config_set("maxmemory-policy", old)
    assert r.status_code == 503
    assert r.json()["checks"]["redis_eviction"] == "maxmemory-policy is allkeys-lru, must be noeviction"


async def test_request_id_is_echoed(client):
    r = await client.get("/healthz", headers={"X-Request-Id": "abc123"})
    assert r.headers["x-request-id"] == "abc123"


async def test_unknown_route_is_404_envelope(client):
    r = await client.get("/api/v1/nope")
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "not_found", "message": "No such resource"}}


async def test_wrong_method_is_405_envelope(client):
    r = await client.post("/healthz")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


async def test_openapi_and_offline_docs(client):
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    assert r.json()["info"]["title"] == "Private-domain mini-store API"
    page = await client.get("/schema")
    assert page.status_code == 200
    assert "/schema/static/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    js = await client.get("/schema/static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    css = await client.get("/schema/static/swagger-ui.css")
    assert css.status_code == 200


async def test_metrics_counts_requests_per_route(client):
    await client.get("/healthz")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert 'shop_http_requests_total{method="GET",route="/healthz",status="200"}' in r.text
    assert "shop_db_pool_size" in r.text


async def test_refuses_to_start_unmigrated(servers, settings):
    import msgspec

    admin = await asyncpg.connect(servers.database_admin_url)
    name = f"shop_unmigrated_{settings.redis_prefix}"
    await admin.execute(f'create database "{name}"')
    try:
        unmigrated = msgspec.structs.replace(
            settings, database_url=replace_dbname(settings.database_url, name)
        )
        app = create_app(unmigrated)
        with pytest.raises(BaseException) as info:
            async with app.lifespan():
                pass
        exc = info.value
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        assert isinstance(exc, NotMigrated)
        assert "run `shop migrate`" in str(exc)
    finally:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


async def test_latency_histogram_counts_every_request_in_its_bucket(client):
    for _ in range(3):
        await client.get("/healthz")
    text = (await client.get("/metrics")).text

    def value(name: str, labels: str) -> float:
        return float(
            re.search(rf"shop_http_request_duration_seconds_{name}\{{{labels}\}} (\S+)", text).group(1)
        )

    where = 'method="GET",route="/healthz"'
    count = value("count", where)
    assert count == value("bucket", f'le="\\+Inf",{where}') >= 3
    assert value("bucket", f'le="0.001",{where}') <= value("bucket", f'le="10.0",{where}') == count
    assert value("sum", where) > 0
