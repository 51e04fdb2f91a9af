"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from shop import migrate


@get("/healthz", include_in_schema=True, tags=["health"], sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok"}


async def readiness(state: Any) -> dict[str, str]:
    """Each dependency's state: 'ok' or the reason it is not ready."""
    checks: dict[str, str] = {}
    try:
        async with state.pool.acquire(timeout=2) as conn:
            await conn.fetchval("select 1")
            missing = await migrate.pending(conn)
        checks["postgres"] = "ok"
        checks["migrations"] = (
            "ok" if not missing else f"{len(missing)} pending migration(s): run `shop migrate`"
        )
    except Exception as exc:
        checks["postgres"] = f"unreachable: {type(exc).__name__}"
        checks["migrations"] = "unknown"
    try:
        await state.redis.ping()
        checks["redis"] = "ok"
        try:
            policy = (await state.redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except Exception as exc:
            policy = None
            checks["redis_eviction"] = f"cannot read maxmemory-policy: {type(exc).__name__}"
        if policy is not None:
            checks["redis_eviction"] = (
                "ok" if policy == "noeviction" else f"maxmemory-policy is {policy}, must be noeviction"
            )
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    return checks


@get("/readyz", tags=["health"])
async def readyz(request: Request) -> Response[dict[str, Any]]:
    """Ready when PostgreSQL and Redis answer, migrations are current and Redis never evicts."""
    checks = await readiness(request.app.state)
    ready = all(v == "ok" for v in checks.values())
    return Response(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )
