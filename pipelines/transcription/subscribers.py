"""Live transcript subscribers: who gets which message, and what a slow reader loses.

Subscribers connect to ``/bots/{key}/transcripts`` (one session, which may not have
started yet: they wait for it) or ``/transcripts`` (every session). Each first receives
the finals its session(s) produced so far, then the live stream, as JSON text frames.
Finals so far come from a bounded memory per session and, past it, from the session's
``transcript.jsonl``.

A subscriber that cannot keep up is closed with code 1008, reason ``too slow``, counted
in ``gateway_transcript_subscriber_drops_total{reason}`` and logged once, rather than grow
memory or hold up ingest or anyone else. Two rules, both pure logic (no I/O, no event
loop, tested synchronously), find it:

``queue_full`` (:class:`MessageQueue`)
    A subscriber that reads slowly loses partials first (each is superseded by the next
    one anyway); when its queue holds nothing but messages that must not be lost (finals
    and events), it is too slow to follow the meeting.
``lagging`` (:class:`LagWatch`)
    Kernel socket buffers hold megabytes, so a reader that stopped reading can swallow
    a quiet meeting for minutes without its queue ever filling. Every subscriber is
    pinged every ``max_lag / 2`` seconds; a WebSocket client answers a ping only once it
    has read everything sent before it, so the age of the oldest unanswered ping is how
    far behind the reader is, every buffered byte included. At ``max_lag`` it is closed:
    one that stops reading is closed at most ``1.5 * max_lag`` later, before websockets'
    keepalive (:data:`KEEPALIVE_TIMEOUT`) would fail the connection silently.

A connection the keepalive fails anyway (it sends close code 1011) is counted as
``keepalive``. A dropped subscriber that does not complete the closing handshake within
the connection's close timeout is cut off (TCP abort), even when its socket is too full
to take the close frame. When its session ends a subscriber is closed with 1000,
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
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

logger = logging.getLogger("pipelines.transcription.subscribers")

TOO_SLOW = (1008, "too slow")
ENDED = (1000, "session ended")
#: The subscriber closed or vanished: nothing more to send, nobody to close.
GONE = (1000, "")

#: Why a subscriber was dropped: the ``reason`` label of the drops counter, a fixed set.
DropReason = Literal["queue_full", "lagging", "keepalive"]
DROP_REASONS: Final[tuple[DropReason, ...]] = ("queue_full", "lagging", "keepalive")

#: The default ``max_lag`` (``GATEWAY_SUBSCRIBER_MAX_LAG``), seconds.
DEFAULT_MAX_LAG = 10.0
#: The gateway's keepalive (:data:`gateway.config.KEEPALIVE_TIMEOUT`) fails a connection
#: whose pong is 20 s late with 1011. :class:`LagWatch` must act first, so ``max_lag`` is
#: at most :data:`MAX_LAG_LIMIT` (checked by ``Settings.validate``): a reader that stops
#: reading is dropped within ``1.5 * MAX_LAG_LIMIT`` = 18 s, 2 s before the keepalive.
MAX_LAG_LIMIT = 12.0
#: How long a dropped subscriber gets to complete the closing handshake when its
#: connection has no close timeout of its own, seconds.
CLOSE_WAIT = 10.0
#: The reason websockets gives in the 1011 close frame of a keepalive that timed out.
_KEEPALIVE_FAILED = "keepalive ping timeout"


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
            "Subscribers closed because they could not keep up, by reason "
            "(queue_full, lagging, keepalive)",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)


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
    lag: LagWatch
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    close: tuple[int, str] | None = None
    dropped: DropReason | None = None
    backlog: list[Backlog] = field(default_factory=list)


class SubscriberHub:
    """Every channel and subscriber of the process; everything runs on the event loop.

    ``max_lag`` is how far behind (seconds) a subscriber may fall before it is dropped
    as ``lagging``; see :class:`LagWatch`.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        capacity: int,
        memory: int,
        max_lag: float = DEFAULT_MAX_LAG,
    ) -> None:
        if not max_lag > 0:
            raise ValueError("max_lag must be positive")
        self.metrics = SubscriberMetrics(registry)
        self.max_lag = max_lag
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
                self._drop(sub, "queue_full")
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

    def _drop(self, sub: _Subscriber, reason: DropReason) -> None:
        """Close ``sub`` with 1008 ``too slow``; counted and logged once per subscriber."""
        if sub.dropped is not None or sub.close is GONE:
            return
        sub.dropped = reason
        sub.close = TOO_SLOW
        sub.queue.clear()
        sub.wake.set()
        self.metrics.dropped.labels(reason).inc()
        behind = f", {sub.lag.lag(_now()):.1f} s behind" if reason == "lagging" else ""
        logger.warning(
            "closing transcript subscriber %s of %s: too slow (%s%s)",
            _remote(sub.ws),
            "every session" if sub.key is None else f"session {sub.key}",
            reason,
            behind,
        )
        # The sender may be stuck in send() on a full socket: close from outside.
        task = asyncio.get_running_loop().create_task(_close_too_slow(sub.ws))
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
        sub = _Subscriber(ws, key, MessageQueue(self._capacity), LagWatch(self.max_lag, _now()))
        self._attach(sub)
        self.metrics.subscribers.labels(scope).inc()
        helpers = [asyncio.create_task(self._read(sub)), asyncio.create_task(self._watch(sub))]
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
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if sub.close is not None and sub.close is not GONE:
            await ws.close(*sub.close)
        if sub.dropped is None and _keepalive_failed(ws):
            # The lag watch should have acted first (a starved event loop?): not silent.
            self.metrics.dropped.labels("keepalive").inc()
            logger.warning(
                "transcript subscriber %s of %s closed by the keepalive: no pong for %.0f s",
                _remote(ws),
                "every session" if key is None else f"session {key}",
                ws.ping_timeout or 0,
            )

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
            sub.close = GONE
        sub.wake.set()

    async def _watch(self, sub: _Subscriber) -> None:
        """Ping ``sub`` on :class:`LagWatch`'s schedule; drop it once it is lagging."""
        lag = sub.lag
        pings: set[asyncio.Task[None]] = set()
        try:
            while sub.close is None or sub.close is ENDED:
                now = _now()
                if lag.lagging(now):
                    self._drop(sub, "lagging")
                    return
                if lag.ping_due(now):
                    # In its own task: ping() waits while the socket is full, and the
                    # deadline must not wait with it.
                    task = asyncio.create_task(_ping(sub.ws, lag, lag.sent(now)))
                    pings.add(task)
                    task.add_done_callback(pings.discard)
                await asyncio.sleep(max(0.0, lag.wake_at() - _now()))
        finally:
            for task in pings:
                task.cancel()


def _now() -> float:
    """The clock of :class:`LagWatch` here: the event loop's (monotonic) clock."""
    return asyncio.get_running_loop().time()


async def _ping(ws: ServerConnection, lag: LagWatch, ping: int) -> None:
    with contextlib.suppress(ConnectionClosed):
        pong = await ws.ping()
        await pong
        lag.answered(ping)


async def _close_too_slow(ws: ServerConnection) -> None:
    # close() queues the close frame behind everything unsent and waits for the socket
    # to take it, which a reader that never reads again never lets happen: past the
    # connection's close timeout, cut the connection instead.
    try:
        async with asyncio.timeout(ws.close_timeout or CLOSE_WAIT):
            await ws.close(*TOO_SLOW)
    except TimeoutError:
        ws.transport.abort()


def _keepalive_failed(ws: ServerConnection) -> bool:
    """Whether websockets' keepalive failed the connection (it sends 1011 then)."""
    sent = ws.protocol.close_sent
    return sent is not None and sent.code == 1011 and sent.reason == _KEEPALIVE_FAILED


def _remote(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _read_lines(path: Path, count: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in islice(f, count)]
    except OSError:
        logger.exception("could not read %s for a late subscriber", path)
        return []
