"""Speech back into the meeting: one player per session.

The player owns a bounded queue of utterances and one task that sends them to the bot
as binary PCM s16le mono at the session's rate, ``playback_frame_ms`` per message,
paced by :class:`~gateway.speech.pacing.Pacer` so that at most ``playback_lead_ms`` sits in the
bot's queue. Never a text frame: the bot would play it as noise.

Where audio goes: the session's separate input socket once the bot has opened one;
otherwise the output socket (the dual socket). A socket that is not open is never
written to. When the target drops mid-utterance, ``on_input_drop`` decides: ``resume``
keeps the unsent rest and sends it once the bot reconnects, ``drop`` ends the
utterance. Queued utterances always wait for a socket.

Barge-in (``barge_in``): the session feeds its VAD and roster events to
:meth:`Player.observe`; :class:`~gateway.speech.bargein.BargeIn` tells a person from the bot's
own echo. ``stop`` ends the current utterance before its next frame and cancels the
queue, ``duck`` lowers what is still to be sent by 12 dB until the person stops,
``ignore`` only counts. The bot's queue cannot be flushed, so up to the lead (100 ms by
default) still plays after a stop.

Events go to every subscriber as dicts (see :meth:`Player.subscribe`).

Every decision (queue, pacing, barge-in, own-voice onsets, events) is made by the
sans-I/O :class:`~gateway.speech.playlist.Playlist`; the player is its asyncio shell: it reads
the sources, waits for an open socket, sleeps until a frame is due and sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ..config import Settings
from ..metrics import Metrics
from .playlist import MAX_QUEUED, Listener, PlaybackFull, Playlist, Utterance

__all__ = ["CLOSE_TIMEOUT", "MAX_QUEUED", "PlaybackFull", "Player", "Utterance"]

Samples = npt.NDArray[np.int16]

#: How long closing waits for the current utterance to report its end, seconds.
CLOSE_TIMEOUT = 2.0


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _once(samples: Samples) -> AsyncIterator[Samples]:
    yield samples


class Player:
    """Plays one session's utterances. Create once the session's rate is known.

    ``target()`` returns the socket to send to or ``None``; call
    :meth:`connection_changed` whenever it may return something else. ``wall(sample)``
    converts a session-clock position to epoch seconds (``None`` before audio).
    ``speaking(on, wall)`` is told when the bot's voice starts and stops playing.
    Call :meth:`close` when the session ends.
    """

    def __init__(
        self,
        rate: int,
        settings: Settings,
        metrics: Metrics,
        target: Callable[[], Any],
        wall: Callable[[int], float | None],
        speaking: Callable[[bool, float], None],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.rate = rate
        self.playlist = Playlist(rate, settings, metrics, wall, speaking, log)
        self.pacer = self.playlist.pacer
        self.barge_in = self.playlist.barge_in
        self._target = target
        self._log = log
        self._wake = asyncio.Event()
        self._sleeper: asyncio.Future[None] | None = None
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="playback")

    # -- requests -------------------------------------------------------------------------

    def enqueue(
        self, source: AsyncIterator[Samples] | Samples, kind: str, text: str | None = None
    ) -> str:
        """Queue audio at the session's rate; returns the utterance id.

        ``source`` is an array or an async iterator of int16 mono chunks; the player
        closes an iterator it stops early (``aclose``). Raises :class:`PlaybackFull`.
        """
        if isinstance(source, np.ndarray):
            source = _once(np.ascontiguousarray(source, dtype=np.int16))
        utt = self.playlist.enqueue(source, kind, text, time.monotonic(), time.time())
        self._poke()
        return utt.id

    def stop(self, reason: str = "stopped") -> list[str]:
        """End the current utterance before its next frame and cancel the queue."""
        ids = self.playlist.stop(reason, time.monotonic(), time.time())
        self._poke()
        return ids

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for every event; returns the unsubscribe function.

        Listeners run on the player's task and must not block (queue the event).
        """
        self.playlist.listeners.append(listener)
        return lambda: self.playlist.listeners.remove(listener)

    def connection_changed(self) -> None:
        self._poke()

    @property
    def playing(self) -> bool:
        return self.playlist.playing

    @property
    def queued(self) -> int:
        return len(self.playlist.queue)

    def observe(self, events: Iterable[Any]) -> None:
        """VAD and roster events from the session, as soon as they are known."""
        stopping = self.playlist.current is not None and self.playlist.current.end_reason
        self.playlist.observe(events, time.monotonic(), time.time())
        current = self.playlist.current
        if current is not None and current.end_reason and not stopping:
            self._poke()  # barged in: end before the next frame

    # -- the task -------------------------------------------------------------------------

    def _poke(self) -> None:
        self._wake.set()
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)

    async def _sleep(self, delay: float) -> None:
        """Sleep up to ``delay`` seconds; a stop or a connection change ends it early."""
        if delay <= 0:
            return
        loop = asyncio.get_running_loop()
        self._sleeper = fut = loop.create_future()
        handle = loop.call_later(delay, _wake_up, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._sleeper = None

    async def _run(self) -> None:
        playlist = self.playlist
        while True:
            while not playlist.queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            utt = playlist.next()
            assert utt is not None
            try:
                await self._play(utt)
            except Exception as exc:
                self._log.exception("playback of %s failed", utt.id)
                playlist.finish(utt, "failed", type(exc).__name__, time.monotonic(), time.time())
            finally:
                playlist.current = None
                with contextlib.suppress(Exception):
                    await utt.source.aclose()  # type: ignore[attr-defined]

    async def _socket(self, utt: Utterance) -> Any:
        """The open target, waiting for one; ``None`` if the utterance must end."""
        while True:
            ws = self._target()
            if ws is not None and ws.state is State.OPEN:
                return ws
            if utt.end_reason is not None:
                return None
            if utt.sent and not self.playlist.resume_after_drop:
                utt.end_reason = "input_dropped"
                return None
            self.pacer.stop()  # a new socket is a new bot-side queue: not an underrun
            self._wake.clear()
            await self._wake.wait()

    async def _play(self, utt: Utterance) -> None:
        playlist = self.playlist
        size = playlist.frame
        buf: Samples = np.zeros(0, dtype=np.int16)
        done = False
        while True:
            while len(buf) < size and not done:
                try:
                    buf = np.concatenate([buf, await anext(utt.source)])
                except StopAsyncIteration:
                    done = True
            if not len(buf) or utt.end_reason is not None:
                break
            frame, rest = buf[:size], buf[size:]
            ws = await self._socket(utt)
            if ws is None:
                break
            due = playlist.due(utt, time.monotonic())
            await self._sleep(due - time.monotonic())
            if utt.end_reason is not None:
                break
            frame = playlist.shape(frame)
            try:
                await ws.send(frame.tobytes())
            except ConnectionClosed:
                self.pacer.stop()  # the bot's queue went with the socket
                continue  # the frame was not sent: keep it for the next socket
            playlist.sent(utt, frame, due, time.monotonic(), time.time())
            buf = rest
        outcome = "finished" if utt.end_reason is None else "interrupted"
        if utt.started is None and outcome == "interrupted":
            outcome = "cancelled"
        playlist.finish(utt, outcome, utt.end_reason, time.monotonic(), time.time())

    async def close(self) -> None:
        """Cancel everything and stop the task (the session is ending)."""
        self._closing = True
        self.stop("session_ended")
        try:
            # The current utterance ends at its next step and reports how far it got.
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.playlist.listeners.clear()
