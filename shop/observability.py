"""Request ids, one structured log line per request, and Prometheus metrics.

Metrics work across several worker processes: when PROMETHEUS_MULTIPROC_DIR is set (the
`shop serve` command sets it) prometheus_client writes per-process files and /metrics
aggregates them.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import sys
import time
from typing import Any

from litestar import Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_mp

from shop.randomness import random_hex
from shop.settings import Settings

log = logging.getLogger("shop.request")
REQUEST_ID_HEADER = "x-request-id"

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # prometheus_client writes its per-process files there from the first metric on.
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

REQUESTS = Counter("shop_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY = Histogram(
    "shop_http_request_duration_seconds", "HTTP request latency", ["method", "route"], buckets=LATENCY_BUCKETS
)
POOL_SIZE = Gauge("shop_db_pool_size", "PostgreSQL pool connections open", multiprocess_mode="livesum")
POOL_IN_USE = Gauge(
    "shop_db_pool_in_use", "PostgreSQL pool connections checked out", multiprocess_mode="livesum"
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)


def _route_of(scope: Scope) -> str:
    handler = scope.get("route_handler")
    if handler is None and "path_template" in scope:  # a route served outside Litestar's router
        return scope["path_template"]
    paths = getattr(handler, "paths", None)
    if paths:
        # The route template, not the raw path: ids must not explode label cardinality.
        return scope.get("path_template") or sorted(paths)[0]
    return "unmatched"


class _Tally:
    """Request counts and latency buckets of this process, added to the Prometheus values at
    most a second later (and before every /metrics answer).

    In multi-process mode every Prometheus update is a locked write to a memory-mapped file with
    a pid check: three per request cost the crowd routes ~10% of their CPU. A tally is a few
    dict operations; the flush writes each series once.
    """

    BOUNDS = (*LATENCY_BUCKETS, float("inf"))

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}  # bucket counts, then the sum
        self.scheduled = False

    def add(self, method: str, route: str, status: int, elapsed: float) -> None:
        key = (method, route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        buckets = self.latency.get((method, route))
        if buckets is None:
            buckets = self.latency[(method, route)] = [0.0] * (len(self.BOUNDS) + 1)
        buckets[bisect.bisect_left(self.BOUNDS, elapsed)] += 1
        buckets[-1] += elapsed
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        counts, self.counts = self.counts, {}
        latency, self.latency = self.latency, {}
        for (method, route, status), n in counts.items():
            REQUESTS.labels(method, route, str(status)).inc(n)
        for (method, route), buckets in latency.items():
            child = LATENCY.labels(method, route)
            # What Histogram.observe does per value, once per bucket (prometheus_client's layout).
            for index, n in enumerate(buckets[:-1]):
                if n:
                    child._buckets[index].inc(n)
            child._sum.inc(buckets[-1])


TALLY = _Tally()


def observability_middleware(settings: Settings):
    pool_sampled = [0.0]

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode())
            request_id = (
                incoming.decode("latin-1")[:64] if incoming and incoming.isascii() else random_hex(16)
            )
            scope.setdefault("state", {})["request_id"] = request_id
            status = 500
            started = time.perf_counter()

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [
                        *message.get("headers", []),
                        (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")),
                    ]
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                route = _route_of(scope)
                method = scope.get("method", "")
                if route != "/metrics":
                    TALLY.add(method, route, status, elapsed)
                now = time.monotonic()
                if now >= pool_sampled[0] + 1.0:  # a gauge, sampled at most once a second
                    pool_sampled[0] = now
                    pool = getattr(scope["app"].state, "pool", None) if "app" in scope else None
                    if pool is not None:
                        size = pool.get_size()
                        POOL_SIZE.set(size)
                        POOL_IN_USE.set(size - pool.get_idle_size())
                if settings.log_requests:
                    log.info(
                        "request",
                        extra={
                            "fields": {
                                "request_id": request_id,
                                "method": method,
                                "path": scope.get("path"),
                                "route": route,
                                "status": status,
                                "ms": round(elapsed * 1000, 2),
                            }
                        },
                    )

        return wrapped

    return middleware


def on_app_init_observability(settings: Settings):
    def hook(app_config):
        configure_logging(settings.log_level)
        return app_config

    return hook


@get("/metrics", include_in_schema=False, tags=["health"])
async def metrics() -> Response[bytes]:
    """Prometheus text format, aggregated over every worker process when running multi-process
    (each process's requests are in it within a second)."""
    TALLY.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prom_mp.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        body = generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
