"""Voice activity on the session audio clock: webrtcvad behind a small state machine.

webrtcvad classifies 10, 20 or 30 ms frames at 8/16/32/48 kHz; the bot streams at 16,
24, 32 or 48 kHz, so audio is resampled to 16 kHz first (the rate ASR wants too). Single
frames flicker, so speech starts only after ``min_speech_ms`` of consecutive voiced
frames and ends after ``hangover_ms`` of consecutive unvoiced ones; ``pause_ms`` of them
(less than the hangover) are reported as a pause first, once per run, for pipelines that
start finishing an utterance before its end is certain. Event positions are sample
indices at the session's native rate: the first voiced sample of the run for a start,
one past the last voiced sample for an end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import webrtcvad

from ..config import Settings
from .resample import Resampler

Samples = npt.NDArray[np.int16]

VAD_RATE = 16000


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    sample: int


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    sample: int
    started: int

    @property
    def length(self) -> int:
        return self.sample - self.started


@dataclass(frozen=True, slots=True)
class SpeechPaused:
    """Speech has been quiet since ``sample``, as heard by ``heard``: it goes on, or it
    ends with a :class:`SpeechEnded` at ``sample`` once the hangover is heard. Pipelines
    get it after the audio up to ``heard``, to act on the quiet it tells of."""

    sample: int
    heard: int


VadEvent = SpeechStarted | SpeechPaused | SpeechEnded


class VoiceActivity:
    """Feed native-rate samples in order; get speech start and end events back."""

    def __init__(
        self,
        rate: int,
        *,
        aggressiveness: int = 2,
        frame_ms: int = 30,
        min_speech_ms: int = 90,
        hangover_ms: int = 300,
        pause_ms: int = 0,
        start: int = 0,
    ) -> None:
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"webrtcvad takes 10, 20 or 30 ms frames, not {frame_ms}")
        self.rate = rate
        self._vad = webrtcvad.Vad(aggressiveness)
        self._frame = VAD_RATE * frame_ms // 1000
        self._frame_bytes = self._frame * 2
        self._min_voiced = max(1, -(-min_speech_ms // frame_ms))
        self._min_unvoiced = max(1, -(-hangover_ms // frame_ms))
        self._pause = -(-pause_ms // frame_ms)  # 0: no pauses reported
        self._buf: Samples = np.zeros(self._frame, dtype=np.int16)
        self._bytes = self._buf.data.cast("B")  # webrtcvad wants a byte buffer
        self._fill = 0
        self._restart(start)
        #: Voiced samples at the native rate, for the speech-seconds metric.
        self.speech_samples = 0

    @classmethod
    def configured(cls, rate: int, settings: Settings) -> VoiceActivity:
        """A detector with the deployment's VAD settings (one place, so every VAD of a
        session, the meeting's and the one over what the bot says, agrees)."""
        return cls(
            rate,
            aggressiveness=settings.vad_aggressiveness,
            frame_ms=settings.vad_frame_ms,
            min_speech_ms=settings.vad_min_speech_ms,
            hangover_ms=settings.vad_hangover_ms,
            pause_ms=settings.vad_pause_ms,
        )

    def _restart(self, at: int) -> None:
        # Quick quality is plenty for a speech/non-speech decision and costs half of MQ.
        self._resampler = Resampler(self.rate, VAD_RATE, quality="QQ")
        self._fill = 0
        self._origin = at  # native index where 16 kHz sample 0 of this run lies
        self._pos = 0  # 16 kHz samples classified so far in this run
        self._speaking = False
        self._run = 0  # consecutive frames disagreeing with the current state
        self._run_start = 0  # 16 kHz index where that run began
        self._speech_start = 0
        self._last_voiced_end = 0

    def _native(self, pos16: int) -> int:
        return self._origin + pos16 * self.rate // VAD_RATE

    @property
    def speaking(self) -> bool:
        return self._speaking

    def feed(self, samples: Samples) -> list[VadEvent]:
        events: list[VadEvent] = []
        x = self._resampler.process(samples)
        i, n = 0, len(x)
        while i < n:
            take = min(self._frame - self._fill, n - i)
            self._buf[self._fill : self._fill + take] = x[i : i + take]
            self._fill += take
            i += take
            if self._fill == self._frame:
                self._fill = 0
                self._classify(events)
        return events

    def _classify(self, events: list[VadEvent]) -> None:
        voiced = self._vad.is_speech(self._bytes, VAD_RATE)
        start, self._pos = self._pos, self._pos + self._frame
        if voiced:
            self._last_voiced_end = self._pos
        if voiced != self._speaking:
            if self._run == 0:
                self._run_start = start
            self._run += 1
        else:
            self._run = 0
        if not self._speaking and self._run >= self._min_voiced:
            self._speaking, self._run = True, 0
            self._speech_start = self._run_start
            events.append(SpeechStarted(self._native(self._speech_start)))
        elif self._speaking and self._run >= self._min_unvoiced:
            events.append(self._end())
        elif self._speaking and self._pause and self._run == self._pause:
            since = self._native(self._last_voiced_end)
            events.append(SpeechPaused(since, self._native(self._pos)))

    def _end(self) -> SpeechEnded:
        self._speaking, self._run = False, 0
        start, end = self._native(self._speech_start), self._native(self._last_voiced_end)
        self.speech_samples += end - start
        return SpeechEnded(end, start)

    def interrupt(self, at: int) -> list[VadEvent]:
        """The stream breaks (a gap or the end): close any speech and restart at ``at``."""
        events: list[VadEvent] = [self._end()] if self._speaking else []
        self._restart(at)
        return events
