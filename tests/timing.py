"""Timing tolerances for the test suite, scaled for slow machines.

Every time a test is willing to wait for something to happen goes through
:func:`scaled`, so ``GATEWAY_TESTS_TIMEOUT_FACTOR=3 make test`` gives a slow machine
three times as long on every wait (as python-websockets' suite does with
``WEBSOCKETS_TESTS_TIMEOUT_FACTOR``). Durations that are part of the behaviour under
test (audio lengths, linger, keepalive settings, real-time pacing) are never scaled.
"""

from __future__ import annotations

import math
import os

ENV = "GATEWAY_TESTS_TIMEOUT_FACTOR"


def _factor() -> float:
    raw = os.environ.get(ENV, "1.0")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{ENV} must be a positive number, not {raw!r}")
    return value


FACTOR: float = _factor()
"""How many times longer than written every wait in the suite is (default 1.0)."""


def scaled(seconds: float) -> float:
    """``seconds`` times :data:`FACTOR`: how long a test waits for something to happen."""
    return seconds * FACTOR
