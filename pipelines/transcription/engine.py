"""The speech recognizer: a faster-whisper model loaded once and called from threads.

Which directory a model name means, and the checks on its files, are in
:mod:`pipelines.transcription.models`.

:meth:`Engine.transcribe` blocks for hundreds of milliseconds; callers run it in a
worker thread. It returns a fully decoded :class:`Hypothesis` (faster-whisper decodes
lazily while its segment generator is iterated, so the iteration happens here, in the
worker, never on the event loop).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.config import Settings
from gateway.errors import ModelError

from .compact import FULL_WINDOW, install_compact_window, margin_for, padding
from .lanes import asr_threads, in_lane_thread, single_threaded_blas
from .models import resolve_model
from .settle import settle
from .verdicts import token_limit, verdict, voice_after, voiced

# Re-exported from where they live, for code that imported them from here.
from .words import ASR_RATE as ASR_RATE
from .words import HypWord as HypWord
from .words import normalize as normalize

logger = logging.getLogger("pipelines.transcription.engine")

#: Audio longer than one window (frames of 10 ms) is never batched.
MAX_BATCHED = FULL_WINDOW * ASR_RATE // 100


@dataclass(frozen=True, slots=True)
class Hypothesis:
    words: tuple[HypWord, ...]
    rejected: tuple[str, ...]
    """Why segments were thrown away: ``no_speech``, ``low_logprob`` or ``repetition``."""
    audio_seconds: float
    compute_seconds: float
    language: str = "en"
    """The language decoded in: the one asked for, or the one detected."""
    language_probability: float = 1.0
    """How sure the detection was (1.0 when the language was given)."""


class Engine:
    """One model, loaded once per lane and shared by every session of the process.

    :meth:`transcribe` may be called from one thread per lane at once.
    """

    def __init__(self, models: list[Any], directory: Path) -> None:
        self.models = models
        self.directory = directory
        self._locks = [threading.Lock() for _ in models]
        self._warm: set[int] = set()
        self.compact = install_compact_window()

    @property
    def lanes(self) -> int:
        return len(self.models)

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Resolve, verify and load the model. Blocks for seconds: call it in a thread.

        Each lane is one copy of the model on one inference thread: with the encoder
        window sized to the audio a call is short, and calls side by side get more done
        than one call spread over several cores. A copy of tiny.en is about 40 MB.
        """
        from faster_whisper import WhisperModel

        directory = resolve_model(settings)
        lanes = asr_threads(settings)
        single_threaded_blas()
        began = time.perf_counter()
        try:
            models = [
                in_lane_thread(
                    lane,
                    lanes,
                    WhisperModel,
                    str(directory),
                    device=settings.device,
                    compute_type="int8" if settings.device == "cpu" else "float16",
                    cpu_threads=1,
                    num_workers=1,
                    local_files_only=True,
                )
                for lane in range(lanes)
            ]
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(f"cannot load the model in {directory}: {exc}") from exc
        took = time.perf_counter() - began
        logger.info(
            "loaded %s from %s in %.1f s (%d lanes)", settings.model, directory, took, lanes
        )
        return cls(models, directory)

    def warm_up(self, lane: int, seconds: float, batch: int = 1) -> None:
        """Run ``lane`` on a short and a ``seconds`` long stretch of noise, then on
        ``batch`` such stretches at once.

        A lane's first calls are slow and allocate its working memory (about 60 MB for
        tiny.en at 16 s windows, more for a batch). Paid at start-up, the first meeting's
        first words do not wait for it, and memory measured once the gateway is up
        already holds it. Once per lane and process; call it in the lane's thread.
        """
        if lane in self._warm:
            return
        rng = np.random.default_rng(lane)
        for length in (2.0, seconds):
            noise = rng.standard_normal(int(length * ASR_RATE)).astype(np.float32)
            noise *= 0.01
            self.transcribe(noise, 0.0, lane=lane)
        self.transcribe_many([Request(noise, 0.0)] * batch, lane)
        self._warm.add(lane)

    def transcribe(
        self,
        audio: npt.NDArray[np.float32],
        offset: float,
        prompt: str | None = None,
        *,
        compact: bool = True,
        lane: int = 0,
        language: str | None = "en",
        whole: bool = False,
    ) -> Hypothesis:
        """Recognize 16 kHz mono ``audio`` that starts ``offset`` seconds into the session.

        Blocking; one call at a time per ``lane``. Each call decodes independently:
        nothing is conditioned on earlier calls except an optional short ``prompt``,
        which is what keeps repetition loops from feeding themselves. ``compact=False``
        runs faster-whisper's standard 30 s window (the offline reference).

        A compact decode that stops while the voice goes on (:mod:`.verdicts`) is
        continued from its last word, as Whisper's own long-form loop seeks past what it
        has written; one that loops, or heard no word of it, is done again in a wider
        window (``RETRY_MARGIN``), then if need be in the standard one; one whose first
        word comes after voice it did not write has the audio before it decoded on its own.
        ``whole`` (a final: words not heard now are lost) looks for these after
        :data:`~.verdicts.SHORT_VOICE` and :data:`~.verdicts.LATE_VOICE` s of voice, a
        partial after :data:`~.verdicts.STUCK_VOICE` s.
        """
        began = time.perf_counter()
        model = self.models[lane]
        with self._locks[lane]:
            if not (compact and self.compact):
                decoded = self._decode(model, audio, offset, prompt, None, language)
            else:
                margin = margin_for(whole, self.multilingual)
                decoded = self._decode(model, audio, offset, prompt, margin, language)
                decoded = self._settle(
                    model, audio, offset, prompt, language, whole, decoded, margin
                )
        return _hypothesis(audio, decoded, language, time.perf_counter() - began)

    def transcribe_many(
        self,
        requests: Sequence[Request],
        lane: int = 0,
        ready: Callable[[int, Hypothesis], None] | None = None,
    ) -> list[Hypothesis]:
        """:meth:`transcribe` each of ``requests`` (compact windows), the first decodes
        of those in one language with one prompt as one batch (:mod:`.batch`). Each
        hypothesis goes to ``ready(index, hypothesis)`` as soon as it is settled, so one
        item's retries delay no other's, and counts its share of the batch in its
        ``compute_seconds``."""
        began = time.perf_counter()
        model = self.models[lane]
        groups: dict[tuple[str, str | None, int], list[int]] = {}
        margins = [margin_for(r.whole, self.multilingual) for r in requests]
        for i, r in enumerate(requests):
            language = r.language if self.multilingual else "en"
            if language is not None and len(r.audio) <= MAX_BATCHED and self.compact:
                groups.setdefault((language, r.prompt, margins[i]), []).append(i)
        first: dict[int, tuple[list[HypWord], list[str], Any]] = {}
        with self._locks[lane]:
            for (language, prompt, margin), members in groups.items():
                if len(members) > 1:
                    first.update(self._batch(model, requests, members, language, prompt, margin))
        shared = (time.perf_counter() - began) / max(1, len(first))
        out = []
        for i, r in enumerate(requests):
            began = time.perf_counter()
            if i in first:
                with self._locks[lane]:
                    found = self._settle(
                        model,
                        r.audio,
                        r.offset,
                        r.prompt,
                        r.language,
                        r.whole,
                        first[i],
                        margins[i],
                    )
                hyp = _hypothesis(r.audio, found, r.language, shared + time.perf_counter() - began)
            else:
                hyp = self.transcribe(
                    r.audio, r.offset, r.prompt, lane=lane, language=r.language, whole=r.whole
                )
            out.append(hyp)
            if ready is not None:
                ready(i, hyp)
        return out

    def _batch(
        self,
        model: Any,
        requests: Sequence[Request],
        members: list[int],
        language: str,
        prompt: str | None,
        margin: int,
    ) -> dict[int, tuple[list[HypWord], list[str], Any]]:
        """The first decode of each of ``members``, as :meth:`_decode` would return it."""
        from .batch import first_windows  # imports faster-whisper, as loading does

        limits = [token_limit(requests[i].audio) for i in members]
        audios = [requests[i].audio for i in members]
        windows = first_windows(model, audios, language, margin, max(limits), prompt)
        out = {}
        for i, window, limit in zip(members, windows, limits, strict=True):
            r = requests[i]
            parts = [(window.segments, r.offset)]
            at = window.seek / model.frames_per_second
            # Given a prompt, Whisper mostly ends its text with no timestamp, and
            # faster-whisper's loop decodes the audio after the last word again: on 48
            # 4 s excerpts, 2.1 decodes a job against 1.15, most writing nothing, some
            # " Thank you." Decoded on only where voice follows, as a decode stopped short.
            untimed = prompt and window.untimed
            if window.seek < window.frames and (not untimed or voice_after(voiced(r.audio), at)):
                rest = r.audio[round(at * ASR_RATE) :]
                segments, _ = self._segments(model, rest, prompt, margin, language, limit)
                parts.append((segments, r.offset + at))
            out[i] = (*verdict(parts, limit), None)
        return out

    def _settle(
        self,
        model: Any,
        audio: npt.NDArray[np.float32],
        offset: float,
        prompt: str | None,
        language: str | None,
        whole: bool,
        decoded: tuple[list[HypWord], list[str], Any],
        margin: int,
    ) -> tuple[list[HypWord], list[str], Any]:
        """A compact decode's failures answered (:mod:`.settle`), on ``model``'s lane."""
        decode = functools.partial(self._decode, model)
        return settle(decode, audio, offset, prompt, language, whole, decoded, margin)

    @property
    def multilingual(self) -> bool:
        """Whether the model knows languages other than English (not a ``.en`` model)."""
        return bool(self.models[0].model.is_multilingual)

    def supported_languages(self) -> list[str]:
        return list(getattr(self.models[0], "supported_languages", ["en"]))

    def _decode(
        self,
        model: Any,
        audio: npt.NDArray[np.float32],
        offset: float,
        prompt: str | None,
        margin: int | None,
        language: str | None,
    ) -> tuple[list[HypWord], list[str], Any]:
        """One faster-whisper decode, in a window of the audio plus ``margin`` frames
        (``None``: the standard 30 s window)."""
        if prompt and margin is not None and language and len(audio) <= MAX_BATCHED:
            # A batch of one: :meth:`_batch` knows what to do where a prompted text ends.
            alone = [Request(audio, offset, language)]
            return self._batch(model, alone, [0], language, prompt, margin)[0]
        limit = token_limit(audio)
        decoded, info = self._segments(model, audio, prompt, margin, language, limit)
        return (*verdict([(decoded, offset)], limit), info)

    @staticmethod
    def _segments(
        model: Any,
        audio: npt.NDArray[np.float32],
        prompt: str | None,
        margin: int | None,
        language: str | None,
        limit: int,
    ) -> tuple[list[Any], Any]:
        with padding(margin):
            segments, info = model.transcribe(
                audio,
                language=language,
                beam_size=1,
                temperature=0.0,
                condition_on_previous_text=False,
                initial_prompt=prompt,
                word_timestamps=True,
                vad_filter=False,
                without_timestamps=False,
                max_new_tokens=limit,
            )
            # The generator decodes as it is consumed: drain it here, in this thread.
            return list(segments), info


@dataclass(frozen=True, slots=True)
class Request:
    """One recognition of :meth:`Engine.transcribe_many`."""

    audio: npt.NDArray[np.float32]
    offset: float
    language: str | None = "en"
    whole: bool = False
    prompt: str | None = None
    """The meeting's terms to expect (:func:`gateway.keywords.prompt`)."""


def _hypothesis(
    audio: npt.NDArray[np.float32],
    decoded: tuple[list[HypWord], list[str], Any],
    language: str | None,
    seconds: float,
) -> Hypothesis:
    words, rejected, info = decoded
    detected = getattr(info, "language", None) or language or "en"
    sure = float(getattr(info, "language_probability", 1.0) or 1.0)
    return Hypothesis(tuple(words), tuple(rejected), len(audio) / ASR_RATE, seconds, detected, sure)


_shared: dict[tuple[str, str, int], Engine] = {}
_shared_lock = threading.Lock()


def shared_engine(settings: Settings) -> Engine:
    """The process's engine for these settings, loaded on first use. Blocking.

    Every gateway and session in the process with the same model and thread count
    shares one loaded model.
    """
    key = (settings.model, str(settings.model_cache), asr_threads(settings))
    with _shared_lock:
        engine = _shared.get(key)
        if engine is None:
            engine = _shared[key] = Engine.load(settings)
        return engine
