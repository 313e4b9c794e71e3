"""Live transcript subscribers: who gets which message, and what a slow reader loses.

Subscribers connect to ``/bots/{key}/transcripts`` (one session, which may not have
started yet: they wait for it) or ``/transcripts`` (every session). Each first receives
the finals its session(s) produced so far, then the live stream, as JSON text frames.
Finals so far come from a bounded memory per session and, past it, from the session's
``transcript.jsonl``.

Every subscriber has a :class:`MessageQueue`. It is pure logic (no I/O, no event loop,
tested synchronously): a subscriber that reads slowly loses partials first (each is
superseded by the next one anyway); when the queue holds nothing but messages that
must not be lost (finals and events), the subscriber is too slow to follow the meeting
and is closed with code 1008, reason ``too slow``, rather than grow memory or hold up
ingest or anyone else. When its session ends a subscriber is closed with 1000,
``session ended``; a subscriber to every session stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

logger = logging.getLogger("pipelines.transcription.subscribers")

TOO_SLOW = (1008, "too slow")
ENDED = (1000, "session ended")


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


class SubscriberMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.subscribers = Gauge(
            "gateway_transcript_subscribers",
            "Transcript subscribers connected, by scope (session or all)",
            ["scope"],
            registry=r,
        )
        self.sent = Counter(
            "gateway_transcript_messages_sent", "Messages sent to subscribers", registry=r
        )
        self.skipped = Counter(
            "gateway_transcript_subscriber_skips",
            "Partials not sent to a subscriber whose queue was full",
            registry=r,
        )
        self.dropped = Counter(
            "gateway_transcript_subscriber_drops",
            "Subscribers closed because they could not keep up",
            registry=r,
        )


@dataclass(eq=False)
class Channel:
    """One session key's stream, kept while a session or a subscriber needs it."""

    key: str
    history: deque[str]
    """The newest finals, for late subscribers."""
    finals: int = 0
    """Finals published in the current session (the older ones are only on disk)."""
    jsonl: Path | None = None
    live: bool = False
    subscribers: set[_Subscriber] = field(default_factory=set)


Backlog = tuple[Path | None, int, list[str]]


@dataclass(eq=False)
class _Subscriber:
    ws: ServerConnection
    key: str | None
    queue: MessageQueue
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    close: tuple[int, str] | None = None
    backlog: list[Backlog] = field(default_factory=list)


class SubscriberHub:
    """Every channel and subscriber of the process; everything runs on the event loop."""

    def __init__(self, registry: CollectorRegistry, *, capacity: int, memory: int) -> None:
        self.metrics = SubscriberMetrics(registry)
        self._capacity = capacity
        self._memory = memory
        self._channels: dict[str, Channel] = {}
        self._everyone: set[_Subscriber] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def open(self, key: str, jsonl: Path) -> Channel:
        """A session for ``key`` started; its finals are appended to ``jsonl``."""
        channel = self._channel(key)
        channel.history = deque(maxlen=self._memory)
        channel.finals = 0
        channel.jsonl = jsonl
        channel.live = True
        return channel

    def publish(self, channel: Channel, text: str, *, final: bool, partial: bool) -> None:
        """Offer ``text`` to the channel's subscribers and to everyone's. Never waits.

        A ``final`` must already be in the channel's ``jsonl`` (late subscribers may
        read it from there); a ``partial`` is skipped first for slow readers.
        """
        if final:
            channel.history.append(text)
            channel.finals += 1
        for sub in (*channel.subscribers, *self._everyone):
            if sub.close is not None:
                continue
            before = sub.queue.skipped
            outcome = sub.queue.offer(text, partial)
            if sub.queue.skipped != before:
                self.metrics.skipped.inc(sub.queue.skipped - before)
            if outcome is Offer.OVERFLOW:
                self.metrics.dropped.inc()
                logger.warning("dropping a transcript subscriber that cannot keep up")
                self._drop(sub)
            elif outcome is Offer.QUEUED:
                sub.wake.set()

    def close(self, channel: Channel) -> None:
        """The channel's session ended: its subscribers are closed once they are sent all."""
        channel.live = False
        for sub in channel.subscribers:
            if sub.close is None:
                sub.close = ENDED
                sub.wake.set()
        if not channel.subscribers and self._channels.get(channel.key) is channel:
            del self._channels[channel.key]

    async def shutdown(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _channel(self, key: str) -> Channel:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel(key, deque(maxlen=self._memory))
        return channel

    def _drop(self, sub: _Subscriber) -> None:
        sub.close = TOO_SLOW
        sub.queue.clear()
        sub.wake.set()
        # The sender may be stuck in send() on a full socket: close from outside, which
        # the connection's close timeout bounds.
        task = asyncio.get_running_loop().create_task(sub.ws.close(*TOO_SLOW))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- one subscriber ---------------------------------------------------------------------

    def _backlog(self, channels: Iterable[Channel]) -> list[Backlog]:
        """What a subscriber joining now must replay: finals only on disk, then memory."""
        return [(c.jsonl, c.finals - len(c.history), list(c.history)) for c in channels if c.live]

    def _attach(self, sub: _Subscriber) -> None:
        if sub.key is None:
            self._everyone.add(sub)
            sub.backlog = self._backlog(self._channels.values())
        else:
            channel = self._channel(sub.key)
            channel.subscribers.add(sub)
            sub.backlog = self._backlog([channel])

    def _detach(self, sub: _Subscriber) -> None:
        if sub.key is None:
            self._everyone.discard(sub)
            return
        channel = self._channels.get(sub.key)
        if channel is not None:
            channel.subscribers.discard(sub)
            if not channel.subscribers and not channel.live:
                del self._channels[sub.key]

    async def serve(self, ws: Any, key: str | None) -> None:
        """Serve one subscriber connection until it or its session ends."""
        scope = "all" if key is None else "session"
        sub = _Subscriber(ws, key, MessageQueue(self._capacity))
        self._attach(sub)
        self.metrics.subscribers.labels(scope).inc()
        reader = asyncio.create_task(self._read(sub))
        try:
            for path, from_disk, remembered in sub.backlog:
                if from_disk > 0 and path is not None:
                    for line in await asyncio.to_thread(_read_lines, path, from_disk):
                        await self._send(sub, line)
                for text in remembered:
                    await self._send(sub, text)
            sub.backlog.clear()
            while True:
                queued = sub.queue.pop()
                if queued is None:
                    if sub.close is not None:
                        break
                    sub.wake.clear()
                    await sub.wake.wait()
                    continue
                await self._send(sub, queued)
        except ConnectionClosed:
            pass
        finally:
            self._detach(sub)
            self.metrics.subscribers.labels(scope).dec()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if sub.close is not None:
            await ws.close(*sub.close)

    async def _send(self, sub: _Subscriber, text: str) -> None:
        if sub.close is TOO_SLOW:
            raise ConnectionClosed(None, None)
        await sub.ws.send(text)
        self.metrics.sent.inc()

    async def _read(self, sub: _Subscriber) -> None:
        # Subscribers have nothing to say (Deepgram clients send KeepAlive); reading keeps
        # the connection's close handshake moving and tells the sender when it ends.
        with contextlib.suppress(ConnectionClosed):
            async for _ in sub.ws:
                pass
        if sub.close is None:
            sub.close = (1000, "")
        sub.wake.set()


def _read_lines(path: Path, count: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in islice(f, count)]
    except OSError:
        logger.exception("could not read %s for a late subscriber", path)
        return []
