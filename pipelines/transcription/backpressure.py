"""What a slow transcript reader loses, and when it is too slow to keep: sans I/O.

:class:`MessageQueue` bounds what waits for one subscriber (partials give way first);
:class:`LagWatch` measures how far behind the subscriber reads, by pings, against an
injected clock. :mod:`.subscribers` drives both over real connections.
"""

from __future__ import annotations

import enum
from collections import deque

#: The default ``max_lag`` (``GATEWAY_SUBSCRIBER_MAX_LAG``), seconds.
DEFAULT_MAX_LAG = 10.0
#: The gateway's keepalive (:data:`gateway.config.KEEPALIVE_TIMEOUT`) fails a connection
#: whose pong is 20 s late with 1011. :class:`LagWatch` must act first, so ``max_lag`` is
#: at most :data:`MAX_LAG_LIMIT` (checked by ``Settings.validate``): a reader that stops
#: reading is dropped within ``1.5 * MAX_LAG_LIMIT`` = 18 s, 2 s before the keepalive.
MAX_LAG_LIMIT = 12.0


class Offer(enum.Enum):
    QUEUED = "queued"
    """The message was queued (possibly after evicting an older partial)."""
    SKIPPED = "skipped"
    """The message was a partial and the queue was full: it was not queued."""
    OVERFLOW = "overflow"
    """A message that must be delivered found the queue full of the same: drop the reader."""


class MessageQueue:
    """At most ``capacity`` messages; see :meth:`offer` for what happens when full."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[tuple[str, bool]] = deque()
        self._partials = 0
        #: Partials not sent because the queue was full (skipped or evicted).
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, message: str, partial: bool) -> Offer:
        """Queue ``message``; ``partial`` marks one that a later message supersedes.

        When full, a partial is skipped; any other message evicts the oldest queued
        partial, and if there is none the result is :attr:`Offer.OVERFLOW` and nothing
        is queued. The caller must then stop using this queue.
        """
        if len(self._items) < self.capacity:
            self._push(message, partial)
            return Offer.QUEUED
        if partial:
            self.skipped += 1
            return Offer.SKIPPED
        if not self._partials:
            return Offer.OVERFLOW
        for i, (_, was_partial) in enumerate(self._items):
            if was_partial:
                del self._items[i]
                self._partials -= 1
                self.skipped += 1
                break
        self._push(message, partial)
        return Offer.QUEUED

    def _push(self, message: str, partial: bool) -> None:
        self._items.append((message, partial))
        self._partials += partial

    def pop(self) -> str | None:
        """The oldest message, or ``None`` when empty."""
        if not self._items:
            return None
        message, partial = self._items.popleft()
        self._partials -= partial
        return message

    def clear(self) -> None:
        self._items.clear()
        self._partials = 0


class LagWatch:
    """How far behind one reader is, from the pings it has not answered yet.

    Pure logic on a clock the caller reads (any monotonic seconds): ping when
    :meth:`ping_due`, record it with :meth:`sent`, report its pong with :meth:`answered`,
    drop the reader once :meth:`lagging`, and sleep until :meth:`wake_at` in between.
    Pings go out every :attr:`interval` (``max_lag / 2``) whether or not earlier ones
    were answered, so a reader that reads nothing after some moment is lagging at most
    :attr:`detects_within` (``1.5 * max_lag``) later.
    """

    def __init__(self, max_lag: float, now: float) -> None:
        if not max_lag > 0:
            raise ValueError("max_lag must be positive")
        self.max_lag = max_lag
        self.interval = max_lag / 2
        self._unanswered: dict[int, float] = {}  # ping number -> time sent, oldest first
        self._pings = 0
        self._next_ping = now

    @property
    def detects_within(self) -> float:
        """Longest time from a reader's last read until :meth:`lagging` holds."""
        return self.interval + self.max_lag

    @property
    def unanswered(self) -> int:
        return len(self._unanswered)

    def ping_due(self, now: float) -> bool:
        return now >= self._next_ping

    def sent(self, now: float) -> int:
        """A ping was sent at ``now``; returns its number for :meth:`answered`."""
        self._pings += 1
        self._unanswered[self._pings] = now
        self._next_ping = now + self.interval
        return self._pings

    def answered(self, ping: int) -> None:
        """The pong for ``ping`` came. It answers every earlier ping too: a client may
        answer only the latest of several (websockets resolves them all then)."""
        while self._unanswered:
            oldest = next(iter(self._unanswered))
            if oldest > ping:
                break
            del self._unanswered[oldest]

    def lag(self, now: float) -> float:
        """How long the oldest unanswered ping has waited; 0 when all are answered."""
        if not self._unanswered:
            return 0.0
        return max(0.0, now - next(iter(self._unanswered.values())))

    def lagging(self, now: float) -> bool:
        """Whether the reader is ``max_lag`` or more behind: drop it."""
        deadline = self._deadline()
        return deadline is not None and now >= deadline

    def wake_at(self) -> float:
        """When something is next due: a ping, or the oldest unanswered one's deadline."""
        deadline = self._deadline()
        return self._next_ping if deadline is None else min(self._next_ping, deadline)

    def _deadline(self) -> float | None:
        # The one expression both lagging() and wake_at() use: waking at the deadline
        # must find the reader lagging, whatever the rounding.
        if not self._unanswered:
            return None
        return next(iter(self._unanswered.values())) + self.max_lag
