"""Where transcription results go: live subscribers, files on disk, the webhook.

One :class:`TranscriptOutputs` per process serves the subscriber endpoints and owns the
webhook sender; each session's transcription gets a :class:`SessionOutputs` from
:meth:`TranscriptOutputs.open`. Publishing is synchronous and never waits: a final is
appended to ``transcript.jsonl`` and flushed, kept in a bounded memory for late
subscribers, queued for the webhook, and offered to every subscriber's bounded queue
(see :mod:`pipelines.transcription.subscribers` for what a slow reader loses).

Subscribers connect to ``/bots/{key}/transcripts`` (one session, which may not have
started yet: they wait for it) or ``/transcripts`` (every session). Each first receives
the finals its session(s) produced so far, then the live stream, as JSON text frames
(:mod:`pipelines.transcription.formats`), every message carrying ``"session": key``.
A subscriber that cannot keep up is closed with code 1008, reason ``too slow``; when
its session ends it is closed with 1000 ``session ended``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

from prometheus_client import Counter, Gauge
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from pipelines.base import Environment, RouteHandler, SessionContext

from .formats import deepgram, meeting_baas, metadata
from .results import Result, TranscriptEvent
from .subscribers import MessageQueue, Offer
from .webhook import WebhookSender

logger = logging.getLogger("pipelines.transcription.outputs")

JSONL = "transcript.jsonl"
TRANSCRIPT = "transcript.json"
#: Finals per session kept in memory for late subscribers; older ones are read from disk.
MEMORY = 1000
#: Longest wait at shutdown for webhook bodies still being delivered.
SHUTDOWN_WAIT = 10.0
TOO_SLOW = (1008, "too slow")
ENDED = (1000, "session ended")


class _Metrics:
    def __init__(self, env: Environment) -> None:
        r = env.registry
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
        self.finals = Counter(
            "gateway_transcript_finals_written", "Finals appended to transcript.jsonl", registry=r
        )
        self.write_errors = Counter(
            "gateway_transcript_write_errors",
            "Failures writing transcript.jsonl or transcript.json",
            registry=r,
        )


@dataclass(eq=False)
class _Subscriber:
    ws: ServerConnection
    key: str | None
    queue: MessageQueue
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    close: tuple[int, str] | None = None
    backlog: list[tuple[Path | None, int, list[str]]] = field(default_factory=list)


@dataclass(eq=False)
class _Channel:
    """Everything known about one session key, while a session or a subscriber needs it."""

    key: str
    history: deque[str] = field(default_factory=lambda: deque(maxlen=MEMORY))
    finals: int = 0
    jsonl: Path | None = None
    live: bool = False
    subscribers: set[_Subscriber] = field(default_factory=set)


class TranscriptOutputs:
    """The process-wide hub. Call :meth:`startup` before serving, :meth:`shutdown` last."""

    def __init__(self, env: Environment, *, memory: int = MEMORY) -> None:
        self.env = env
        self.metrics = _Metrics(env)
        s = env.settings
        self.webhooks = WebhookSender(
            env.registry,
            s.webhook_secret or s.secret,
            capacity=s.webhook_queue,
            attempts=s.webhook_attempts,
        )
        self._memory = memory
        self._channels: dict[str, _Channel] = {}
        self._everyone: set[_Subscriber] = set()
        self._closing: set[asyncio.Task[None]] = set()

    async def startup(self) -> None:
        s = self.env.settings
        if s.allow_session_webhooks and s.open:
            logger.warning(
                "per-session webhooks are allowed and no secret is set: anyone who can reach "
                "the gateway can make it POST transcripts to any address"
            )
        self.webhooks.start()

    async def shutdown(self) -> None:
        """Wait (bounded) for webhook bodies; what is left is kept on disk."""
        await self.webhooks.close(SHUTDOWN_WAIT)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def routes(self) -> Mapping[str, tuple[str, RouteHandler]]:
        return {"transcripts": ("read", self._serve)}

    def open(self, ctx: SessionContext) -> SessionOutputs:
        """A session's transcription started; publish its results through the return."""
        channel = self._channel(ctx.key)
        channel.history = deque(maxlen=self._memory)
        channel.finals = 0
        channel.jsonl = ctx.directory / JSONL
        channel.live = True
        return SessionOutputs(self, ctx, channel, self._webhook_urls(ctx))

    def _webhook_urls(self, ctx: SessionContext) -> list[str]:
        s = self.env.settings
        urls = [s.webhook_url] if s.webhook_url else []
        asked = ctx.params.get("webhook")
        if asked:
            if not s.allow_session_webhooks:
                ctx.log.warning("ignoring ?webhook=: per-session webhooks are not allowed")
            elif not asked.startswith(("http://", "https://")):
                ctx.log.warning("ignoring ?webhook=: not an http(s) URL")
            elif asked not in urls:
                urls.append(asked)
        return urls

    def _channel(self, key: str) -> _Channel:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = _Channel(key, deque(maxlen=self._memory))
        return channel

    # -- fan-out --------------------------------------------------------------------------

    def _fan_out(self, channel: _Channel, text: str, partial: bool) -> None:
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
                self._end(sub, TOO_SLOW)
            elif outcome is Offer.QUEUED:
                sub.wake.set()

    def _end(self, sub: _Subscriber, code: tuple[int, str]) -> None:
        sub.close = code
        sub.queue.clear()
        sub.wake.set()
        if code is TOO_SLOW:
            # The sender may be stuck in send() on a full socket: close from outside.
            task = asyncio.get_running_loop().create_task(sub.ws.close(*code))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _session_closed(self, channel: _Channel) -> None:
        channel.live = False
        for sub in list(channel.subscribers):
            if sub.close is None:
                sub.close = ENDED
                sub.wake.set()
        if not channel.subscribers and self._channels.get(channel.key) is channel:
            del self._channels[channel.key]

    # -- subscribers ----------------------------------------------------------------------

    def _plan(self, channel: _Channel) -> tuple[Path | None, int, list[str]]:
        """What a subscriber joining now must replay: finals on disk only, then memory."""
        from_disk = channel.finals - len(channel.history)
        return channel.jsonl, from_disk, list(channel.history)

    def _attach(self, sub: _Subscriber) -> None:
        if sub.key is None:
            self._everyone.add(sub)
            sub.backlog = [self._plan(c) for c in self._channels.values() if c.live]
        else:
            channel = self._channel(sub.key)
            channel.subscribers.add(sub)
            if channel.live:
                sub.backlog = [self._plan(channel)]

    def _detach(self, sub: _Subscriber) -> None:
        if sub.key is None:
            self._everyone.discard(sub)
            return
        channel = self._channels.get(sub.key)
        if channel is not None:
            channel.subscribers.discard(sub)
            if not channel.subscribers and not channel.live:
                del self._channels[sub.key]

    async def _serve(self, ws: Any, key: str | None) -> None:
        scope = "all" if key is None else "session"
        sub = _Subscriber(ws, key, MessageQueue(self.env.settings.subscriber_queue))
        self._attach(sub)
        self.metrics.subscribers.labels(scope).inc()
        reader = asyncio.create_task(self._read(sub))
        try:
            for path, from_disk, remembered in sub.backlog:
                if from_disk > 0 and path is not None:
                    for line in await asyncio.to_thread(_read_lines, path, from_disk):
                        await self._send(sub, line)
                for remembered_text in remembered:
                    await self._send(sub, remembered_text)
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


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SessionOutputs:
    """One session's outputs. Call :meth:`publish` per event, :meth:`close` once at the end."""

    def __init__(
        self, hub: TranscriptOutputs, ctx: SessionContext, channel: _Channel, webhooks: list[str]
    ) -> None:
        self._hub = hub
        self._ctx = ctx
        self._channel = channel
        self._webhooks = webhooks
        self._sequence = 0
        self._meta = metadata(str(uuid.uuid4()), hub.env.settings.model)
        self._closed = False
        self._jsonl: IO[str] = open(ctx.directory / JSONL, "a", encoding="utf-8")  # noqa: SIM115

    def publish(self, event: TranscriptEvent) -> None:
        """Send ``event`` everywhere it goes. Never blocks; safe with no subscribers.

        Finals must come in clock order and never overlap (see :class:`Result`).
        """
        if self._closed:
            return
        message = deepgram(event, self._meta)
        message["session"] = self._ctx.key
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        final = isinstance(event, Result) and event.is_final
        if final:
            self._append(text)
            self._channel.history.append(text)
            self._channel.finals += 1
            self._sequence += 1
            self._webhook("transcript.final", message)
        partial = isinstance(event, Result) and not event.is_final
        self._hub._fan_out(self._channel, text, partial)

    def _append(self, text: str) -> None:
        try:
            # Flushed per final: a crash of the process must not lose what was said.
            self._jsonl.write(text + "\n")
            self._jsonl.flush()
        except OSError:
            # A full disk must not stop live captions; the final still goes out.
            self._hub.metrics.write_errors.inc()
            self._ctx.log.exception("could not append a final to %s", JSONL)
            return
        self._hub.metrics.finals.inc()

    def _webhook(self, kind: str, data: dict[str, Any]) -> None:
        for url in self._webhooks:
            body = {
                "id": str(uuid.uuid4()),
                "event": kind,
                "session": self._ctx.key,
                "bot_id": self._ctx.bot_id,
                "sequence": self._sequence,
                "sent_at": round(time.time(), 3),
                "data": data,
            }
            self._hub.webhooks.submit(url, body, self._ctx.directory)

    async def close(self) -> None:
        """The session is finalized: write ``transcript.json``, send the final webhook."""
        if self._closed:
            return
        self._closed = True
        try:
            speakers = [s.name for s in self._ctx.speakers.speakers]
            transcript = await asyncio.to_thread(
                _write_transcript, self._jsonl, self._ctx.directory, speakers
            )
            self._webhook("transcript.complete", transcript)
        except OSError:
            self._hub.metrics.write_errors.inc()
            self._ctx.log.exception("could not write %s", TRANSCRIPT)
        finally:
            self._hub._session_closed(self._channel)


def _write_transcript(jsonl: IO[str], directory: Path, speakers: list[str]) -> dict[str, Any]:
    with jsonl:
        jsonl.flush()
        os.fsync(jsonl.fileno())
    finals = []
    with open(directory / JSONL, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                finals.append(json.loads(line))
    transcript = meeting_baas(finals, speakers)
    _write_atomically(directory / TRANSCRIPT, json.dumps(transcript, indent=1) + "\n")
    return transcript
