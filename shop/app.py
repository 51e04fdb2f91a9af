"""create_app(settings=None) -> Litestar: lifespan, routes, error handlers, dependencies."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import swagger_ui_bundle
from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

from shop import migrate
from shop.auth_tokens import provide_admin, provide_user
from shop.db import connection_middleware, create_hot_pool, create_pool, provide_conn
from shop.errors import render_error, unaddressable_ids_name_nothing
from shop.events import load_subscribers
from shop.health import healthz, readyz
from shop.keys import Keys
from shop.observability import metrics
from shop.payments.service import build_providers, close_providers
from shop.redis import Scripts, create_redis
from shop.settings import Settings, load_settings, with_default_urls

SWAGGER_DIR = Path(swagger_ui_bundle.__file__).parent / "vendor" / "swagger-ui-4.15.5"


def route_handlers() -> list:
    from games.api import ROUTES as GAME_ROUTES
    from shop.routes import ROUTES

    return [*ROUTES, *GAME_ROUTES]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = with_default_urls(settings or load_settings())

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        redis = hot_pool = None
        try:
            async with pool.acquire() as conn:
                await migrate.ensure_migrated(conn)
            hot_pool = await create_hot_pool(settings)
            redis = create_redis(settings.redis_url)
            app.state.pool = pool
            app.state.hot_pool = hot_pool
            app.state.redis = redis
            app.state.scripts = Scripts(redis)
            app.state.providers = build_providers(settings)
            load_subscribers()  # the order-event registry complete before the first order
            # What start-up made (modules, the app and its routes, the pools) lives as long as the
            # process: the cyclic collector stops walking it on every full collection.
            gc.collect()
            gc.freeze()
            yield
        finally:
            await close_providers(getattr(app.state, "providers", {}))
            hotpath = getattr(app.state, "hotpath", None)
            if hotpath is not None:
                await hotpath.aclose()
                app.state.hotpath = None
            if redis is not None:
                await redis.aclose()
            if hot_pool is not None:
                await hot_pool.close()
            await pool.close()

    openapi = OpenAPIConfig(
        title="Private-domain mini-store API",
        version="1.0.0",
        path="/schema",
        render_plugins=[
            SwaggerRenderPlugin(
                js_url="/schema/static/swagger-ui-bundle.js",
                css_url="/schema/static/swagger-ui.css",
                standalone_preset_js_url="/schema/static/swagger-ui-standalone-preset.js",
                path="/",
                favicon='<link rel="icon" type="image/png" href="/schema/static/favicon-32x32.png">',
            )
        ],
    )
    swagger_static = create_static_files_router(
        path="/schema/static", directories=[SWAGGER_DIR], include_in_schema=False, name="swagger-static"
    )
    from games.fastpath import WHEEL_DRAW
    from shop.fastroute import fast_routes
    from shop.flash_sale.fastpath import BUY
    from shop.observability import observability_middleware, on_app_init_observability

    app = Litestar(
        route_handlers=[healthz, readyz, metrics, swagger_static, *route_handlers()],
        lifespan=[lifespan],
        dependencies={
            "conn": Provide(provide_conn),
            "user": Provide(provide_user),
            "admin": Provide(provide_admin),
        },
        exception_handlers={Exception: render_error},
        before_request=unaddressable_ids_name_nothing,
        openapi_config=openapi,
        on_app_init=[on_app_init_observability(settings)],
        debug=False,
        # Logging is ours (one JSON line per event, shop.observability); Litestar must not replace it.
        logging_config=None,
    )
    # Outermost, around Litestar's router: 404s and 405s get a request id, a log line and metrics too,
    # and the request's connection is given back however the request ends.
    # The crowd routes (flash-sale buy, wheel draw) are served in front of the router (shop/fastroute.py).
    app.asgi_handler = observability_middleware(settings)(
        fast_routes([BUY, WHEEL_DRAW])(connection_middleware(app.asgi_handler))
    )
    app.state.settings = settings
    app.state.redis_keys = Keys(settings.redis_prefix)
    return app
