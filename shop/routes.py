"""Every domain's route handlers, collected for create_app."""

from __future__ import annotations

from shop import auth, points, refunds, users
from shop.catalog import api as catalog_api  # Engineer B: catalog
from shop.coupons import api as coupons_api
from shop.flash_sale import api as flash_sale_api
from shop.orders import api as orders_api
from shop.payments import api as payments_api

ROUTES: list = [
    orders_api.CheckoutController,
    orders_api.AdminOrderController,
    payments_api.PaymentController,
    refunds.RefundController,
    refunds.AdminRefundController,
    auth.ShopperAuthController,
    auth.AdminAuthController,
    users.MeController,
    *catalog_api.ROUTES,
    *coupons_api.ROUTES,
    *flash_sale_api.ROUTES,
    *points.ROUTES,
]
