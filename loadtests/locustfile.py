"""Locust entry point: `python -m loadtests.rush` runs it headless and checks the invariants afterwards."""

from loadtests.scenarios.live_rush import LiveStreamShopper

__all__ = ["LiveStreamShopper"]
