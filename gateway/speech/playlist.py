"""Playback decisions with no I/O: the queue, pacing, barge-in and the bot's own voice.

:class:`Playlist` decides everything about a session's speech into the meeting that does
not need a socket or the event loop: which utterance plays next, when each frame is due
(:class:`~gateway.speech.pacing.Pacer`), what a stop cancels, whether speech heard in the
meeting is a person talking over the bot or the bot's own echo
(:class:`~gateway.speech.bargein.BargeIn`, fed with onsets found by a VAD run over what is
sent), the gain while ducking, and the events subscribers see. Every call that depends
on time takes it as arguments (``mono``: monotonic seconds, ``wall``: epoch seconds),
so tests give it made-up times. :class:`gateway.speech.playback.Player` is the asyncio shell
that reads the sources, waits for sockets and sleeps until frames are due.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..audio.vad import SpeechEnded, SpeechStarted, VoiceActivity
from ..config import Settings
from ..errors import GatewayError
from ..ingest.speakers import SpeakerChange
from ..metrics import Metrics
from .bargein import BargeIn
from .pacing import Pacer

Samples = npt.NDArray[np.int16]
Listener = Callable[[dict[str, Any]], None]

#: Utterances waiting per session; more are refused.
MAX_QUEUED = 32
#: Gain applied while ducking (-12 dB).
DUCK_GAIN = 0.25

_ids = itertools.count(1)


class PlaybackFull(GatewayError):
    """The session already has :data:`MAX_QUEUED` utterances waiting."""


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


class Playlist:
    """One session's playback state. ``wall(sample)`` converts a session-clock position
    to epoch seconds (``None`` before audio); ``speaking(on, wall)`` is told when the
    bot's voice starts and stops playing."""

    def __init__(
        self,
        rate: int,
        settings: Settings,
        metrics: Metrics,
        wall: Callable[[int], float | None],
        speaking: Callable[[bool, float], None],
        log: Any,
    ) -> None:
        self.rate = rate
        self.frame = rate * settings.playback_frame_ms // 1000
        self.policy = settings.barge_in
        self.resume_after_drop = settings.on_input_drop == "resume"
        self._metrics = metrics
        self._wall = wall
        self._speaking = speaking
        self._log = log
        self.pacer = Pacer(rate, settings.playback_lead_ms / 1000)
        self.barge_in = BargeIn()
        # The session's VAD settings, run over what is sent: where the bot's speech
        # starts, as the session's VAD will see it when it echoes back.
        self._own_vad = VoiceActivity.configured(rate, settings)
        self._own_pos = 0
        self.queue: deque[Utterance] = deque()
        self.current: Utterance | None = None
        self.gain = 1.0
        self.listeners: list[Listener] = []

    @property
    def playing(self) -> bool:
        return self.current is not None and self.current.started is not None

    # -- requests -------------------------------------------------------------------------

    def enqueue(
        self,
        source: AsyncIterator[Samples],
        kind: str,
        text: str | None,
        mono: float,
        wall: float,
    ) -> Utterance:
        """Queue an utterance; raises :class:`PlaybackFull`."""
        if len(self.queue) >= MAX_QUEUED:
            self._metrics.speech_utterances.labels("refused").inc()
            raise PlaybackFull(f"{MAX_QUEUED} utterances are already waiting")
        utt = Utterance(f"u{next(_ids)}", kind, source, mono, text)
        self.queue.append(utt)
        self._emit("queued", utt, wall, position=len(self.queue) - 1)
        return utt

    def stop(self, reason: str, mono: float, wall: float) -> list[str]:
        """End the current utterance before its next frame and cancel the queue."""
        ids = []
        if self.current is not None and self.current.end_reason is None:
            self.current.end_reason = reason
            self.current.stop_requested = wall
            ids.append(self.current.id)
        while self.queue:
            utt = self.queue.popleft()
            ids.append(utt.id)
            self.finish(utt, "cancelled", reason, mono, wall)
        return ids

    def next(self) -> Utterance | None:
        """The utterance to play now, if one waits."""
        self.current = self.queue.popleft() if self.queue else None
        return self.current

    # -- barge-in -------------------------------------------------------------------------

    def observe(self, events: Iterable[Any], mono: float, wall: float) -> None:
        """VAD and roster events from the session, as soon as they are known."""
        for event in events:
            if type(event) is SpeechStarted:
                at = self._wall(event.sample)
                if self.audible(mono) and at is not None and not self.barge_in.own_voice(at):
                    self._barge_in("vad", mono, wall)
            elif type(event) is SpeechEnded:
                if not self.barge_in.humans_speaking:
                    self.gain = 1.0
            elif type(event) is SpeakerChange:
                person = self.barge_in.roster_change(
                    event.speaker.key, event.speaker.is_bot, event.speaking
                )
                if person and self.audible(mono):
                    self._barge_in("roster", mono, wall)

    def audible(self, mono: float) -> bool:
        """Whether the bot is playing something of ours (sending, or its queue playing)."""
        return self.playing or self.pacer.queued(mono) > 0

    def _barge_in(self, how: str, mono: float, wall: float) -> None:
        self._metrics.speech_barge_ins.labels(self.policy).inc()
        if self.policy == "stop":
            self._log.info("barge-in (%s): stopping speech", how)
            self.stop("barge_in", mono, wall)
        elif self.policy == "duck":
            self.gain = DUCK_GAIN

    # -- frames ---------------------------------------------------------------------------

    def due(self, utt: Utterance, mono: float) -> float:
        """When the next frame of ``utt`` may be sent (monotonic seconds)."""
        if not self.pacer.active or mono >= self.pacer.playout_end:
            # The bot went quiet: its next speech is a new onset.
            self._own_vad.interrupt(self._own_pos)
        if self.pacer.resume(mono) and utt.sent:
            self._metrics.speech_underruns.inc()
        return self.pacer.due()

    def shape(self, frame: Samples) -> Samples:
        """The frame as it is sent (lowered while ducking)."""
        return frame if self.gain == 1.0 else (frame * self.gain).astype(np.int16)

    def sent(self, utt: Utterance, frame: Samples, due: float, mono: float, wall: float) -> None:
        """``frame`` of ``utt`` went out at ``mono``/``wall``; it was due at ``due``."""
        n = len(frame)
        playout = self.pacer.playout_time(self.pacer.position)
        self.pacer.sent(n)
        epoch = wall - mono
        for event in self._own_vad.feed(frame):
            if type(event) is SpeechStarted:
                at = playout - (self._own_pos - event.sample) / self.rate
                self.barge_in.onset(at + epoch)
        self._own_pos += n
        m = self._metrics
        m.speech_frames_sent.inc()
        m.speech_sent_seconds.inc(n / self.rate)
        m.speech_pacing_error.observe(max(0.0, mono - due))
        if utt.started is None:
            utt.started = mono
            m.speech_first_frame.labels(utt.kind).observe(mono - utt.requested)
            self._speaking(True, playout + epoch)
            self._emit("started", utt, wall, latency=round(mono - utt.requested, 4))
        utt.sent += n

    def finish(
        self, utt: Utterance, outcome: str, reason: str | None, mono: float, wall: float
    ) -> None:
        """``utt`` is over: ``finished``, ``interrupted``, ``cancelled`` or ``failed``."""
        self._metrics.speech_utterances.labels(outcome).inc()
        extra: dict[str, Any] = {"seconds": round(utt.sent / self.rate, 3), "samples": utt.sent}
        if reason is not None:
            extra["reason"] = reason
        if utt.stop_requested is not None:
            extra["stop_requested"] = round(utt.stop_requested, 4)
        if utt.started is not None:
            ends = wall + self.pacer.queued(mono)
            extra["played_until"] = round(ends, 4)
            self._speaking(False, ends)
        self._emit(outcome, utt, wall, **extra)

    def _emit(self, kind: str, utt: Utterance, wall: float, **extra: Any) -> None:
        event = {"type": kind, "id": utt.id, "kind": utt.kind, "time": round(wall, 4)}
        event.update(extra)
        for listener in list(self.listeners):
            listener(event)
