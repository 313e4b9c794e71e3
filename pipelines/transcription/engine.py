"""The speech recognizer: a faster-whisper model loaded once and called from threads.

Which directory a model name means, and the checks on its files, are in
:mod:`pipelines.transcription.models`.

:meth:`Engine.transcribe` blocks for hundreds of milliseconds; callers run it in a
worker thread. It returns a fully decoded :class:`Hypothesis` (faster-whisper decodes
lazily while its segment generator is iterated, so the iteration happens here, in the
worker, never on the event loop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from gateway.config import Settings
from gateway.errors import ModelError

from .compact import WINDOW_MARGIN, install_compact_window, padding, retries
from .models import resolve_model
from .verdicts import (
    CONTINUATIONS,
    CONTINUE_BACK,
    RETRY,
    SHORT_VOICE,
    STUCK_VOICE,
    collect,
    looping,
    started_late,
    stopped_short,
    voiced,
)

# Re-exported from where they live, for code that imported them from here.
from .words import ASR_RATE as ASR_RATE
from .words import HypWord as HypWord
from .words import normalize as normalize

logger = logging.getLogger("pipelines.transcription.engine")

T = TypeVar("T")

# Speech runs at about 3 words (4-5 tokens) a second. A decode that needs far more is
# looping, and a loop left to run to Whisper's 448-token limit costs seconds.
TOKENS_PER_SECOND = 10
TOKEN_SLACK = 16


def asr_threads(settings: Settings) -> int:
    """Recognition lanes: as configured, else one per core."""
    if settings.asr_threads > 0:
        return settings.asr_threads
    return max(1, os.cpu_count() or 1)


def lane_priority(lane: int, lanes: int) -> None:
    """Lower the calling thread's CPU priority for recognition ``lane`` (Linux).

    Recognition never competes with the event loop: every lane runs below normal
    priority, so ingest and the loop take a core the moment they have work and
    inference uses whatever is left, on every core. With several lanes, lane 0 (the
    finals lane) runs at nice 19 and the others at ``SCHED_IDLE``, below it: a partial
    never slows a final down. Threads inherit this from the thread that starts them.
    Elsewhere, or where it is refused, nothing changes.
    """
    with contextlib.suppress(AttributeError, OSError):
        if lane == 0 and lanes > 1:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # on Linux: this thread only
        else:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def single_threaded_blas() -> None:
    """Keep numpy's BLAS (OpenBLAS) in the calling thread, for the whole process.

    OpenBLAS hands each matrix product to helper threads that run at normal priority
    and spin between calls; the products here (one mel filterbank per recognition) are
    far too small to gain from them, and under load the helper took half a core from
    the event loop and the recognition lanes.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _in_lane_thread(lane: int, lanes: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in a fresh thread at ``lane``'s priority and wait for it.

    CTranslate2 starts its inference threads while a model loads, and they inherit
    their creator's priority: loading there lowers exactly those threads, never the
    thread that asked.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        lane_priority(lane, lanes)
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"asr-load-{lane}")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


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
                _in_lane_thread(
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
        logger.info(
            "loaded %s from %s in %.1f s (%d lanes)",
            settings.model,
            directory,
            time.perf_counter() - began,
            lanes,
        )
        return cls(models, directory)

    def warm_up(self, lane: int, seconds: float) -> None:
        """Run ``lane`` once on a short and once on a ``seconds`` long stretch of noise.

        A lane's first calls are slow and allocate its working memory (about 60 MB for
        tiny.en at 16 s windows, in its thread's heap). Paid at start-up, the first
        meeting's first words do not wait for it, and memory measured once the gateway
        is up already holds it. Once per lane and process; call it in the lane's thread.
        """
        if lane in self._warm:
            return
        rng = np.random.default_rng(lane)
        for length in (2.0, seconds):
            noise = rng.standard_normal(int(length * ASR_RATE)).astype(np.float32)
            noise *= 0.01
            self.transcribe(noise, 0.0, lane=lane)
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
        window (``RETRY_MARGIN``), then if need be in the standard one;
        one whose first word comes after voice it did not write has the audio before that
        word decoded on its own.
        ``whole`` (a final: words not heard now are lost) looks for that after
        :data:`~.verdicts.SHORT_VOICE` s of voice, a partial after
        :data:`~.verdicts.STUCK_VOICE` s.
        """
        began = time.perf_counter()
        model = self.models[lane]
        voice = SHORT_VOICE if whole else STUCK_VOICE
        with self._locks[lane]:
            use_compact = compact and self.compact
            words, rejected, info = self._decode(
                model, audio, offset, prompt, WINDOW_MARGIN if use_compact else None, language
            )
            if use_compact:
                frames = voiced(audio)
                # The compact window occasionally loops, or rejects the first segment
                # and with it the rest, where a wider one, or the standard one, does not.
                for margin in retries(len(audio), ASR_RATE):
                    if not RETRY.intersection(rejected) and (
                        words or not stopped_short(frames, offset, words, voice)
                    ):
                        break
                    words, rejected, info = self._decode(
                        model, audio, offset, prompt, margin, language
                    )
                for _ in range(CONTINUATIONS):
                    if not words or not stopped_short(frames, offset, words, voice):
                        break
                    more = self._continue(model, audio, offset, words[-1].end, language)
                    if not more:
                        break
                    words.extend(more)
                if started_late(frames, offset, words, voice):
                    words[:0] = self._head(model, audio, offset, words, language)
        return Hypothesis(
            tuple(words),
            tuple(rejected),
            len(audio) / ASR_RATE,
            time.perf_counter() - began,
            getattr(info, "language", None) or language or "en",
            float(getattr(info, "language_probability", 1.0) or 1.0),
        )

    @property
    def multilingual(self) -> bool:
        """Whether the model knows languages other than English (not a ``.en`` model)."""
        return bool(self.models[0].model.is_multilingual)

    def supported_languages(self) -> list[str]:
        return list(getattr(self.models[0], "supported_languages", ["en"]))

    def _continue(
        self,
        model: Any,
        audio: npt.NDArray[np.float32],
        offset: float,
        after: float,
        language: str | None,
    ) -> list[HypWord]:
        """The words after ``after`` (seconds, session clock): ``audio`` decoded again
        from a little before it, so the first word heard is not cut."""
        start = max(0.0, after - offset - CONTINUE_BACK)
        words, _, _ = self._decode(
            model, audio[round(start * ASR_RATE) :], offset + start, None, WINDOW_MARGIN, language
        )
        return [w for w in words if w.start >= after - 0.02]

    def _head(
        self,
        model: Any,
        audio: npt.NDArray[np.float32],
        offset: float,
        after: Sequence[HypWord],
        language: str | None,
    ) -> list[HypWord]:
        """The words before ``after`` (a decode's words, session clock): the audio up to
        a little after the first of them decoded on its own, so the last word heard is
        not cut."""
        before = after[0].start
        end = round((before - offset + CONTINUE_BACK) * ASR_RATE)
        words, _, _ = self._decode(model, audio[:end], offset, None, WINDOW_MARGIN, language)
        head = [w for w in words if w.end <= before + 0.02]
        if head and head[-1].norm == after[0].norm:
            head.pop()  # the first word of the decode, heard twice at the join
        return head

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
        limit = int(TOKENS_PER_SECOND * len(audio) / ASR_RATE) + TOKEN_SLACK
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
            decoded = list(segments)
        if sum(len(segment.tokens) for segment in decoded) >= limit - 1:
            return [], ["repetition"], info  # ran out of room: a loop, not speech
        words, rejected = collect(decoded, offset)
        if looping([w.norm for w in words]):
            return [], [*rejected, "repetition"], info
        return words, rejected, info


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
