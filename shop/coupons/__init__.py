"""Coupons: templates, claiming, grants, redemption."""
