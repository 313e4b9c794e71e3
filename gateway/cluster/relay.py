"""Transcript messages between nodes, on Redis Streams.

In cluster mode a session's owner does not hand its transcript messages to its own
subscribers: it appends them to the session's stream ``gateway:tx:{key}`` (and to
``gateway:tx``, every session's), and every node's subscribers, the owner's included,
read them from there. So a subscriber on any node hears any session, and one that was
listening when its session moved to another node goes on hearing it with nothing
repeated or missed. Each session's stream holds about :data:`MAXLEN` entries; a
subscriber that joins late first gets the finals still in it.

Entries are ``f`` (final, partial, event or end) and ``m`` (the message as sent to
subscribers). Appends are queued (bounded, drops counted) and written in batches by
one task, in order; while Redis is away they wait and are written when it is back.

The same queue keeps what a node needs to continue a session whose files it cannot see
(nodes without a shared data directory): every journal line (``gateway:journal:{key}``)
and every final as written to ``transcript.jsonl`` (``gateway:tx:{key}:finals``), both
dropped when the meeting ends. See :meth:`journal_lines` and :meth:`finals`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from ..pipeline import RelayKind

logger = logging.getLogger("gateway.cluster")

ALL = "gateway:tx"
#: Entries kept per session stream (about half an hour of partials and finals, ~1 MB) and
#: in the all-sessions stream. Finals are also kept whole in a list (``finals_key``).
MAXLEN = 2_000
MAXLEN_ALL = 10_000
#: Appends waiting for Redis, all sessions; past it partials are dropped first.
CAPACITY = 20_000
BATCH = 500
#: A session's stream outlives its last append by this long (s), for late readers.
KEEP = 86_400
RETRY = 0.5
#: Longest wait of one blocking read, ms.
BLOCK_MS = 500


def stream(key: str | None) -> str:
    return ALL if key is None else f"{ALL}:{key}"


def finals_key(key: str) -> str:
    return f"{ALL}:{key}:finals"


def journal_key(key: str) -> str:
    return f"gateway:journal:{key}"


#: A journal line that ends its session (``Journal`` writes ``{"t":kind,...}``).
ENDED = '{"t":"ended"'


class TranscriptRelay:
    """Appends and follows transcript streams (see :class:`gateway.pipeline.Relay`)."""

    def __init__(self, url: str, registry: CollectorRegistry) -> None:
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=1.0, decode_responses=True
        )
        self._queue: deque[tuple[str, str, str]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self.sent = Counter(
            "gateway_cluster_relay_messages",
            "Transcript messages appended to Redis for every node's subscribers",
            registry=registry,
        )
        self.dropped = Counter(
            "gateway_cluster_relay_dropped",
            "Transcript messages dropped because Redis was away too long, by kind",
            ["kind"],
            registry=registry,
        )
        self.pending = Gauge(
            "gateway_cluster_relay_pending",
            "Transcript messages waiting for Redis",
            registry=registry,
        )

    # -- appending ------------------------------------------------------------------------

    def publish(self, key: str, kind: RelayKind, text: str) -> None:
        """Queue one message of ``key``'s; never waits."""
        self._push(key, kind, text)

    def journal(self, key: str, line: str) -> None:
        """Keep a journal line of ``key``'s (see the module docstring); never waits."""
        self._push(key, "journal", line)

    def _push(self, key: str, kind: str, text: str) -> None:
        if len(self._queue) >= CAPACITY:
            if kind == "partial":
                self.dropped.labels(kind).inc()
                return
            self.dropped.labels(self._queue.popleft()[1]).inc()
        self._queue.append((key, kind, text))
        self.pending.set(len(self._queue))
        self._idle.clear()
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write(), name="relay")

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until everything queued so far is in Redis (at most ``within`` s)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._idle.wait()
                return True
        return False

    async def close(self, within: float = 5.0) -> None:
        if not await self.flush(within) and self._queue:
            logger.warning("%d transcript messages not relayed: redis away", len(self._queue))
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self.redis.aclose()

    async def _write(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    kept: set[str] = set()
                    for key, kind, text in batch:
                        kept.update(_append(pipe, key, kind, text))
                    for name in kept:  # once per batch, not per entry
                        pipe.expire(name, KEEP)
                    await pipe.execute()
            except (RedisError, OSError):
                await _pause()  # kept in order; written when Redis is back
                continue
            for _ in batch:
                self._queue.popleft()
            self.sent.inc(len(batch))
            self.pending.set(len(self._queue))

    # -- reading what was kept -------------------------------------------------------------

    async def journal_lines(self, key: str) -> list[str] | None:
        """``key``'s journal as kept in Redis; None when Redis cannot be asked."""
        return await self._list(journal_key(key))

    async def finals(self, key: str) -> list[str] | None:
        """``key``'s ``transcript.jsonl`` lines so far; None when Redis cannot be asked."""
        return await self._list(finals_key(key))

    async def _list(self, name: str) -> list[str] | None:
        try:
            return [str(x) for x in await self.redis.lrange(name, 0, -1)]
        except (RedisError, OSError):
            return None

    # -- following ------------------------------------------------------------------------

    async def follow(
        self, key: str | None, running: Callable[[], bool] = lambda: True
    ) -> AsyncIterator[tuple[str, RelayKind, str, bool]]:
        """``(key, kind, text, replayed)`` for ``key``'s stream (None: every session's),
        from its beginning (``replayed`` until what was there when following began), then
        live. A stream whose last entry ends a meeting, and the all-sessions stream, are
        followed from their end. Yields ``("", "ready", "", True)`` once replayed.

        Ends within :data:`BLOCK_MS` of ``running()`` turning false: stop a follower
        that way rather than by cancelling it, which redis-py may not answer while a
        blocking read is under way."""
        name = stream(key)
        boundary = "0-0"
        while True:
            try:
                tail = await self.redis.xrevrange(name, count=1)
                break
            except (RedisError, OSError):
                await _pause()
        last = "0-0"
        if tail:
            boundary, (_, kind, _) = _entry(tail[0], key)
            if key is None or kind == "end":
                last = boundary
        while last != boundary:
            try:
                entries: list[Any] = await self.redis.xrange(
                    name, min=f"({last}" if last != "0-0" else "-", max=boundary, count=BATCH
                )  # type: ignore[assignment]  # decode_responses: never None
            except (RedisError, OSError):
                await _pause()
                continue
            for entry in entries:
                last, message = _entry(entry, key)
                yield (*message, True)
            if not entries:
                break
        yield "", "ready", "", True
        while running():
            try:
                found = await self.redis.xread({name: last}, count=BATCH, block=BLOCK_MS)
            except (RedisError, OSError):
                await _pause()
                continue
            for _, entries in cast(list[Any], found or []):
                for entry in entries:
                    last, message = _entry(entry, key)
                    yield (*message, False)


def _append(pipe: Any, key: str, kind: str, text: str) -> list[str]:
    """Queue the commands for one entry; returns the names to keep for :data:`KEEP` s."""
    if kind == "journal":
        if text.startswith(ENDED):
            pipe.delete(journal_key(key))  # the meeting is over: nothing to continue
            return []
        pipe.rpush(journal_key(key), text.rstrip("\n"))
        return [journal_key(key)]
    pipe.xadd(stream(key), {"f": kind, "m": text}, maxlen=MAXLEN, approximate=True)
    pipe.xadd(ALL, {"k": key, "f": kind, "m": text}, maxlen=MAXLEN_ALL, approximate=True)
    if kind == "final":
        pipe.rpush(finals_key(key), text)
        return [stream(key), finals_key(key)]
    if kind == "end":
        pipe.delete(finals_key(key))
    return [stream(key)]


async def _pause() -> None:
    """Wait before retrying a failed Redis call, unless the task is being cancelled:
    redis-py may turn a cancellation during a blocking read into a connection error."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    await asyncio.sleep(RETRY)


KINDS: frozenset[str] = frozenset(("final", "partial", "event", "end"))


def _entry(entry: Any, key: str | None) -> tuple[str, tuple[str, RelayKind, str]]:
    """A stream entry as ``(id, (key, kind, text))``; an unknown kind is an event."""
    entry_id, fields = entry
    fields = fields or {}
    kind = str(fields.get("f", "event"))
    known = cast(RelayKind, kind if kind in KINDS else "event")
    return str(entry_id), (str(fields.get("k", key or "")), known, str(fields.get("m", "")))
