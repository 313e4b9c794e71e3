"""A live subscriber's outgoing queue: bounded, partials give way first.

Sans-I/O: the hub in :mod:`pipelines.transcription.outputs` puts serialised messages
in and a sender task takes them out; this module only decides what fits. A subscriber
that reads slowly loses partials first (each is superseded by the next one anyway);
when the queue holds nothing but messages that must not be lost (finals and events),
the subscriber is too slow to follow the meeting and :meth:`MessageQueue.offer` says
so, so the hub can drop it rather than grow memory or hold up anyone else.
"""

from __future__ import annotations

import enum
from collections import deque


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
