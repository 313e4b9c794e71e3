"""Speech back into the meeting: one player per session.

The player owns a bounded queue of utterances and one task that sends them to the bot
as binary PCM s16le mono at the session's rate, ``playback_frame_ms`` per message,
paced by :class:`~gateway.pacing.Pacer` so that at most ``playback_lead_ms`` sits in the
bot's queue. Never a text frame: the bot would play it as noise.

Where audio goes: the session's separate input socket once the bot has opened one;
otherwise the output socket (the dual socket). A socket that is not open is never
written to. When the target drops mid-utterance, ``on_input_drop`` decides: ``resume``
keeps the unsent rest and sends it once the bot reconnects, ``drop`` ends the
utterance. Queued utterances always wait for a socket.

Barge-in (``barge_in``): the session feeds its VAD and roster events to
:meth:`Player.observe`; :class:`~gateway.bargein.BargeIn` tells a person from the bot's
own echo. ``stop`` ends the current utterance before its next frame and cancels the
queue, ``duck`` lowers what is still to be sent by 12 dB until the person stops,
``ignore`` only counts. The bot's queue cannot be flushed, so up to the lead (100 ms by
default) still plays after a stop.

Events go to every subscriber as dicts (see :meth:`Player.subscribe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from .audio.vad import SpeechEnded, SpeechStarted, VoiceActivity
from .bargein import BargeIn
from .config import Settings
from .errors import GatewayError
from .metrics import Metrics
from .pacing import Pacer
from .speakers import SpeakerChange

Samples = npt.NDArray[np.int16]
Listener = Callable[[dict[str, Any]], None]

#: Utterances waiting per session; more are refused.
MAX_QUEUED = 32
#: Gain applied while ducking (-12 dB).
DUCK_GAIN = 0.25

#: How long closing waits for the current utterance to report its end, seconds.
CLOSE_TIMEOUT = 2.0

_ids = itertools.count(1)


class PlaybackFull(GatewayError):
    """The session already has :data:`MAX_QUEUED` utterances waiting."""


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _once(samples: Samples) -> AsyncIterator[Samples]:
    yield samples


@dataclass(eq=False)
class Utterance:
    id: str
    kind: str
    source: AsyncIterator[Samples]
    requested: float  # monotonic
    text: str | None = None
    sent: int = 0
    started: float | None = None
    end_reason: str | None = None
    stop_requested: float | None = None  # epoch


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
        self._frame = rate * settings.playback_frame_ms // 1000
        self._policy = settings.barge_in
        self._resume = settings.on_input_drop == "resume"
        self._metrics = metrics
        self._target = target
        self._wall = wall
        self._speaking_cb = speaking
        self._log = log
        self.pacer = Pacer(rate, settings.playback_lead_ms / 1000)
        self.barge_in = BargeIn()
        # The session's VAD settings, run over what is sent: where the bot's speech
        # starts, as the session's VAD will see it when it echoes back.
        self._own_vad = VoiceActivity.configured(rate, settings)
        self._own_pos = 0
        self._queue: deque[Utterance] = deque()
        self._current: Utterance | None = None
        self._listeners: list[Listener] = []
        self._gain = 1.0
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
        if len(self._queue) >= MAX_QUEUED:
            self._metrics.speech_utterances.labels("refused").inc()
            raise PlaybackFull(f"{MAX_QUEUED} utterances are already waiting")
        if isinstance(source, np.ndarray):
            source = _once(np.ascontiguousarray(source, dtype=np.int16))
        utt = Utterance(f"u{next(_ids)}", kind, source, time.monotonic(), text)
        self._queue.append(utt)
        self._emit("queued", utt, position=len(self._queue) - 1)
        self._poke()
        return utt.id

    def stop(self, reason: str = "stopped") -> list[str]:
        """End the current utterance before its next frame and cancel the queue."""
        ids = []
        if self._current is not None and self._current.end_reason is None:
            self._current.end_reason = reason
            self._current.stop_requested = time.time()
            ids.append(self._current.id)
        while self._queue:
            utt = self._queue.popleft()
            ids.append(utt.id)
            self._finish(utt, "cancelled", reason)
        self._poke()
        return ids

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for every event; returns the unsubscribe function.

        Listeners run on the player's task and must not block (queue the event).
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def connection_changed(self) -> None:
        self._poke()

    @property
    def playing(self) -> bool:
        return self._current is not None and self._current.started is not None

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- barge-in -------------------------------------------------------------------------

    def observe(self, events: Iterable[Any]) -> None:
        """VAD and roster events from the session, as soon as they are known."""
        for event in events:
            if type(event) is SpeechStarted:
                at = self._wall(event.sample)
                if self._audible() and at is not None and not self.barge_in.own_voice(at):
                    self._barge_in("vad")
            elif type(event) is SpeechEnded:
                if not self.barge_in.humans_speaking:
                    self._gain = 1.0
            elif type(event) is SpeakerChange:
                person = self.barge_in.roster_change(
                    event.speaker.key, event.speaker.is_bot, event.speaking
                )
                if person and self._audible():
                    self._barge_in("roster")

    def _audible(self) -> bool:
        return self.playing or self.pacer.queued(time.monotonic()) > 0

    def _barge_in(self, how: str) -> None:
        self._metrics.speech_barge_ins.labels(self._policy).inc()
        if self._policy == "stop":
            self._log.info("barge-in (%s): stopping speech", how)
            self.stop("barge_in")
        elif self._policy == "duck":
            self._gain = DUCK_GAIN

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
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            utt = self._current = self._queue.popleft()
            try:
                await self._play(utt)
            except Exception as exc:
                self._log.exception("playback of %s failed", utt.id)
                self._finish(utt, "failed", type(exc).__name__)
            finally:
                self._current = None
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
            if utt.sent and not self._resume:
                utt.end_reason = "input_dropped"
                return None
            self.pacer.stop()  # a new socket is a new bot-side queue: not an underrun
            self._wake.clear()
            await self._wake.wait()

    async def _play(self, utt: Utterance) -> None:
        buf: Samples = np.zeros(0, dtype=np.int16)
        done = False
        while True:
            while len(buf) < self._frame and not done:
                try:
                    buf = np.concatenate([buf, await anext(utt.source)])
                except StopAsyncIteration:
                    done = True
            if not len(buf) or utt.end_reason is not None:
                break
            frame, rest = buf[: self._frame], buf[self._frame :]
            ws = await self._socket(utt)
            if ws is None:
                break
            now = time.monotonic()
            if not self.pacer.active or now >= self.pacer.playout_end:
                # The bot went quiet: its next speech is a new onset.
                self._own_vad.interrupt(self._own_pos)
            if self.pacer.resume(now) and utt.sent:
                self._metrics.speech_underruns.inc()
            due = self.pacer.due()
            await self._sleep(due - time.monotonic())
            if utt.end_reason is not None:
                break
            if self._gain != 1.0:
                frame = (frame * self._gain).astype(np.int16)
            try:
                await ws.send(frame.tobytes())
            except ConnectionClosed:
                self.pacer.stop()  # the bot's queue went with the socket
                continue  # the frame was not sent: keep it for the next socket
            sent_at = time.monotonic()
            self._sent(utt, frame, due, sent_at)
            buf = rest
        outcome = "finished" if utt.end_reason is None else "interrupted"
        if utt.started is None and outcome == "interrupted":
            outcome = "cancelled"
        self._finish(utt, outcome, utt.end_reason)

    def _sent(self, utt: Utterance, frame: Samples, due: float, sent_at: float) -> None:
        n = len(frame)
        playout = self.pacer.playout_time(self.pacer.position)
        self.pacer.sent(n)
        epoch = time.time() - sent_at
        for event in self._own_vad.feed(frame):
            if type(event) is SpeechStarted:
                at = playout - (self._own_pos - event.sample) / self.rate
                self.barge_in.onset(at + epoch)
        self._own_pos += n
        m = self._metrics
        m.speech_frames_sent.inc()
        m.speech_sent_seconds.inc(n / self.rate)
        m.speech_pacing_error.observe(max(0.0, sent_at - due))
        if utt.started is None:
            utt.started = sent_at
            m.speech_first_frame.labels(utt.kind).observe(sent_at - utt.requested)
            self._speaking_cb(True, playout + epoch)
            self._emit("started", utt, latency=round(sent_at - utt.requested, 4))
        utt.sent += n

    def _finish(self, utt: Utterance, outcome: str, reason: str | None) -> None:
        self._metrics.speech_utterances.labels(outcome).inc()
        extra: dict[str, Any] = {"seconds": round(utt.sent / self.rate, 3), "samples": utt.sent}
        if reason is not None:
            extra["reason"] = reason
        if utt.stop_requested is not None:
            extra["stop_requested"] = round(utt.stop_requested, 4)
        if utt.started is not None:
            now = time.monotonic()
            ends = time.time() + self.pacer.queued(now)
            extra["played_until"] = round(ends, 4)
            self._speaking_cb(False, ends)
        self._emit(outcome, utt, **extra)

    def _emit(self, kind: str, utt: Utterance, **extra: Any) -> None:
        event = {"type": kind, "id": utt.id, "kind": utt.kind, "time": round(time.time(), 4)}
        event.update(extra)
        for listener in list(self._listeners):
            listener(event)

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
        self._listeners.clear()
