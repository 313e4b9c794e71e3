"""Voice activity on the session audio clock: a frame classifier behind a small state machine.

Two classifiers, chosen per deployment (``--vad``):

- ``webrtc`` (the default): webrtcvad, 10, 20 or 30 ms frames, about 2.5 us each. It
  hears keyboard clicks and voices in the background as speech, so in a room where
  somebody types it may not hear the pauses between turns.
- ``silero``: the Silero VAD network that ships with faster-whisper (ONNX, one thread),
  32 ms frames, about 4 ms of CPU per second of audio. It hears those pauses; see
  ``benchmarks/RESULTS.md``.

Both take 16 kHz; the bot streams at 16,
24, 32 or 48 kHz, so audio is resampled to 16 kHz first (the rate ASR wants too). Single
frames flicker, so speech starts only after ``min_speech_ms`` of consecutive voiced
frames and ends after ``hangover_ms`` of consecutive unvoiced ones; ``pause_ms`` of them
(less than the hangover) are reported as a pause first, once per run, for pipelines that
start finishing an utterance before its end is certain. Event positions are sample
indices at the session's native rate: the first voiced sample of the run for a start,
one past the last voiced sample for an end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import webrtcvad

from ..config import VAD_MODELS, Settings
from .resample import Resampler

Samples = npt.NDArray[np.int16]

VAD_RATE = 16000


class WebRtcFrames:
    """webrtcvad: voiced (1.0) or not (0.0), frame by frame."""

    def __init__(self, aggressiveness: int, frame_ms: int) -> None:
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"webrtcvad takes 10, 20 or 30 ms frames, not {frame_ms}")
        self.frame = VAD_RATE * frame_ms // 1000
        self._vad = webrtcvad.Vad(aggressiveness)
        self._of: Samples | None = None
        self._bytes = memoryview(b"")

    def __call__(self, frame: Samples) -> float:
        if frame is not self._of:  # the detector passes the same buffer every time
            self._of, self._bytes = frame, frame.data.cast("B")  # webrtcvad wants bytes
        return 1.0 if self._vad.is_speech(self._bytes, VAD_RATE) else 0.0

    def reset(self) -> None:
        pass  # webrtcvad's noise estimate carries over a gap, as it always has


class SileroFrames:
    """Silero VAD: the probability that each 32 ms frame is speech.

    Recurrent: its state (and the last 64 samples, which the network sees before each
    frame) carries from frame to frame and starts afresh at :meth:`reset`. The network
    is loaded once per process and shared; each detector keeps its own state.
    """

    frame = 512
    CONTEXT = 64
    _session: Any = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._net = self._load()
        self._h: npt.NDArray[np.float32]
        self._c: npt.NDArray[np.float32]
        self._input = np.zeros((1, self.CONTEXT + self.frame), dtype=np.float32)
        self.reset()

    @classmethod
    def _load(cls) -> Any:
        with cls._lock:
            if cls._session is None:
                import onnxruntime  # type: ignore[import-untyped]
                from faster_whisper.utils import get_assets_path

                opts = onnxruntime.SessionOptions()
                opts.inter_op_num_threads = opts.intra_op_num_threads = 1
                opts.log_severity_level = 4
                path = Path(get_assets_path()) / "silero_vad_v6.onnx"
                cls._session = onnxruntime.InferenceSession(
                    str(path), providers=["CPUExecutionProvider"], sess_options=opts
                )
            return cls._session

    def __call__(self, frame: Samples) -> float:
        x = self._input
        x[0, self.CONTEXT :] = frame
        x[0, self.CONTEXT :] *= 1.0 / 32768.0
        out, self._h, self._c = self._net.run(None, {"input": x, "h": self._h, "c": self._c})
        x[0, : self.CONTEXT] = x[0, -self.CONTEXT :]
        return float(out.reshape(-1)[0])

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._input[:] = 0.0


#: A frame is voiced at this probability, and stays voiced while speech goes on down to
#: the second (Silero's own thresholds; webrtcvad answers 0 or 1).
START_PROBABILITY = 0.5
GO_ON_PROBABILITY = 0.35


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    sample: int
    quiet: int = 0
    """Samples of silence the detector heard right before it (since it started, for the
    first speech of a stream: 0 when the stream starts in the middle of a voice)."""


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
        model: str = "webrtc",
    ) -> None:
        self.rate = rate
        if model == "silero":
            self._vad: WebRtcFrames | SileroFrames = SileroFrames()
        elif model == "webrtc":
            self._vad = WebRtcFrames(aggressiveness, frame_ms)
        else:
            raise ValueError(f"no VAD model {model!r}: one of {', '.join(VAD_MODELS)}")
        self._frame = self._vad.frame
        frame_ms = self._frame * 1000 // VAD_RATE
        self._min_voiced = max(1, -(-min_speech_ms // frame_ms))
        self._min_unvoiced = max(1, -(-hangover_ms // frame_ms))
        self._pause = -(-pause_ms // frame_ms)  # 0: no pauses reported
        self._buf: Samples = np.zeros(self._frame, dtype=np.int16)
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
            model=settings.vad,
        )

    def _restart(self, at: int) -> None:
        # Quick quality is plenty for a speech/non-speech decision and costs half of MQ.
        self._resampler = Resampler(self.rate, VAD_RATE, quality="QQ")
        self._vad.reset()
        self._fill = 0
        self._origin = at  # native index where 16 kHz sample 0 of this run lies
        self._pos = 0  # 16 kHz samples classified so far in this run
        self._speaking = False
        self._run = 0  # consecutive frames disagreeing with the current state
        self._run_start = 0  # 16 kHz index where that run began
        self._speech_start = 0
        self._last_voiced_end = 0
        self._quiet_from = 0  # 16 kHz index where the silence before the next speech began

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
        p = self._vad(self._buf)
        voiced = p >= (GO_ON_PROBABILITY if self._speaking else START_PROBABILITY)
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
            quiet = (self._speech_start - self._quiet_from) * self.rate // VAD_RATE
            events.append(SpeechStarted(self._native(self._speech_start), quiet))
        elif self._speaking and self._run >= self._min_unvoiced:
            events.append(self._end())
        elif self._speaking and self._pause and self._run == self._pause:
            since = self._native(self._last_voiced_end)
            events.append(SpeechPaused(since, self._native(self._pos)))

    def _end(self) -> SpeechEnded:
        self._speaking, self._run = False, 0
        self._quiet_from = self._last_voiced_end
        start, end = self._native(self._speech_start), self._native(self._last_voiced_end)
        self.speech_samples += end - start
        return SpeechEnded(end, start)

    def interrupt(self, at: int) -> list[VadEvent]:
        """The stream breaks (a gap or the end): close any speech and restart at ``at``."""
        events: list[VadEvent] = [self._end()] if self._speaking else []
        self._restart(at)
        return events
