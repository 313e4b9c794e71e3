"""Who may connect: connection limits, and how often a refusal is logged. Sans-I/O.

The server asks :meth:`Admission.check` before the WebSocket upgrade, so a client over
a limit gets an HTTP status with ``Retry-After`` (a Meeting BaaS bot then backs off;
a socket opened and closed at once resets its backoff and it retries every second),
then :meth:`admit` when its handler starts (connections opened meanwhile count too)
and :meth:`release` when it ends.
"""

from __future__ import annotations

from collections import Counter

from .errors import OverloadError

#: A refused address is logged at most once per this many seconds (always counted).
LOG_INTERVAL = 60.0
#: Addresses remembered for that; past it, those not refused for a minute are forgotten.
LOG_ADDRESSES = 10_000
#: ``Retry-After`` for a gateway at its total limit, and for one address over its own.
RETRY_FULL = 5
RETRY_PER_ADDRESS = 10


class Admission:
    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.open = 0
        self._per_address: Counter[str] = Counter()
        self._logged: dict[str, float] = {}

    def check(self, address: str) -> None:
        """Raise :class:`OverloadError` (503 or 429) if ``address`` may not connect now."""
        if self.open >= self.max_connections:
            raise OverloadError(
                f"{self.open} connections open, limit {self.max_connections}",
                retry_after=RETRY_FULL,
            )
        if self._per_address[address] >= self.max_per_address:
            raise OverloadError(
                f"{address} has {self._per_address[address]} connections open",
                status=429,
                retry_after=RETRY_PER_ADDRESS,
            )

    def admit(self, address: str) -> None:
        """Count a connection in, or raise as :meth:`check` does."""
        self.check(address)
        self.open += 1
        self._per_address[address] += 1

    def release(self, address: str) -> None:
        """An admitted connection ended."""
        self.open -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def should_log(self, address: str, now: float) -> bool:
        """Whether a refusal of ``address`` at monotonic ``now`` is logged (once a minute)."""
        if now - self._logged.get(address, -LOG_INTERVAL) < LOG_INTERVAL:
            return False
        if len(self._logged) >= LOG_ADDRESSES:
            self._logged = {a: t for a, t in self._logged.items() if now - t < LOG_INTERVAL}
        self._logged[address] = now
        return True
