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
    keepalive (:data:`gateway.config.KEEPALIVE_TIMEOUT`) would fail the connection silently.

A connection the keepalive fails anyway (it sends close code 1011) is counted as
``keepalive``. A dropped subscriber that does not complete the closing handshake within
its close timeout is cut off (TCP abort), even when its socket is too full to take the
close frame. A subscriber is closed with 1000 when its session ends, 1012 when it is
suspended for a restart (come back); one to every session, by the server, last (1012 too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.routes import RESTART
from gateway.storage.offload import blocking

from .backpressure import DEFAULT_MAX_LAG, LagWatch, MessageQueue, Offer
from .provider import segment_text

logger = logging.getLogger("pipelines.transcription.subscribers")

TOO_SLOW = (1008, "too slow")
ENDED = (1000, "session ended")
#: The subscriber closed or vanished: nothing more to send, nobody to close.
GONE = (1000, "")

#: Why a subscriber was dropped: the ``reason`` label of the drops counter, a fixed set.
DropReason = Literal["queue_full", "lagging", "keepalive"]
DROP_REASONS: Final[tuple[DropReason, ...]] = ("queue_full", "lagging", "keepalive")

#: How long a dropped subscriber gets to complete the closing handshake when its
#: connection has no close timeout of its own, seconds.
CLOSE_WAIT = 10.0
#: The reason websockets gives in the 1011 close frame of a keepalive that timed out.
_KEEPALIVE_FAILED = "keepalive ping timeout"


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
    shape: Callable[[str], str | None] | None = None
    """Rewrites each message for this subscriber's format (None: Deepgram's, as is)."""


def _format(ws: Any) -> Callable[[str], str | None] | None:
    """``?format=meetingbaas`` on the subscriber's URL: the vendor's live event shape."""
    request = getattr(ws, "request", None)
    query = parse_qs(urlsplit(request.path).query) if request is not None else {}
    return segment_text if query.get("format") == ["meetingbaas"] else None


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

    def open(self, key: str, jsonl: Path, finals: int = 0) -> Channel:
        """A session for ``key`` started; its finals are appended to ``jsonl``, which
        holds ``finals`` already (a session resumed by a new process)."""
        channel = self._channel(key)
        channel.history = deque(maxlen=self._memory)
        channel.finals = finals
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
        self._fanout((*channel.subscribers, *self._everyone), text, partial)

    def _fanout(self, subscribers: Iterable[_Subscriber], text: str, partial: bool) -> None:
        for sub in subscribers:
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

    def close(self, channel: Channel, ended: bool = True) -> None:
        """The channel's session stopped (``ended``, or suspended for another process):
        its subscribers are closed once they are sent all."""
        channel.live = False
        for sub in channel.subscribers:
            if sub.close is None:
                sub.close = ENDED if ended else RESTART
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
        sub.shape = _format(ws)
        self._attach(sub)
        self.metrics.subscribers.labels(scope).inc()
        helpers = [asyncio.create_task(self._read(sub)), asyncio.create_task(self._watch(sub))]
        try:
            for path, from_disk, remembered in sub.backlog:
                if from_disk > 0 and path is not None:
                    for line in await blocking(_read_lines, path, from_disk):
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
        if sub.shape is not None:
            shaped = sub.shape(text)
            if shaped is None:
                return
            text = shaped
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
            while sub.close is None or sub.close in (ENDED, RESTART):
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
