"""Every domain's route handlers, collected for create_app."""

from __future__ import annotations

ROUTES: list = []
