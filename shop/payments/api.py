"""Payment routes: start paying an order, provider notifications, and the sandbox's simulate call."""

from __future__ import annotations

import secrets

import asyncpg
from litestar import Controller, Request, Response, post

from shop.auth_tokens import AuthUser
from shop.errors import Forbidden, NotFound
from shop.orders.service import load_order
from shop.payments.base import PaymentProvider
from shop.payments.sandbox import SandboxProvider
from shop.payments.service import PayOut, handle_paid_notify, start_payment
from shop.refunds import handle_refund_notify
from shop.schemas import Schema


class SimulateOut(Schema):
    notify_status: int
    notify_body: dict
    order_status: str


def _provider(request: Request, name: str) -> PaymentProvider:
    provider = request.app.state.providers.get(name)
    if provider is None:
        raise NotFound(f"Payment provider {name} is not configured", code="payment.unknown_provider")
    return provider


class PaymentController(Controller):
    path = "/api/v1"
    tags = ["payments"]

    @post("/orders/{order_id:int}/pay", status_code=200)
    async def pay(self, request: Request, order_id: int, user: AuthUser, conn: asyncpg.Connection) -> PayOut:
        """Open a payment for an unpaid order: the fields `wx.requestPayment` needs (or the sandbox handle)."""
        settings = request.app.state.settings
        provider = _provider(request, settings.payment_provider)
        return await start_payment(conn, settings, provider, user.id, order_id)

    @post(
        ["/payments/wechatpay/notify", "/payments/sandbox/notify"], status_code=200, include_in_schema=False
    )
    async def notify(self, request: Request, conn: asyncpg.Connection) -> Response:
        """Payment result from the provider: verified, deduplicated on its transaction id, replay-safe."""
        provider = _provider(request, request.url.path.split("/")[-2])
        status, body = await handle_paid_notify(
            conn, request.app.state.settings, provider, request.headers, await request.body()
        )
        return Response(body, status_code=status)

    @post(
        ["/payments/wechatpay/refund-notify", "/payments/sandbox/refund-notify"],
        status_code=200,
        include_in_schema=False,
    )
    async def refund_notify(self, request: Request, conn: asyncpg.Connection) -> Response:
        provider = _provider(request, request.url.path.split("/")[-2])
        status, body = await handle_refund_notify(conn, provider, request.headers, await request.body())
        return Response(body, status_code=status)

    @post("/payments/sandbox/{order_no:str}/simulate", status_code=200)
    async def simulate(
        self, request: Request, order_no: str, user: AuthUser, conn: asyncpg.Connection
    ) -> SimulateOut:
        """Sandbox only (refused in production): the sandbox pays the order and sends its signed notification."""
        settings = request.app.state.settings
        if settings.env == "production":
            raise Forbidden("The sandbox is disabled in production", code="payment.sandbox_disabled")
        sandbox: SandboxProvider = _provider(request, "sandbox")
        order = await conn.fetchrow(
            "select id from orders where order_no = $1 and user_id = $2", order_no, user.id
        )
        if order is None:
            raise NotFound("Order not found", code="order.not_found")
        payment = await conn.fetchrow(
            """select out_trade_no, amount from payments
               where order_id = $1 and provider = 'sandbox' and status = 'open' order by id desc limit 1""",
            order["id"],
        )
        if payment is None:
            opened = await start_payment(conn, settings, sandbox, user.id, order["id"])
            payment = {"out_trade_no": opened.out_trade_no, "amount": opened.amount}
        headers, body = sandbox.sign_notification(
            {
                "out_trade_no": payment["out_trade_no"],
                "transaction_id": f"SBX{secrets.token_hex(10).upper()}",
                "amount": payment["amount"],
                "trade_state": "SUCCESS",
            }
        )
        status, ack = await handle_paid_notify(conn, settings, sandbox, headers, body)
        current = await load_order(conn, order["id"], user.id)
        return SimulateOut(notify_status=status, notify_body=ack, order_status=current.status)
