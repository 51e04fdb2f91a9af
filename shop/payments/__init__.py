"""Payments: provider protocol clients (wechatpay) and the payment service built on them."""
