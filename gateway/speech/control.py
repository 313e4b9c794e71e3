"""The control endpoint ``/bots/{key}/control``: make a session's bot speak.

JSON text messages over a WebSocket (this is a client of the gateway, never the bot, so
text frames are fine here). Requests::

    {"type": "say", "text": "Hello everyone."}
    {"type": "play", "wav": "<base64 of a 16-bit PCM WAV file>"}
    <a binary message holding a 16-bit PCM WAV file>      (same as "play")
    {"type": "stop"}                                        (stop speaking, clear the queue)

Replies to the requester: ``{"type": "accepted", "request": "say", "id": "u7"}``,
``{"type": "stopped", "ids": [...]}`` or ``{"type": "error", "error": "..."}``.

Every control socket of the session also gets the player's events (from when it
connects, or from its first request if the session did not exist yet), each with
``id``, ``kind`` (``say``, ``play``, ``pipeline``) and ``time`` (epoch seconds):
``queued``, ``started`` (with ``latency``, request to first frame sent), then one of
``finished``, ``interrupted`` (with ``reason``: ``barge_in``, ``stopped``,
``input_dropped``, ``session_ended``), ``cancelled`` (never started) or ``failed``.
These carry ``seconds`` and ``samples`` sent and, once anything was sent,
``played_until``: when the bot will have played the last sent sample.

Audio is only ever taken from the message itself: the gateway never opens a file
named by a client. A WAV is at most ``max_message_bytes`` (1 MiB by default, about 30 s
at 16 kHz). The socket needs a ``control`` token when a secret is set (the server
checks it before this handler runs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ..errors import RouteError
from ..metrics import Metrics
from ..session import Session
from ..sessions import SessionManager
from ..storage.offload import blocking
from .playback import PlaybackFull
from .voice import decode_wav, preload

#: Longest text one ``say`` accepts, characters.
MAX_TEXT = 5000
#: Events waiting to be written to one control socket; more are dropped and counted.
OUTBOX = 256
#: Events that end an utterance.
TERMINAL = frozenset({"finished", "interrupted", "cancelled", "failed"})


class ControlEndpoint:
    """Serves ``/bots/{key}/control``; register ``("control", endpoint.handle)``."""

    def __init__(self, sessions: SessionManager, metrics: Metrics) -> None:
        self._sessions = sessions
        self._metrics = metrics

    async def handle(self, ws: Any, key: str | None) -> None:
        if key is None:
            raise RouteError("the control endpoint needs a session key: /bots/{key}/control")
        # The first "say" should not pay for loading the voice.
        warm = asyncio.create_task(preload())
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(OUTBOX)
        writer = asyncio.create_task(self._write(ws, outbox))
        link = _Link(outbox, self._metrics)
        session = self._sessions.get(key)
        if session is not None:
            link.follow(session)  # a socket that only listens hears the session too
        try:
            async for message in ws:
                reply = await self._request(key, message, link)
                link.put(reply)
        except ConnectionClosed:
            pass
        finally:
            link.unsubscribe()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            with contextlib.suppress(Exception):
                await warm

    async def _write(self, ws: Any, outbox: asyncio.Queue[dict[str, Any]]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(json.dumps(await outbox.get()))

    async def _request(self, key: str, message: str | bytes, link: _Link) -> dict[str, Any]:
        session = self._sessions.get(key)
        if session is None or session.player is None or session.ended_at is not None:
            return _error("no live session for this key (the bot has not streamed yet)")
        link.follow(session)
        if isinstance(message, bytes):
            return await self._play(session, message)
        try:
            request = json.loads(message)
        except ValueError:
            return _error("not JSON")
        if not isinstance(request, dict):
            return _error("a request is a JSON object")
        kind = request.get("type")
        if kind == "say":
            text = request.get("text")
            if not isinstance(text, str) or not text.strip():
                return _error("say needs a non-empty text")
            if len(text) > MAX_TEXT:
                return _error(f"text longer than {MAX_TEXT} characters")
            return _accepted("say", lambda: session.say(text))
        if kind == "play":
            data = request.get("wav")
            if not isinstance(data, str):
                return _error("play needs wav: a base64 WAV file (or send the file as binary)")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                return _error("wav is not base64")
            return await self._play(session, raw)
        if kind == "stop":
            assert session.player is not None
            return {"type": "stopped", "ids": session.player.stop("stopped")}
        return _error("unknown request type; use say, play or stop")

    async def _play(self, session: Session, data: bytes) -> dict[str, Any]:
        try:
            # Parsing and resampling a long file takes a while: not on the loop.
            samples = await blocking(decode_wav, data, session.sample_rate)
        except ValueError as exc:
            return _error(str(exc))
        player = session.player
        assert player is not None
        return _accepted("play", lambda: player.enqueue(samples, "play"))


class _Link:
    """One control socket's subscription to the player of the session it talks to."""

    def __init__(self, outbox: asyncio.Queue[dict[str, Any]], metrics: Metrics) -> None:
        self._outbox = outbox
        self._metrics = metrics
        self._player: object = None
        self._cancel: Callable[[], None] | None = None

    def follow(self, session: Session) -> None:
        if session.player is self._player or session.player is None:
            return
        self.unsubscribe()
        self._player = session.player
        self._cancel = session.player.subscribe(self.put)

    def put(self, event: dict[str, Any]) -> None:
        try:
            self._outbox.put_nowait(event)
        except asyncio.QueueFull:
            self._metrics.control_events_dropped.inc()

    def unsubscribe(self) -> None:
        if self._cancel is not None:
            with contextlib.suppress(ValueError):
                self._cancel()
            self._cancel = None


def _accepted(request: str, enqueue: Callable[[], str]) -> dict[str, Any]:
    try:
        return {"type": "accepted", "request": request, "id": enqueue()}
    except PlaybackFull as exc:
        return _error(str(exc))


def _error(text: str) -> dict[str, Any]:
    return {"type": "error", "error": text}


# -- client ---------------------------------------------------------------------------------


def control_url(base: str, key: str, token: str | None = None) -> str:
    """``ws://host:port`` (or a full control URL) and a key to the control URL."""
    url = base.rstrip("/")
    if "/bots/" not in url:
        url = f"{url}/bots/{key}/control"
    if token:
        url += ("&" if "?" in url else "?") + f"token={token}"
    return url


async def command(
    url: str, request: dict[str, Any] | bytes, limit: float
) -> AsyncIterator[dict[str, Any]]:
    """Send one request and yield what comes back until it is settled.

    For ``say`` and ``play`` that is the utterance's terminal event; for ``stop``, the
    terminal events of every utterance it stopped. An ``error`` reply ends it too.
    Raises ``TimeoutError`` if nothing settles it within ``limit`` seconds.
    """
    async with connect(url, max_size=None) as ws:
        await ws.send(request if isinstance(request, bytes) else json.dumps(request))
        waiting: set[str] | None = None
        ended: set[str] = set()  # a stop cancels queued utterances before it replies
        async with asyncio.timeout(limit):
            async for raw in ws:
                event = json.loads(raw)
                yield event
                kind = event.get("type")
                if kind == "error":
                    return
                if kind in TERMINAL:
                    ended.add(event["id"])
                if kind == "accepted":
                    waiting = {event["id"]}
                elif kind == "stopped":
                    waiting = set(event["ids"])
                if waiting is not None:
                    waiting -= ended
                if waiting is not None and not waiting:
                    return
